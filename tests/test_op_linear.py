"""ops.linear on every backend against linear(x, weight, bias) (+ relu) from torch.nn.functional."""

import pytest
import torch
import torch.nn.functional as F

from helpers import check_op
from lenet_fast import ops

# (batch, in_features, out_features, relu): LeNet's three layers at batch 64, then
# the edges: single features, sizes that are not multiples of any block, batch 1, empty batch.
# The ext CPU kernel for narrow layers (out_features <= 16) gets the widest narrow layer,
# with whole row blocks split over threads plus leftover rows, two inputs only, and the
# first width past it (17, GEMM path).
SHAPES = [
    (64, 400, 120, True),
    (64, 120, 84, True),
    (64, 84, 10, False),
    (1, 1, 1, True),
    (250, 84, 16, True),
    (7, 2, 10, False),
    (5, 33, 17, False),
    (1, 400, 120, True),
    (3, 130, 70, True),
    (0, 400, 120, True),
]


def reference(x, weight, bias, relu):
    y = F.linear(x, weight, bias)
    return F.relu(y) if relu else y


def linear_inputs(batch, n_in, n_out, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_in, generator=g)
    weight = torch.randn(n_out, n_in, generator=g) / n_in**0.5
    bias = torch.randn(n_out, generator=g) * 0.1
    return x, weight, bias


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_stock(backend_device, shape):
    backend, device = backend_device
    *size, relu = shape
    check_op(
        lambda x, w, b: ops.linear(x, w, b, relu=relu, backend=backend),
        lambda x, w, b: reference(x, w, b, relu),
        linear_inputs(*size),
        device=device,
    )


def test_without_bias_and_leading_dims(backend_device):
    backend, device = backend_device
    x, weight, _ = linear_inputs(6, 20, 9, seed=1)
    x = x.reshape(2, 3, 20)
    check_op(
        lambda x, w: ops.linear(x, w, None, relu=True, backend=backend),
        lambda x, w: reference(x, w, None, True),
        [x, weight],
        device=device,
    )


def test_non_contiguous_input(backend_device):
    backend, device = backend_device
    x, weight, bias = linear_inputs(40, 16, 8, seed=2)
    x_t = x.to(device).t().contiguous().t()  # column-major
    out = ops.linear(x_t, weight.to(device), bias.to(device), relu=True, backend=backend)
    torch.testing.assert_close(out.cpu().double(), reference(x.double(), weight.double(), bias.double(), True),
                               rtol=0, atol=1e-5)
