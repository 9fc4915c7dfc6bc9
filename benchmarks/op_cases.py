"""Per-op benchmark cases at LeNet's shapes: each fused op against its stock composite.

A case builds its inputs for a batch size and returns callables for "forward" and
"forward+backward" per contender, so the suite (benchmarks.run) and the
pytest-benchmark file (test_bench_ops.py) time exactly the same work.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from lenet_fast import ops

BATCHES = (64, 256, 1024)


@dataclasses.dataclass
class OpCase:
    name: str          # e.g. "conv3x3_relu_maxpool2x2/conv1"
    op: str            # lenet_fast.ops function name
    make_inputs: Callable[[int, torch.device], tuple]
    stock: Callable    # the stock composite taking the same inputs
    fused: Callable    # (backend) -> function taking the same inputs


def _conv_inputs(c_in, size, c_out, input_grad):
    def make(batch, device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, c_in, size, size, generator=g).to(device).requires_grad_(input_grad)
        w = (torch.randn(c_out, c_in, 3, 3, generator=g) / (3 * c_in**0.5)).to(device).requires_grad_()
        b = (0.1 * torch.randn(c_out, generator=g)).to(device).requires_grad_()
        return x, w, b
    return make


def _pool_inputs(channels, size):
    def make(batch, device):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(batch, channels, size, size, generator=g).to(device).requires_grad_(),)
    return make


def _linear_inputs(n_in, n_out):
    def make(batch, device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, n_in, generator=g).to(device).requires_grad_()
        w = (torch.randn(n_out, n_in, generator=g) / n_in**0.5).to(device).requires_grad_()
        b = (0.1 * torch.randn(n_out, generator=g)).to(device).requires_grad_()
        return x, w, b
    return make


def _stock_linear(relu):
    return lambda x, w, b: F.relu(F.linear(x, w, b)) if relu else F.linear(x, w, b)


def _head_inputs(batch, device):
    """LeNet's classifier head: x (N, 400), then (weight, bias) of fc1, fc2, fc3, then the labels."""
    g = torch.Generator().manual_seed(0)
    tensors, fan_in = [torch.randn(batch, 400, generator=g)], 400
    for width in (120, 84, 10):
        tensors += [torch.randn(width, fan_in, generator=g) / fan_in**0.5, 0.1 * torch.randn(width, generator=g)]
        fan_in = width
    tensors = [t.to(device).requires_grad_() for t in tensors]
    return (*tensors, torch.randint(0, 10, (batch,), generator=g).to(device))


def _stock_head(x, w1, b1, w2, b2, w3, b3, target):
    h = F.relu(F.linear(F.relu(F.linear(x, w1, b1)), w2, b2))
    return F.cross_entropy(F.linear(h, w3, b3), target)


CASES = [
    # LeNet's first layer needs no input gradient (the images are data).
    OpCase("conv3x3_relu/conv1", "conv3x3_relu", _conv_inputs(1, 28, 6, False),
           lambda x, w, b: F.relu(F.conv2d(x, w, b)),
           lambda be: lambda x, w, b: ops.conv3x3_relu(x, w, b, backend=be)),
    OpCase("conv3x3_relu/conv2", "conv3x3_relu", _conv_inputs(6, 13, 16, True),
           lambda x, w, b: F.relu(F.conv2d(x, w, b)),
           lambda be: lambda x, w, b: ops.conv3x3_relu(x, w, b, backend=be)),
    OpCase("maxpool2x2/pool1", "maxpool2x2", _pool_inputs(6, 26),
           lambda x: F.max_pool2d(x, 2), lambda be: lambda x: ops.maxpool2x2(x, backend=be)),
    OpCase("maxpool2x2/pool2", "maxpool2x2", _pool_inputs(16, 11),
           lambda x: F.max_pool2d(x, 2), lambda be: lambda x: ops.maxpool2x2(x, backend=be)),
    OpCase("conv3x3_relu_maxpool2x2/conv1", "conv3x3_relu_maxpool2x2", _conv_inputs(1, 28, 6, False),
           lambda x, w, b: F.max_pool2d(F.relu(F.conv2d(x, w, b)), 2),
           lambda be: lambda x, w, b: ops.conv3x3_relu_maxpool2x2(x, w, b, backend=be)),
    OpCase("conv3x3_relu_maxpool2x2/conv2", "conv3x3_relu_maxpool2x2", _conv_inputs(6, 13, 16, True),
           lambda x, w, b: F.max_pool2d(F.relu(F.conv2d(x, w, b)), 2),
           lambda be: lambda x, w, b: ops.conv3x3_relu_maxpool2x2(x, w, b, backend=be)),
    OpCase("linear_relu/fc1", "linear", _linear_inputs(400, 120), _stock_linear(True),
           lambda be: lambda x, w, b: ops.linear(x, w, b, relu=True, backend=be)),
    OpCase("linear_relu/fc2", "linear", _linear_inputs(120, 84), _stock_linear(True),
           lambda be: lambda x, w, b: ops.linear(x, w, b, relu=True, backend=be)),
    OpCase("linear/fc3", "linear", _linear_inputs(84, 10), _stock_linear(False),
           lambda be: lambda x, w, b: ops.linear(x, w, b, relu=False, backend=be)),
    # fc1 + ReLU, fc2 + ReLU, fc3 and the cross-entropy loss: one op against five stock ones.
    OpCase("mlp_cross_entropy/head", "mlp_cross_entropy", _head_inputs, _stock_head,
           lambda be: lambda x, w1, b1, w2, b2, w3, b3, t: ops.mlp_cross_entropy(
               x, [w1, w2, w3], [b1, b2, b3], t, backend=be)[0]),
]


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
