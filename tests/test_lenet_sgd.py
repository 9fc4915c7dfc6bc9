"""kernels/lenet_sgd.py: gradients from partial sums, the SGD update, the step's loss and
correct count, in one launch, against torch.optim.SGD(fused=False).

The optimizer under comparison gets, as its .grad, exactly the gradient the kernel
reduced (itself checked against a float64 sum of the partials), after a first stock
step that created its momentum buffers; both then take the same step from the same
state.  The results agree to PARAM_REL relative to each tensor's scale, not bitwise:
ATen's CPU kernels compute add(a, b, alpha) as one fused multiply-add, the Triton
interpreter as a product and a sum, each rounded (about 5% of the elements differ in
the last bits, most where p - lr * d nearly cancels).  Without a GPU the kernel runs
under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors; the stock optimizer always
runs on the CPU.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from lenet_fast.kernels import _common, lenet_head, lenet_sgd
from lenet_fast.model import STAGES, ConvStage

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU, or TRITON_INTERPRET=1 for CPU tensors", allow_module_level=True)
# The interpreter's numpy arithmetic warns about the 0 / 0 of a batch with no counted row.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# LeNet's ten parameters, in the model's order.
SHAPES = [shape for stage in STAGES for shape in (
    ((stage.out_channels, stage.in_channels, 3, 3), (stage.out_channels,)) if isinstance(stage, ConvStage)
    else ((stage.out_features, stage.in_features), (stage.out_features,)))]
# Partials per parameter: several, one, none (a zero gradient), more than four (the loop's tail).
PARTIALS = [3, 0, 5, 1, 4, 4, 7, 2, 4, 1]
PARAM_REL = 1e-6
GRAD_REL = 1e-6

SGD = {
    "nesterov": {"nesterov": True, "weight_decay": 5e-4},
    "plain": {"nesterov": False, "weight_decay": 0.0},
    "decay-dampening": {"nesterov": False, "weight_decay": 1e-3, "dampening": 0.1},
    "maximize": {"nesterov": True, "weight_decay": 5e-4, "maximize": True},
}


def rel_err(got, want):
    want = want.detach().double()
    return ((got.detach().double() - want).abs().max() / max(1.0, want.abs().max().item())).item()


def setup(seed, momentum=0.9, shapes=SHAPES, partials=PARTIALS, **sgd):
    """(stock params, their SGD after a first step, partials, loss/count/correct partials)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    opt = torch.optim.SGD(params, lr=0.05, momentum=momentum, fused=False, **sgd)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()  # creates the momentum buffers
    parts = [torch.randn((P, *s), generator=g) for P, s in zip(partials, shapes)]
    heads = (torch.rand(5, generator=g) * 10, torch.tensor([16, 16, 16, 16, 3], dtype=torch.int32),
             torch.tensor([3, 0, 9, 16, 1], dtype=torch.int32))
    return params, opt, parts, heads


def run(params, opt, parts, heads, lr, sgd, momentum=0.9, grad_scale=None):
    """sgd_update on DEVICE copies of the stock state: (params, grads_out, buffers, loss, correct,
    launches), back on the CPU."""
    mine = [p.detach().to(DEVICE, copy=True) for p in params]
    bufs = [opt.state[p]["momentum_buffer"].to(DEVICE, copy=True) for p in params] if momentum else None
    grads = [torch.full_like(p, float("nan")) for p in mine]
    loss, correct = torch.empty((), device=DEVICE), torch.empty((), dtype=torch.int64, device=DEVICE)
    parts = [q.to(DEVICE) for q in parts]
    heads = [t.to(DEVICE) for t in heads]
    lr = lr.to(DEVICE) if isinstance(lr, torch.Tensor) else lr
    grad_scale = grad_scale.to(DEVICE) if isinstance(grad_scale, torch.Tensor) else grad_scale
    real_launch, launched = lenet_sgd.launch, []

    def counting_launch(kernel, grid, *args, **kwargs):
        launched.append(kernel)
        real_launch(kernel, grid, *args, **kwargs)

    lenet_sgd.launch = counting_launch
    try:
        lenet_sgd.sgd_update(mine, grads, bufs, parts, lr, momentum, sgd.get("dampening", 0.0),
                             sgd.get("weight_decay", 0.0), sgd.get("nesterov", False), sgd.get("maximize", False),
                             *heads, loss, correct, grad_scale=grad_scale)
    finally:
        lenet_sgd.launch = real_launch
    cpu = [[t.cpu() for t in mine], [t.cpu() for t in grads], bufs and [t.cpu() for t in bufs]]
    return (*cpu, loss.cpu(), correct.cpu(), launched)


def stock_step(params, opt, grads, lr):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.param_groups[0]["lr"] = lr
    opt.step()


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("name", list(SGD))
def test_matches_torch_sgd(name, lr_kind):
    sgd = SGD[name]
    params, opt, parts, heads = setup(1, **sgd)
    lr = 0.03 if lr_kind == "float" else torch.tensor(0.03)
    mine, grads, bufs, loss, correct, launches = run(params, opt, parts, heads, lr, sgd)
    assert launches == [lenet_sgd.lenet_sgd_kernel]

    count = int(heads[1].sum())
    for i, (g, q) in enumerate(zip(grads, parts)):
        want = q.double().sum(0) / count
        assert rel_err(g, want) <= GRAD_REL, f"grad {i}"
        if q.shape[0] == 0:
            assert torch.equal(g, torch.zeros_like(g)), f"grad {i} of no partials"
    assert torch.allclose(loss.double(), heads[0].double().sum() / count, rtol=1e-6)
    assert correct.item() == int(heads[2].sum()) and correct.dtype == torch.int64

    stock_step(params, opt, grads, 0.03)
    for i, (p, b, ref) in enumerate(zip(mine, bufs, params)):
        assert rel_err(p, ref) <= PARAM_REL, f"param {i}"
        assert rel_err(b, opt.state[ref]["momentum_buffer"]) <= PARAM_REL, f"momentum buffer {i}"


def test_tensor_lr_is_read_when_the_kernel_runs():
    sgd = SGD["nesterov"]
    params, opt, parts, heads = setup(3, **sgd)
    lr = torch.tensor(0.1)
    lr.fill_(0.004)
    mine, grads, *_ = run(params, opt, parts, heads, lr, sgd)
    stock_step(params, opt, grads, 0.004)
    for p, ref in zip(mine, params):
        assert rel_err(p, ref) <= PARAM_REL


@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_grad_scale_replaces_one_over_count(kind):
    params, opt, parts, heads = setup(4, **SGD["plain"])
    scale = 0.25 if kind == "float" else torch.tensor(0.25)
    _, grads, *_ = run(params, opt, parts, heads, 0.05, SGD["plain"], grad_scale=scale)
    for g, q in zip(grads, parts):
        assert rel_err(g, q.double().sum(0) * 0.25) <= GRAD_REL


def test_no_counted_row_gives_nan_loss_and_zero_gradients():
    """All of a batch's rows ignored: the head writes zero partials and a zero count."""
    params, opt, parts, heads = setup(5, **SGD["nesterov"])
    parts = [torch.zeros_like(q) for q in parts]
    heads = (torch.zeros(4), torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int32))
    mine, grads, _, loss, correct, _ = run(params, opt, parts, heads, 0.05, SGD["nesterov"])
    assert torch.isnan(loss) and correct.item() == 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    stock_step(params, opt, grads, 0.05)
    for p, ref in zip(mine, params):
        assert rel_err(p, ref) <= PARAM_REL


def test_momentum_0_updates_without_buffers():
    params, opt, parts, heads = setup(6, momentum=0.0, weight_decay=1e-3)
    mine, grads, *_ = run(params, opt, parts, heads, 0.05, {"weight_decay": 1e-3}, momentum=0.0)
    stock_step(params, opt, grads, 0.05)
    for p, ref in zip(mine, params):
        assert rel_err(p, ref) <= PARAM_REL


def test_bitwise_deterministic():
    params, opt, parts, heads = setup(7, **SGD["nesterov"])
    first = run(params, opt, parts, heads, 0.05, SGD["nesterov"])
    second = run(params, opt, parts, heads, 0.05, SGD["nesterov"])
    for a, b in zip(first[:3], second[:3]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(first[3], second[3]) and torch.equal(first[4], second[4])


def test_more_params_than_slots_take_one_launch_per_slot_group():
    n = lenet_sgd.MAX_PARAMS + 3
    shapes = [(i + 1, 3) for i in range(n)]
    params, opt, parts, heads = setup(8, shapes=shapes, partials=[i % 6 for i in range(n)], **SGD["nesterov"])
    mine, grads, _, _, correct, launches = run(params, opt, parts, heads, 0.05, SGD["nesterov"])
    assert len(launches) == 2
    assert correct.item() == int(heads[2].sum())
    stock_step(params, opt, grads, 0.05)
    for p, ref in zip(mine, params):
        assert rel_err(p, ref) <= PARAM_REL


@pytest.mark.parametrize("N", [64, 256, 1024])
def test_one_launch_on_a_gpu(N):
    """What the wrapper would launch for CUDA tensors (recorded on fake ones, no GPU needed):
    one launch, a program per 512 elements of each parameter and one for the loss."""
    with FakeTensorMode():
        def cuda(*shape, dtype=torch.float32):
            return torch.empty(shape, device="cuda", dtype=dtype)

        P = -(-N // 16)
        params = [cuda(*s) for s in SHAPES]
        with _common.recording_launches() as launches:
            lenet_sgd.sgd_update(params, [cuda(*s) for s in SHAPES], [cuda(*s) for s in SHAPES],
                                 [cuda(N if i < 4 else P, *s) for i, s in enumerate(SHAPES)], cuda(), 0.9, 0.0,
                                 5e-4, True, False, cuda(P), cuda(P, dtype=torch.int32), cuda(P, dtype=torch.int32),
                                 cuda(), cuda(dtype=torch.int64))
    assert [launch.kernel for launch in launches] == [lenet_sgd.lenet_sgd_kernel]
    assert launches[0].grid == (sum(-(-p.numel() // 512) for p in params) + 1,)


def test_rejects_mismatched_partials():
    params, opt, parts, heads = setup(9, **SGD["plain"])
    parts[4] = parts[4][:, :, :399]
    with pytest.raises(ValueError):
        run(params, opt, parts, heads, 0.05, SGD["plain"])


def test_head_step_then_sgd_update_is_a_stock_training_step_of_the_head():
    """The two kernels together: head_step's partials and counts, reduced and applied by
    sgd_update, against stock autograd of the mean loss and torch.optim.SGD."""
    g = torch.Generator().manual_seed(10)
    head = [s for s in STAGES if not isinstance(s, ConvStage)]
    layers = [torch.nn.Linear(s.in_features, s.out_features) for s in head]
    params = [p for layer in layers for p in (layer.weight, layer.bias)]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=False)
    x = torch.randn(37, head[0].in_features, generator=g).relu()
    target = torch.randint(0, head[-1].out_features, (37,), generator=g)
    target[::6] = lenet_head.IGNORE_INDEX

    def stock_loss():
        h = x
        for i, layer in enumerate(layers):
            h = layer(h) if i == len(layers) - 1 else F.relu(layer(h))
        return F.cross_entropy(h, target), h

    opt.zero_grad()
    stock_loss()[0].backward()
    opt.step()  # momentum buffers
    mine = [p.detach().to(DEVICE, copy=True) for p in params]
    bufs = [opt.state[p]["momentum_buffer"].to(DEVICE, copy=True) for p in params]
    out = lenet_head.head_step(x.to(DEVICE), *mine, target.to(DEVICE))
    grads = [torch.empty_like(p) for p in mine]
    loss, correct = torch.empty((), device=DEVICE), torch.empty((), dtype=torch.int64, device=DEVICE)
    lenet_sgd.sgd_update(mine, grads, bufs, out.partials(), 0.05, 0.9, 0.0, 5e-4, True, False,
                         out.loss_part, out.count_part, out.correct_part, loss, correct)
    mine, bufs, grads = ([t.cpu() for t in ts] for ts in (mine, bufs, grads))
    opt.zero_grad()
    ref_loss, logits = stock_loss()
    ref_loss.backward()
    ref_grads = [p.grad.clone() for p in params]
    opt.step()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    assert correct.item() == int((logits.argmax(1) == target).sum())
    for i, (gg, ref) in enumerate(zip(grads, ref_grads)):
        assert rel_err(gg, ref) <= 1e-5, f"grad {i}"
    for i, (p, ref) in enumerate(zip(mine, params)):
        assert rel_err(p, ref) <= 1e-5, f"param {i}"
    for i, (b, ref) in enumerate(zip(bufs, params)):
        assert rel_err(b, opt.state[ref]["momentum_buffer"]) <= 1e-5, f"momentum buffer {i}"
