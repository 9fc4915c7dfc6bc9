"""A triton LeNet's whole SGD step in four Triton launches (kernels/lenet_step.py) against the
torch backend's step, and its kernel count: on the GPU when there is one (compiled kernels),
else on the CPU under the Triton interpreter."""

import pytest
import torch

from helpers import assert_close_scaled
from lenet_fast import backends, fused_step
from lenet_fast.kernels import lenet_step
from lenet_fast.model import LeNet
from lenet_fast.optim import FusedSGD
from lenet_fast.training import TrainingStep, lr_holder, train_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if backends.unavailable_reason("triton", DEVICE) is not None:  # pragma: no cover
    pytest.skip(backends.unavailable_reason("triton", DEVICE), allow_module_level=True)

# Parameters after three steps, relative to max(1, max|torch's|): the steps differ from
# torch's only by summation order.
PARAM_REL = 1e-5


@pytest.fixture
def spy(monkeypatch):
    """The batch sizes the four-launch step ran for."""
    calls = []
    original = lenet_step.sgd_train_step

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(lenet_step, "sgd_train_step", counting)
    return calls


def _pair(seed=0, **sgd):
    torch.manual_seed(seed)
    fused = LeNet("triton").to(DEVICE)
    reference = LeNet("torch").to(DEVICE)
    reference.load_state_dict(fused.state_dict())
    hyper = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4) | sgd
    return (fused, FusedSGD(fused.parameters(), **hyper)), (reference, FusedSGD(reference.parameters(), **hyper))


def _batches(batch, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g))
               for _ in range(steps)]
    return [(x.to(DEVICE), y.to(DEVICE)) for x, y in batches]


def _run(model, optimizer, batches):
    return [tuple(t.clone() for t in train_step(model, optimizer, x, y)) for x, y in batches]


@pytest.mark.parametrize("batch", [64, 37, 1, 129])
def test_three_steps_match_the_torch_backend(batch, spy):
    (fused, fused_opt), (reference, reference_opt) = _pair()
    batches = _batches(batch, 4)
    # The first step creates the momentum buffers (torch.optim's path); the next three are whole steps.
    got, want = _run(fused, fused_opt, batches), _run(reference, reference_opt, batches)
    assert spy == [batch] * 3
    for (loss, correct), (ref_loss, ref_correct) in zip(got, want):
        assert_close_scaled(loss, ref_loss, PARAM_REL, "loss")
        assert correct.dtype == torch.int64 and int(correct) == int(ref_correct)
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        assert_close_scaled(p, q, PARAM_REL, name)
        assert_close_scaled(p.grad, q.grad, PARAM_REL, f"{name}.grad")
    for p, q in zip(fused.parameters(), reference.parameters()):
        assert_close_scaled(fused_opt.state[p]["momentum_buffer"], reference_opt.state[q]["momentum_buffer"],
                            PARAM_REL, "momentum buffer")


def test_bitwise_the_same_on_a_second_run():
    runs = []
    for _ in range(2):
        (model, optimizer), _ = _pair(seed=3, nesterov=False, dampening=0.1, weight_decay=0.0)
        results = _run(model, optimizer, _batches(37, 3))
        runs.append((results, [p.detach().clone() for p in model.parameters()]))
    (first, params_1), (second, params_2) = runs
    for a, b in zip(first, second):
        assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert all(torch.equal(p, q) for p, q in zip(params_1, params_2))


def test_ignored_targets_and_maximize_match_the_torch_backend(spy):
    (fused, fused_opt), (reference, reference_opt) = _pair(maximize=True)
    batches = _batches(16, 2)
    batches[1][1][::3] = -100
    got, want = _run(fused, fused_opt, batches), _run(reference, reference_opt, batches)
    assert spy == [16]
    assert_close_scaled(got[1][0], want[1][0], PARAM_REL, "loss")
    for p, q in zip(fused.parameters(), reference.parameters()):
        assert_close_scaled(p, q, PARAM_REL, "parameter")


def test_the_graphed_step_logic_takes_it_with_the_learning_rate_in_a_tensor(spy):
    """TrainingStep(cuda_graph=True): on a GPU the captured graphs, on the CPU the capture's code
    run eagerly on static buffers; the whole step with lr read from the tensor either way."""
    torch.manual_seed(0)
    graphed, eager = LeNet("triton").to(DEVICE), LeNet("triton").to(DEVICE)
    eager.load_state_dict(graphed.state_dict())
    graphed_opt = FusedSGD(graphed.parameters(), lr=lr_holder(0.05, DEVICE, True), momentum=0.9, nesterov=True)
    eager_opt = FusedSGD(eager.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    batches = _batches(8, 3)
    step = TrainingStep(graphed, graphed_opt, cuda_graph=True, batch_sizes=[8])
    set_up = len(spy)  # warm-up steps, and on a GPU the capture
    spy.clear()
    for i, (x, y) in enumerate(batches):
        for s, lr in ((step, 0.05 / (i + 1)), (None, 0.05 / (i + 1))):
            if s is None:
                eager_opt.param_groups[0]["lr"] = lr
                train_step(eager, eager_opt, x, y)
            else:
                s.set_lr(lr)
                s.step(x, y)
    # Every graphed step (a GPU replays them without Python) and every eager one but the first.
    assert set_up >= 1 and len(spy) == (0 if DEVICE == "cuda" else len(batches)) + len(batches) - 1
    for p, q in zip(graphed.parameters(), eager.parameters()):
        assert_close_scaled(p, q, PARAM_REL, "parameter")


@pytest.mark.parametrize("case", ["hook", "frozen", "no_momentum", "float64"])
def test_steps_aside_where_the_whole_step_would_change_the_result(case, spy):
    sgd = {"momentum": 0.0, "nesterov": False} if case == "no_momentum" else {}
    (model, optimizer), (reference, reference_opt) = _pair(**sgd)
    if case == "hook":
        model.fc1.weight.register_hook(lambda g: g * 2)
        reference.fc1.weight.register_hook(lambda g: g * 2)
    if case == "frozen":
        model.conv1.bias.requires_grad_(False)
        reference.conv1.bias.requires_grad_(False)
    batches = _batches(4, 2)
    if case == "float64":
        model.double()
        batches = [(x.double(), y) for x, y in batches]
        with pytest.raises(TypeError, match="supports float32"):
            _run(model, optimizer, batches)
        return
    _run(model, optimizer, batches)
    _run(reference, reference_opt, batches)
    assert spy == []
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_close_scaled(p, q, PARAM_REL, "parameter")
    assert fused_step.triton_sgd_step(model, optimizer, *batches[0]) is None


@pytest.mark.skipif(DEVICE == "cuda", reason="counted on the CPU (on a GPU: benchmarks.count_kernels)")
@pytest.mark.parametrize("batch", [64, 37])
def test_a_step_is_four_kernels(batch):
    """Triton launches plus every other non-view op of the step, counted on the CPU as a GPU
    would run it (benchmarks.count_kernels): at most six, and four as written."""
    from benchmarks.count_kernels import triton_step_kernels

    counted = triton_step_kernels(batch, repeats=1)
    assert counted["other_kernels"] == [] and counted["triton_launches"] == 4
    assert counted["kernels"] <= 6
