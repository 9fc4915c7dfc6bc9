"""The seed's LeNet, on any backend, with the parameter names of the stock model.

`LeNet` keeps its parameters in ordinary `nn.Conv2d` / `nn.Linear` submodules
(conv1, conv2, fc1, fc2, fc3), so it initialises exactly like the stock model
and its state_dict loads into `TorchLeNet` (plain torch.nn) and back.  Only the
forward pass differs: it calls the fused ops of its backend (see `lenet_fast.ops`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)


def _make_layers(module: nn.Module) -> None:
    module.conv1 = nn.Conv2d(1, 6, kernel_size=3)    # 1x28x28 -> 6x26x26 -> pool -> 6x13x13
    module.conv2 = nn.Conv2d(6, 16, kernel_size=3)   # 6x13x13 -> 16x11x11 -> pool -> 16x5x5
    module.fc1 = nn.Linear(16 * 5 * 5, 120)
    module.fc2 = nn.Linear(120, 84)
    module.fc3 = nn.Linear(84, NUM_CLASSES)


class TorchLeNet(nn.Module):
    """The seed's LeNet written with stock torch.nn layers only: the reference model."""

    def __init__(self) -> None:
        super().__init__()
        _make_layers(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet(nn.Module):
    """The seed's LeNet whose forward runs on the fused ops of `backend`.

    backend: "auto" (best for the input's device), "torch", "triton" or "ext";
    see `lenet_fast.available_backends()`.
    """

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        if backend != "auto":
            backends.get_backend(backend)  # an unknown name fails here, not at the first forward
        self.backend = backend
        _make_layers(self)

    def resolved_backend(self, device: torch.device | str | None = None) -> str:
        """The concrete backend the forward pass uses on `device` (default: the parameters')."""
        device = self.conv1.weight.device if device is None else device
        return backends.resolve(self.backend, device, self.conv1.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl, x, (w1, b1, w2, b2, w3, b3) = self._features(x)
        x = impl.linear(torch.flatten(x, 1), w1, b1, True)
        x = impl.linear(x, w2, b2, True)
        return impl.linear(x, w3, b3, False)

    def forward_with_loss(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross_entropy(self(x), target), self(x)) with the classifier head and the loss
        fused into one op (`lenet_fast.ops.mlp_cross_entropy`): what training calls."""
        impl, features, head = self._features(x)
        self._check_target(x, target)
        # The features go in unflattened: the head op flattens it without an autograd node of its own.
        return impl.mlp_cross_entropy(features, list(head[0::2]), list(head[1::2]), target)

    def _features(self, x: torch.Tensor):
        """(backend implementation, conv features (N, 16, 5, 5), the head's six parameters)
        after checking x once."""
        # The layers' arguments are this module's own parameters, whose shapes
        # nn.Conv2d / nn.Linear fix, so only x is checked, once, against them;
        # the backend's functions are then called directly: re-validating every
        # layer through lenet_fast.ops made an ext training step measurably slower
        # (docs/measurements-behind-the-code.md).
        w1, b1, w2, b2, *head = self._layer_parameters()
        self._check_input(x, w1)
        impl = backends.implementation(self.backend, x.device, x.dtype)
        x = impl.conv3x3_relu_maxpool2x2(x, w1, b1, 0)
        x = impl.conv3x3_relu_maxpool2x2(x, w2, b2, 0)
        return impl, x, head

    @staticmethod
    def _check_input(x, conv1_weight: torch.Tensor) -> None:
        """TypeError/ValueError unless x is images (N, 1, 28, 28) of the parameters' dtype and device."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"LeNet expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"LeNet expects x of shape (N, 1, 28, 28), got {tuple(x.shape)}")
        w = conv1_weight
        if x.device != w.device or x.dtype != w.dtype:
            raise ValueError(
                f"x is {x.dtype} on {x.device} but the model's parameters are {w.dtype} on {w.device}; "
                "move one to match (model.to(...) or x.to(...))"
            )

    @staticmethod
    def _check_target(x: torch.Tensor, target) -> None:
        """ValueError unless target is int64 class indices (N,) on x's device."""
        if not (isinstance(target, torch.Tensor) and target.dtype == torch.int64
                and target.shape == x.shape[:1] and target.device == x.device):
            got = (f"{target.dtype} of shape {tuple(target.shape)} on {target.device}"
                   if isinstance(target, torch.Tensor) else type(target).__name__)
            raise ValueError(f"target must be int64 of shape ({x.shape[0]},) on {x.device}, got {got}")

    def _layer_parameters(self) -> list:
        """[weight, bias] of conv1, conv2, fc1, fc2, fc3, in that order."""
        # Read from the layers' parameter dicts: `self.fc1.weight` goes through
        # nn.Module.__getattr__ twice, ten times a step, which shows at LeNet's size
        # (docs/measurements-behind-the-code.md); getattr remains the fallback for a
        # parametrized weight.
        layers = self._modules
        return [
            layer._parameters[kind] if kind in layer._parameters else getattr(layer, kind)
            for layer in (layers["conv1"], layers["conv2"], layers["fc1"], layers["fc2"], layers["fc3"])
            for kind in ("weight", "bias")
        ]

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
