"""The fused LeNet SGD step (lenet_fast.fused_step, csrc/lenet_sgd_step.cpp) against the eager step.

The fused step claims to be the eager ext step without autograd's bookkeeping, so the
comparison is bitwise: losses, correct counts, gradients, momentum buffers and
parameters after several steps.  Where it does not apply it must do nothing at all and
leave the step to the eager path.
"""

import copy

import pytest
import torch

from lenet_fast import fused_step
from lenet_fast.model import LeNet
from lenet_fast.optim import FusedSGD, make_optimizer
from lenet_fast.training import train_step

try:
    from lenet_fast import ext_backend  # noqa: F401
except ImportError as exc:  # pragma: no cover
    pytest.skip(f"ext backend unavailable: {exc}", allow_module_level=True)


def _batch(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def _pair(dtype=torch.float32, **sgd):
    """Two identical ext LeNets, each with a FusedSGD whose next step takes its fast path
    (the first step creates the momentum buffers; after load_state_dict the general
    path runs once more)."""
    torch.manual_seed(0)
    model = LeNet(backend="ext").to(dtype)
    make = lambda m: FusedSGD(m.parameters(), lr=0.05, **{"momentum": 0.9, "nesterov": True, **sgd})  # noqa: E731
    optimizer = make(model)
    train_step(model, optimizer, *_batch(64, 99, dtype), fused=False)
    twin = copy.deepcopy(model)
    twin_optimizer = make(twin)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # (else the buffers are shared)
    for m, o in ((model, optimizer), (twin, twin_optimizer)):
        train_step(m, o, *_batch(8, 98, dtype), fused=False)
    return (model, optimizer), (twin, twin_optimizer)


def _state(model, optimizer):
    params = list(model.parameters())
    return ([p.detach().clone() for p in params] + [p.grad.clone() for p in params]
            + [optimizer.state[p]["momentum_buffer"].clone() for p in params])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sgd", [{}, {"nesterov": False, "dampening": 0.1, "weight_decay": 1e-3},
                                 {"weight_decay": 5e-4, "maximize": True}],
                         ids=["nesterov", "dampening-decay", "maximize"])
def test_fused_step_is_bitwise_the_eager_step(dtype, sgd):
    (eager, eager_opt), (fused, fused_opt) = _pair(dtype, **sgd)
    for step, (n, lr) in enumerate([(64, 0.05), (64, 0.02), (1, 0.01), (37, 0.003)]):
        x, y = _batch(n, step, dtype)
        for optimizer in (eager_opt, fused_opt):
            optimizer.param_groups[0]["lr"] = lr
        want = train_step(eager, eager_opt, x, y, fused=False)
        got = fused_step.ext_sgd_step(fused, fused_opt, x, y)
        assert got is not None, f"step {step}: the fused step stepped aside"
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"step {step}: loss or count"
        for i, (a, b) in enumerate(zip(_state(fused, fused_opt), _state(eager, eager_opt))):
            assert torch.equal(a, b), f"step {step}: state tensor {i} differs"


def test_train_step_takes_the_fused_path():
    (model, optimizer), _ = _pair()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:  # the ops called
        train_step(model, optimizer, *_batch(4, 1))
    calls = [e.name for e in prof.events() if e.name == "lenet_fast::ext_lenet_sgd_step"]
    assert calls == ["lenet_fast::ext_lenet_sgd_step"]


def _not_applicable_cases():
    def first_step(m, o, x, y):
        return m, make_optimizer(m.parameters(), "sgd", 0.01), x, y

    def torch_sgd(m, o, x, y):
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        return m, opt, x, y

    def optimizer_hook(m, o, x, y):
        o.register_step_pre_hook(lambda *a: None)
        return m, o, x, y

    def tensor_hook(m, o, x, y):
        m.fc2.weight.register_hook(lambda g: g)
        return m, o, x, y

    def accumulate_hook(m, o, x, y):
        m.conv1.bias.register_post_accumulate_grad_hook(lambda p: None)
        return m, o, x, y

    def frozen(m, o, x, y):
        m.conv1.weight.requires_grad_(False)
        return m, o, x, y

    def x_wants_grad(m, o, x, y):
        return m, o, x.requires_grad_(), y

    def tensor_lr(m, o, x, y):
        o.param_groups[0]["lr"] = torch.tensor(0.01)
        return m, o, x, y

    def torch_backend(m, o, x, y):
        m.backend = "torch"
        return m, o, x, y

    def wrong_shape(m, o, x, y):
        return m, o, x[:, :, :27], y

    return {f.__name__: f for f in (first_step, torch_sgd, optimizer_hook, tensor_hook, accumulate_hook, frozen,
                                     x_wants_grad, tensor_lr, torch_backend, wrong_shape)}


@pytest.mark.parametrize("case", list(_not_applicable_cases()))
def test_fused_step_steps_aside_and_changes_nothing(case):
    """Anything the eager step would do besides the kernels, or reject, sends it there."""
    (model, optimizer), _ = _pair()
    model, optimizer, x, y = _not_applicable_cases()[case](model, optimizer, *_batch(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    # Through the model's backend, as train_step goes: only the ext backend's step is fused_step's.
    assert model.implementation().train_step(model, optimizer, x, y) is None
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("mode", ["no_grad", "anomaly"])
def test_fused_step_steps_aside_under_grad_modes(mode):
    (model, optimizer), _ = _pair()
    context = torch.no_grad() if mode == "no_grad" else torch.autograd.detect_anomaly()
    with context:
        assert fused_step.ext_sgd_step(model, optimizer, *_batch(4, 3)) is None


def test_bad_target_raises_before_anything_changes():
    (model, optimizer), _ = _pair()
    x, y = _batch(4, 4)
    y[2] = 10
    before = _state(model, optimizer)
    with pytest.raises(IndexError, match="10"):
        train_step(model, optimizer, x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, _state(model, optimizer)))
