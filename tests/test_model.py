"""LeNet: shapes, state_dict interchange with the stock torch.nn model, and training
steps on every backend matching the stock model's (loss, correct count, every gradient
and parameter)."""

import pytest
import torch

import lenet_fast
from helpers import FWD_REL, GRAD_REL, assert_close_scaled, exact_tensor
from lenet_fast import LeNet, TorchLeNet
from lenet_fast.optim import MOMENTUM, make_optimizer
from lenet_fast.training import train_step

STOCK_NAMES = {
    "conv1.weight": (6, 1, 3, 3), "conv1.bias": (6,),
    "conv2.weight": (16, 6, 3, 3), "conv2.bias": (16,),
    "fc1.weight": (120, 400), "fc1.bias": (120,),
    "fc2.weight": (84, 120), "fc2.bias": (84,),
    "fc3.weight": (10, 84), "fc3.bias": (10,),
}


def test_parameters_have_stock_names_and_shapes():
    assert {k: tuple(v.shape) for k, v in LeNet().state_dict().items()} == STOCK_NAMES
    assert {k: tuple(v.shape) for k, v in TorchLeNet().state_dict().items()} == STOCK_NAMES


@pytest.mark.parametrize("batch", [0, 1, 7])
def test_output_shape(batch):
    assert LeNet(backend="torch")(torch.zeros(batch, 1, 28, 28)).shape == (batch, 10)


def test_rejects_wrong_image_shape():
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\), got \(2, 3, 28, 28\)"):
        LeNet(backend="torch")(torch.zeros(2, 3, 28, 28))


def test_rejects_input_that_does_not_match_the_parameters():
    with pytest.raises(ValueError, match=r"x is torch.float64 on cpu but the model's parameters are torch.float32"):
        LeNet(backend="torch")(torch.zeros(2, 1, 28, 28, dtype=torch.float64))
    with pytest.raises(TypeError, match="expects a torch.Tensor, got list"):
        LeNet(backend="torch")([[0.0]])


def test_same_seed_same_init_as_stock():
    torch.manual_seed(0)
    ours = LeNet().state_dict()
    torch.manual_seed(0)
    stock = TorchLeNet().state_dict()
    assert all(torch.equal(ours[k], stock[k]) for k in STOCK_NAMES)


def test_state_dict_round_trip_with_stock_model():
    torch.manual_seed(1)
    x = torch.randn(5, 1, 28, 28)
    stock = TorchLeNet().eval()
    ours = LeNet(backend="torch")
    ours.load_state_dict(stock.state_dict())
    assert torch.equal(ours(x), stock(x))
    back = TorchLeNet()
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back(x), stock(x))


def exact_model_and_batch(batch=32, seed=0):
    """A LeNet with exact-arithmetic conv parameters and images (see helpers.exact_tensor):
    the conv stages are then bitwise equal on every backend, so pooling picks the
    same winners and the comparison measures the kernels, not tie-breaking noise."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    state = TorchLeNet().state_dict()
    for name in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"):
        state[name] = exact_tensor(tuple(state[name].shape), 0.125, generator=g)
    images = exact_tensor((batch, 1, 28, 28), 0.25, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    return state, images, labels


def training_step(backend, device, state, images, labels):
    """Forward, cross-entropy and backward of a LeNet on `backend` from `state`: (loss, grads)."""
    model = LeNet(backend=backend).to(device, images.dtype)
    model.load_state_dict(state)
    loss = torch.nn.functional.cross_entropy(model(images.to(device)), labels.to(device))
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters()}


# Where train_step's default (fused=True) takes the backend's whole-step path once the
# optimizer's momentum buffers exist (from the second step on): the ext backend's one op
# on the CPU, the triton backend's four launches.
WHOLE_STEP = {("ext", "cpu"), ("triton", "cpu"), ("triton", "cuda")}
LR, WEIGHT_DECAY = 0.05, 5e-4


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "op_by_op"])
def test_training_step_matches_torch(backend_device, fused, monkeypatch):
    """Two steps of lenet_fast.training.train_step (SGD with Nesterov momentum, as
    lenet_fast.train runs it) against the stock TorchLeNet's steps with torch.optim.SGD
    in float64 from the same state (and, op by op, LeNet.forward's logits and gradients).
    Stated tolerances: loss and logits FWD_REL; gradients and parameters GRAD_REL (a
    parameter moves by lr times its gradient); the correct count exactly (no two logits of
    a row are close enough at these seeds for rounding to change the argmax).
    Exact-arithmetic images and conv parameters make the first step's conv stages bitwise
    those of the reference, so the pooling winners agree."""
    backend, device = backend_device
    state, images, labels = exact_model_and_batch(batch=64)
    batches = [(images[:32], labels[:32]), (images[32:], labels[32:])]

    reference = TorchLeNet().double()
    reference.load_state_dict({k: v.double() for k, v in state.items()})
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                                    weight_decay=WEIGHT_DECAY)
    model = LeNet(backend=backend).to(device)
    model.load_state_dict(state)
    optimizer = make_optimizer(model.parameters(), "sgd", LR, weight_decay=WEIGHT_DECAY)

    impl, whole_steps = model.implementation(), []
    backend_train_step = impl.train_step

    def recording_train_step(*args):
        done = backend_train_step(*args)
        whole_steps.append(done is not None)
        return done

    if not fused:
        # LeNet.forward too (what inference runs: linear ops where training runs the fused
        # head), with stock cross_entropy and loss.backward(): logits and gradients.
        x, y = batches[0]
        logits, ref_logits = model(x.to(device)), reference(x.double())
        assert_close_scaled(logits, ref_logits, FWD_REL, "logits of LeNet.forward")
        torch.nn.functional.cross_entropy(logits, y.to(device)).backward()
        torch.nn.functional.cross_entropy(ref_logits, y).backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert_close_scaled(p.grad, q.grad, GRAD_REL, f"LeNet.forward: grad of {name}")

    monkeypatch.setattr(impl, "train_step", recording_train_step)
    for step, (x, y) in enumerate(batches):
        ref_loss, ref_correct = train_step(reference, ref_optimizer, x.double(), y)
        loss, correct = train_step(model, optimizer, x.to(device), y.to(device), fused=fused)
        assert loss.shape == () and loss.dtype == torch.float32 and loss.device.type == torch.device(device).type
        assert_close_scaled(loss, ref_loss, FWD_REL, f"step {step}: loss")
        assert correct.item() == ref_correct.item(), f"step {step}: correct count"
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert_close_scaled(p.grad, q.grad, GRAD_REL, f"step {step}: grad of {name}")
            assert_close_scaled(p, q, GRAD_REL, f"step {step}: {name} after the update")
    # fused=False never asks the backend for a whole step; with fused=True the first step
    # creates the momentum buffers, and the second must take the whole-step path where
    # there is one, or this test would not test it.
    if not fused:
        assert whole_steps == []
    else:
        assert whole_steps == [False, (backend, device) in WHOLE_STEP]


def test_backward_is_deterministic(backend_device, monkeypatch):
    """Same inputs, same backend: bitwise the same gradients (no float atomics).  Stock
    cuDNN is deterministic only when asked, so the test asks as lenet_fast.train does."""
    backend, device = backend_device
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    state, images, labels = exact_model_and_batch(seed=3)
    torch.manual_seed(3)
    state = {**state, **{k: v for k, v in TorchLeNet().state_dict().items() if k.startswith("fc")}}
    g = torch.Generator().manual_seed(3)
    images = images + torch.randn(images.shape, generator=g) * 0.01  # non-exact: rounding order matters
    first = training_step(backend, device, state, images, labels)
    second = training_step(backend, device, state, images, labels)
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), f"grad of {name} differs between runs"


def test_parametrized_weight_is_used():
    """LeNet reads its parameters from the layers' dicts for speed; a parametrized
    weight (torch.nn.utils.parametrize) must still be what the forward uses."""
    import torch.nn.utils.parametrize as parametrize

    class Doubled(torch.nn.Module):
        def forward(self, weight):
            return 2 * weight

    torch.manual_seed(4)
    stock, ours = TorchLeNet(), LeNet(backend="torch")
    ours.load_state_dict(stock.state_dict())
    for model in (stock, ours):
        parametrize.register_parametrization(model.fc1, "weight", Doubled())
    x, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 2, 3])
    assert torch.equal(ours(x), stock(x))  # the torch backend runs the stock functions
    assert torch.equal(ours.forward_with_loss(x, y)[0], torch.nn.functional.cross_entropy(stock(x), y))


def test_rejects_bad_target():
    model, x = LeNet(backend="torch"), torch.randn(2, 1, 28, 28)
    for target in (torch.tensor([1.0, 2.0]), torch.tensor([1, 2, 3]), [1, 2]):
        with pytest.raises(ValueError, match=r"target must be int64 of shape \(2,\)"):
            model.forward_with_loss(x, target)


def test_model_moves_between_devices_with_auto_backend():
    model = LeNet()
    assert model.resolved_backend("cpu") in lenet_fast.available_backends()
