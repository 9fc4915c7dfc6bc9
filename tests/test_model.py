"""LeNet: shapes, state_dict interchange with the stock torch.nn model, and a training
step on every backend matching the torch reference (loss and every gradient)."""

import pytest
import torch

import lenet_fast
from helpers import assert_close_scaled, exact_tensor
from lenet_fast import LeNet, TorchLeNet

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


def training_step(backend, device, state, images, labels, fused_head=False):
    model = LeNet(backend=backend).to(device, images.dtype)
    model.load_state_dict(state)
    if fused_head:
        loss, _ = model.forward_with_loss(images.to(device), labels.to(device))
    else:
        loss = torch.nn.functional.cross_entropy(model(images.to(device)), labels.to(device))
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("fused_head", [False, True], ids=["forward", "forward_with_loss"])
def test_training_step_matches_torch(backend_device, fused_head):
    backend, device = backend_device
    state, images, labels = exact_model_and_batch()
    ref_loss, ref_grads = training_step("torch", "cpu", {k: v.double() for k, v in state.items()},
                                        images.double(), labels)
    loss, grads = training_step(backend, device, state, images, labels, fused_head)
    assert_close_scaled(loss, ref_loss, 1e-5, "loss")
    for name, ref in ref_grads.items():
        assert_close_scaled(grads[name], ref, 5e-5, f"grad of {name}")


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
    torch.testing.assert_close(ours(x), stock(x))
    torch.testing.assert_close(ours.forward_with_loss(x, y)[0], torch.nn.functional.cross_entropy(stock(x), y))


def test_rejects_bad_target():
    model, x = LeNet(backend="torch"), torch.randn(2, 1, 28, 28)
    for target in (torch.tensor([1.0, 2.0]), torch.tensor([1, 2, 3]), [1, 2]):
        with pytest.raises(ValueError, match=r"target must be int64 of shape \(2,\)"):
            model.forward_with_loss(x, target)


def test_model_moves_between_devices_with_auto_backend():
    model = LeNet()
    assert model.resolved_backend("cpu") in lenet_fast.available_backends()
