"""kernels/lenet_head.py: LeNet's head step (forward, loss, backward) in one launch, against
float64 autograd of the stock layers.

The kernel writes gradients of the summed loss of the counted rows, and per-program
partial sums of the parameter gradients; the tests reduce them as kernels/lenet_sgd.py
does (sum over axis 0, times 1 / count) and compare with the gradient of stock's mean
loss, at the stated tolerance relative to each output's scale.  Without a GPU the
kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors, with the
CPU's block sizes; some tests run the GPU's block sizes there too.
"""

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import assert_close_scaled, head_inputs
from lenet_fast.kernels import _common, lenet_head

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU, or TRITON_INTERPRET=1 for CPU tensors", allow_module_level=True)

IGNORE = lenet_head.IGNORE_INDEX
REL = 1e-5
HEAD = (400, (120, 84, 10))  # LeNet's: 16 x 5 x 5 features, fc1, fc2, fc3


def inputs(batch, seed=0, ignore_every=0):
    """Features (non-negative, as after ReLU and max-pool), LeNet's head parameters, targets;
    every `ignore_every`-th target is IGNORE."""
    x, weights, biases, target = head_inputs(batch, *HEAD, seed=seed)
    params = [t for pair in zip(weights, biases) for t in pair]  # w3, b3, w4, b4, w5, b5
    if ignore_every:
        target[::ignore_every] = IGNORE
    return x.relu(), params, target


def reference(x, params, target):
    """(mean loss, [d features, d w3, d b3, ...], logits), float64 autograd of the stock layers."""
    x = x.double().requires_grad_()
    params = [p.double().requires_grad_() for p in params]
    w3, b3, w4, b4, w5, b5 = params
    h = F.relu(F.linear(x, w3, b3))
    h = F.relu(F.linear(h, w4, b4))
    z = F.linear(h, w5, b5)
    loss = F.cross_entropy(z, target)
    return loss.detach(), list(torch.autograd.grad(loss, [x, *params])), z.detach()


def step(x, params, target, **kwargs):
    """head_step on DEVICE copies of the inputs."""
    return lenet_head.head_step(x.to(DEVICE), *(p.to(DEVICE) for p in params), target.to(DEVICE), **kwargs)


def reduced(out):
    """(mean loss, [d features, d w3, ...] of the mean loss, count, correct) from head_step's outputs."""
    out = lenet_head.HeadStep(*(t.cpu() for t in out))
    count = int(out.count_part.sum())
    scale = 1.0 / max(count, 1)
    loss = out.loss_part.double().sum() / count if count else torch.tensor(float("nan"), dtype=torch.float64)
    grads = [out.dfeatures.double() * scale] + [p.double().sum(0) * scale for p in out.partials()]
    return loss, grads, count, int(out.correct_part.sum())


def check(x, params, target, out):
    loss, grads, count, correct = reduced(out)
    ref_loss, ref_grads, z = reference(x, params, target)
    assert count == int((target != IGNORE).sum())
    assert correct == int((z.argmax(1) == target).sum())
    assert_close_scaled(loss, ref_loss, REL, "mean loss")
    names = ["d features", "d w3", "d b3", "d w4", "d b4", "d w5", "d b5"]
    for name, got, want in zip(names, grads, ref_grads):
        assert_close_scaled(got, want, REL, name)


@pytest.fixture
def gpu_blocks(monkeypatch):
    """Run the GPU's block sizes in the interpreter: 16-row programs, 16-wide steps."""
    if not INTERPRETED:
        pytest.skip("the GPU runs its own block sizes in the other tests")
    config = lenet_head.head_config
    monkeypatch.setattr(lenet_head, "head_config", lambda N, H1, C, on_gpu=True: config(N, H1, C, True))


@pytest.mark.parametrize("batch", [1, 3, 37, 64, 256])
def test_matches_stock(batch):
    x, params, target = inputs(batch, seed=batch, ignore_every=5)
    check(x, params, target, step(x, params, target))


@pytest.mark.parametrize("batch", [3, 37])
def test_matches_stock_with_the_gpu_blocks(gpu_blocks, batch):
    x, params, target = inputs(batch, seed=100 + batch, ignore_every=4)
    out = step(x, params, target)
    assert out.w3_part.shape[0] == -(-batch // 16)
    check(x, params, target, out)


def test_several_programs_and_a_partial_block():
    x, params, target = inputs(37, seed=7)
    out = step(x, params, target)
    assert out.w3_part.shape[0] > 1 and 37 % lenet_head.head_config(37, 120, 10, DEVICE == "cuda")["BLOCK_M"] != 0
    check(x, params, target, out)


def test_every_row_ignored_gives_nan_loss_and_zero_gradients():
    x, params, target = inputs(5, seed=1)
    target[:] = IGNORE
    out = step(x, params, target)
    loss, grads, count, correct = reduced(out)
    ref_loss, ref_grads, _ = reference(x, params, target)
    assert count == 0 and correct == 0
    assert torch.isnan(loss) and torch.isnan(ref_loss)
    for got, want in zip(grads, ref_grads):
        assert torch.equal(got, torch.zeros_like(got)) and torch.equal(want, torch.zeros_like(want))


def test_batch_0_launches_nothing():
    x, params, target = inputs(0)
    with _common.recording_launches() as launches:
        out = step(x, params, target)
    assert launches == []
    assert out.dfeatures.shape == (0, 400) and out.w3_part.shape == (0, 120, 400) and out.loss_part.shape == (0,)
    loss, grads, count, _ = reduced(out)
    assert count == 0 and torch.isnan(loss)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])


def test_ties_and_nan_in_the_logits_pick_torch_argmax():
    """fc3's weight zero: every row's logits are b5, whose maximum is tied at classes 1 and 2
    (torch.argmax takes the first); then a NaN at class 3, which argmax returns."""
    x, params, target = inputs(40, seed=3)
    params[4] = torch.zeros_like(params[4])
    params[5] = torch.tensor([0.0, 2.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
    target = torch.arange(40) % 5
    target[target == 4] = 3  # 8 rows with target 1, 16 with target 3
    out = step(x, params, target)
    assert int(out.correct_part.sum()) == 8  # the rows with target 1
    check(x, params, target, out)
    params[5][3] = float("nan")
    out = step(x, params, target)
    assert int(out.correct_part.sum()) == 16  # now the rows with target 3
    assert torch.isnan(out.loss_part.sum())


def test_second_run_is_bitwise_identical_and_fills_out():
    x, params, target = inputs(64, seed=11, ignore_every=3)
    first = step(x, params, target)
    out = lenet_head.empty_outputs(64, 400, 120, 84, 10, DEVICE)
    second = step(x, params, target, out=out)
    assert all(a is b for a, b in zip(second, out))
    for name, a, b in zip(lenet_head.HeadStep._fields, first, second):
        assert torch.equal(a, b), name


def _record(N, device):
    """head_step's launches at batch N on `device` tensors (fake ones for CUDA), and its outputs' shapes."""
    with FakeTensorMode() if device == "cuda" else contextlib.nullcontext():
        x, *params = (torch.empty(s, device=device) for s in
                      ((N, 400), (120, 400), (120,), (84, 120), (84,), (10, 84), (10,)))
        target = torch.zeros(N, dtype=torch.int64, device=device)
        with _common.recording_launches() as launches:
            out = lenet_head.head_step(x, *params, target)
        return launches, [tuple(t.shape) for t in out]


@pytest.mark.parametrize("N", [64, 256, 1024])
def test_one_launch_on_a_gpu(N):
    """What the wrapper would launch for CUDA tensors (recorded on fake ones, no GPU needed)."""
    launches, shapes = _record(N, "cuda")
    assert [launch.kernel for launch in launches] == [lenet_head.lenet_head_step_kernel]
    P = -(-N // 16)
    assert launches[0].grid == (P,) and lenet_head.num_programs(N, 120, 10, on_gpu=True) == P
    assert shapes == [(N, 400), (P, 120, 400), (P, 120), (P, 84, 120), (P, 84), (P, 10, 84), (P, 10), (P,), (P,), (P,)]


@pytest.mark.parametrize("N", [1, 64])
def test_one_launch_on_the_cpu(N):
    launches, shapes = _record(N, "cpu")
    assert [launch.kernel for launch in launches] == [lenet_head.lenet_head_step_kernel]
    assert launches[0].grid == (lenet_head.num_programs(N, 120, 10, on_gpu=False),) == (shapes[-1][0],)


def test_rejects_bad_arguments():
    x, params, target = inputs(4, seed=5)
    if DEVICE == "cpu":  # checked on the CPU only: on a GPU it would cost a host sync
        with pytest.raises(IndexError):
            step(x, params, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError):
        step(x[:, :399], params, target)
    with pytest.raises(TypeError):
        step(x.double(), params, target)
    with pytest.raises(ValueError):
        step(x, params, target, out=lenet_head.empty_outputs(5, 400, 120, 84, 10, DEVICE))

