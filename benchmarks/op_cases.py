"""Per-op benchmark cases at LeNet's shapes: each op of lenet_fast.ops.OPS against its stock composite.

A case builds its inputs for a batch size and returns callables for "forward" and
"forward+backward" per contender, so the suite (benchmarks.run) and the
pytest-benchmark file (test_bench_ops.py) time exactly the same work.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from lenet_fast import backends, ops
from lenet_fast.model import CONV_STAGES, HEAD_STAGES, IMAGE_SHAPE, NUM_CLASSES
from lenet_fast.ops import OpDef

BATCHES = (64, 256, 1024)


@dataclasses.dataclass
class OpCase:
    name: str          # e.g. "conv3x3_relu_maxpool2x2/conv1"
    op: OpDef          # the op of lenet_fast.ops.OPS
    make_inputs: Callable[[int, torch.device], tuple]
    args: Callable[..., tuple]  # inputs -> the op's arguments (lenet_fast.ops: the backend arguments)

    def stock(self, *inputs):
        """The op's stock composite (its `reference`): the loss alone for the head."""
        return _first(self.op.reference(*self.args(*inputs)))

    def fused(self, backend: str) -> Callable:
        """The op on `backend`, as LeNet calls it (arguments already valid)."""
        def run(*inputs):
            impl = backends.implementation(backend, inputs[0].device, inputs[0].dtype)
            return _first(impl.run(self.op, *self.args(*inputs)))
        return run


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _generator():
    return torch.Generator().manual_seed(0)


def _conv_inputs(c_in, size, c_out, input_grad):
    def make(batch, device):
        g = _generator()
        x = torch.randn(batch, c_in, size, size, generator=g).to(device).requires_grad_(input_grad)
        w = (torch.randn(c_out, c_in, 3, 3, generator=g) / (3 * c_in**0.5)).to(device).requires_grad_()
        b = (0.1 * torch.randn(c_out, generator=g)).to(device).requires_grad_()
        return x, w, b
    return make


def _pool_inputs(channels, size):
    def make(batch, device):
        return (torch.randn(batch, channels, size, size, generator=_generator()).to(device).requires_grad_(),)
    return make


def _linear_inputs(n_in, n_out):
    def make(batch, device):
        g = _generator()
        x = torch.randn(batch, n_in, generator=g).to(device).requires_grad_()
        w = (torch.randn(n_out, n_in, generator=g) / n_in**0.5).to(device).requires_grad_()
        b = (0.1 * torch.randn(n_out, generator=g)).to(device).requires_grad_()
        return x, w, b
    return make


def _head_inputs(batch, device):
    """LeNet's classifier head: the features, then (weight, bias) per linear stage, then the labels."""
    g = _generator()
    fan_in = HEAD_STAGES[0].in_features
    tensors = [torch.randn(batch, fan_in, generator=g)]
    for stage in HEAD_STAGES:
        tensors += [torch.randn(stage.out_features, fan_in, generator=g) / fan_in**0.5,
                    0.1 * torch.randn(stage.out_features, generator=g)]
        fan_in = stage.out_features
    tensors = [t.to(device).requires_grad_() for t in tensors]
    return (*tensors, torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device))


def _cases() -> list[OpCase]:
    """Every op at the shapes LeNet (lenet_fast.model.STAGES) gives it."""
    cases, size = [], IMAGE_SHAPE[-1]
    for i, stage in enumerate(CONV_STAGES):
        # LeNet's first layer needs no input gradient (the images are data).
        conv = _conv_inputs(stage.in_channels, size, stage.out_channels, input_grad=i > 0)
        conv_args = lambda x, w, b, pad=stage.padding: (x, w, b, pad)  # noqa: E731
        conv_size = size + 2 * stage.padding - 2
        cases += [OpCase(f"conv3x3_relu/{stage.name}", ops.CONV3X3_RELU, conv, conv_args),
                  OpCase(f"maxpool2x2/pool{i + 1}", ops.MAXPOOL2X2, _pool_inputs(stage.out_channels, conv_size),
                         lambda x: (x,)),
                  OpCase(f"conv3x3_relu_maxpool2x2/{stage.name}", ops.CONV3X3_RELU_MAXPOOL2X2, conv, conv_args)]
        size = conv_size // 2
    for stage in HEAD_STAGES:
        cases.append(OpCase(f"linear{'_relu' if stage.relu else ''}/{stage.name}", ops.LINEAR,
                            _linear_inputs(stage.in_features, stage.out_features),
                            lambda x, w, b, relu=stage.relu: (x, w, b, relu)))
    # The linear stages and the cross-entropy loss: one op against five stock ones.
    cases.append(OpCase("mlp_cross_entropy/head", ops.MLP_CROSS_ENTROPY, _head_inputs,
                        lambda x, *params_target: (x, list(params_target[0:-1:2]), list(params_target[1:-1:2]),
                                                   params_target[-1])))
    cases.sort(key=lambda case: ops.OPS.index(case.op))
    return cases


CASES = _cases()


def runners(fn: Callable, inputs: tuple) -> dict[str, Callable[[], object]]:
    """{"forward": ..., "forward+backward": ...} closures over fixed inputs."""
    needs_grad = [t for t in inputs if t.requires_grad]

    def forward():
        with torch.no_grad():
            return fn(*inputs)

    def forward_backward():
        out = fn(*inputs)
        return torch.autograd.grad(out, needs_grad, torch.ones_like(out))

    return {"forward": forward, "forward+backward": forward_backward}
