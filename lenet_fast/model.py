"""The seed's LeNet, declared once as its list of stages, on any backend.

`STAGES` is the network: every model, fused training step and tool that needs
LeNet's layers (`TorchLeNet`, `LeNet`, the ext backend's one-op step,
`lenet_fast.compile_check`, the kernel counter) reads it instead of restating it.

Both models keep their parameters in ordinary `nn.Conv2d` / `nn.Linear`
submodules named after the stages (conv1, conv2, fc1, fc2, fc3), so `LeNet`
initialises exactly like the stock model and its state_dict loads into
`TorchLeNet` (plain torch.nn) and back.  Only the forward pass differs: `LeNet`
runs the fused ops of its backend (see `lenet_fast.ops`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends, ops


@dataclasses.dataclass(frozen=True)
class ConvStage:
    """conv 3x3 (stride 1) + bias + ReLU + max-pool 2x2: ops.conv3x3_relu_maxpool2x2."""

    name: str
    in_channels: int
    out_channels: int
    padding: int = 0

    def make(self) -> nn.Module:
        return nn.Conv2d(self.in_channels, self.out_channels, kernel_size=3, padding=self.padding)

    def stock(self, layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(layer(x)), 2)


@dataclasses.dataclass(frozen=True)
class LinearStage:
    """linear + bias (+ ReLU): ops.linear; the linear stages together form the head that
    training runs as one ops.mlp_cross_entropy (every stage but the last has relu)."""

    name: str
    in_features: int
    out_features: int
    relu: bool

    def make(self) -> nn.Module:
        return nn.Linear(self.in_features, self.out_features)

    def stock(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        x = layer(torch.flatten(x, 1))
        return F.relu(x) if self.relu else x


IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
STAGES: tuple[ConvStage | LinearStage, ...] = (
    ConvStage("conv1", 1, 6),        # 1x28x28 -> 6x26x26 -> pool -> 6x13x13
    ConvStage("conv2", 6, 16),       # 6x13x13 -> 16x11x11 -> pool -> 16x5x5
    LinearStage("fc1", 16 * 5 * 5, 120, relu=True),
    LinearStage("fc2", 120, 84, relu=True),
    LinearStage("fc3", 84, NUM_CLASSES, relu=False),
)
CONV_STAGES = tuple(s for s in STAGES if isinstance(s, ConvStage))
HEAD_STAGES = tuple(s for s in STAGES if isinstance(s, LinearStage))


class _Stages(nn.Module):
    """The stages' layers as submodules, and their parameters in stage order."""

    def __init__(self) -> None:
        super().__init__()
        for stage in STAGES:
            self.add_module(stage.name, stage.make())

    def stage_parameters(self) -> list[torch.Tensor]:
        """[weight, bias] of every stage, in STAGES order (conv1.weight, conv1.bias, ...)."""
        # Read from the layers' parameter dicts: `self.fc1.weight` goes through
        # nn.Module.__getattr__ twice, ten times a step, which shows at LeNet's size;
        # getattr remains the fallback for a parametrized weight.
        return [layer._parameters[kind] if kind in layer._parameters else getattr(layer, kind)
                for layer in self._modules.values() for kind in ("weight", "bias")]


class TorchLeNet(_Stages):
    """The seed's LeNet written with stock torch.nn layers only: the reference model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage, layer in zip(STAGES, self._modules.values()):
            x = stage.stock(layer, x)
        return x


class LeNet(_Stages):
    """The seed's LeNet whose forward runs on the fused ops of `backend`.

    backend: "auto" (best for the input's device), "torch", "triton" or "ext";
    see `lenet_fast.available_backends()`.
    """

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        if backend != "auto":
            backends.get_backend(backend)  # an unknown name fails here, not at the first forward
        self.backend = backend

    def resolved_backend(self, device: torch.device | str | None = None) -> str:
        """The concrete backend the forward pass uses on `device` (default: the parameters')."""
        device = self.conv1.weight.device if device is None else device
        return backends.resolve(self.backend, device, self.conv1.weight.dtype)

    def implementation(self) -> backends.Backend:
        """The backend this model runs on (for its parameters' device and dtype)."""
        weight = self.conv1.weight
        return backends.implementation(self.backend, weight.device, weight.dtype)

    def check_batch(self, x, target=None) -> None:
        """The model's input checks (lenet_fast.ops): TypeError/ValueError naming what is wrong."""
        ops.check_images(x, self.conv1.weight, IMAGE_SHAPE, "LeNet")
        if target is not None:
            ops.check_target(x, target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend, x, head = self._features(x)
        x = torch.flatten(x, 1)
        for stage, (weight, bias) in zip(HEAD_STAGES, zip(head[0::2], head[1::2])):
            x = backend.run(ops.LINEAR, x, weight, bias, stage.relu)
        return x

    def forward_with_loss(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross_entropy(self(x), target), self(x)) with the classifier head and the loss
        fused into one op (`lenet_fast.ops.mlp_cross_entropy`): what training calls."""
        backend, features, head = self._features(x, target)
        # The features go in unflattened: the head op flattens it without an autograd node of its own.
        return backend.run(ops.MLP_CROSS_ENTROPY, features, head[0::2], head[1::2], target)

    def _features(self, x: torch.Tensor, target=None):
        """(backend, the conv stages' output, the head's parameters) after checking x once.

        The layers' arguments are this module's own parameters, whose shapes
        nn.Conv2d / nn.Linear fix, so only x (and target) is checked, against them; the
        backend then runs the ops directly, without lenet_fast.ops re-validating each layer.
        """
        params = self.stage_parameters()
        self.check_batch(x, target)
        backend = backends.implementation(self.backend, x.device, x.dtype)
        for i, stage in enumerate(CONV_STAGES):
            x = backend.run(ops.CONV3X3_RELU_MAXPOOL2X2, x, params[2 * i], params[2 * i + 1], stage.padding)
        return backend, x, params[2 * len(CONV_STAGES):]

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
