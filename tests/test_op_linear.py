"""ops.linear on every backend against linear(x, weight, bias) (+ relu) from torch.nn.functional."""

import pytest
import torch
import torch.nn.functional as F

from helpers import F64_REL, GRAD_FLAGS, LAYOUTS, check_op, leaf, skip_unless_dtype
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


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("size", [(64, 400, 120), (64, 84, 10), (1, 3, 1), (0, 5, 4)],
                         ids=lambda s: "x".join(map(str, s)))
def test_relu_and_bias_options(backend_device, size, relu, bias):
    backend, device = backend_device
    x, weight, b = linear_inputs(*size, seed=4)
    check_op(
        lambda x, w, b=None: ops.linear(x, w, b, relu=relu, backend=backend),
        lambda x, w, b=None: reference(x, w, b, relu),
        [x, weight, b] if bias else [x, weight],
        device=device,
    )


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
def test_float64(backend_device, relu, bias):
    """A float64 kernel must match stock to float64 rounding (F64_REL)."""
    backend, device = backend_device
    skip_unless_dtype(backend, torch.float64)
    x, weight, b = (t.double() for t in linear_inputs(4, 5, 3, seed=11))
    check_op(
        lambda x, w, b=None: ops.linear(x, w, b, relu=relu, backend=backend),
        lambda x, w, b=None: reference(x, w, b, relu),
        [x, weight, b] if bias else [x, weight],
        device=device, fwd_rel=F64_REL, grad_rel=F64_REL,
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_non_contiguous_inputs_and_gradient(backend_device, layout):
    """x, weight, bias and the upstream gradient in a non-contiguous layout."""
    backend, device = backend_device
    check_op(
        lambda x, w, b: ops.linear(x, w, b, relu=True, backend=backend),
        lambda x, w, b: reference(x, w, b, True),
        linear_inputs(40, 16, 8, seed=2),
        device=device, layout=LAYOUTS[layout],
    )


# --------------------------------------------------------------------------- opcheck samples


def opcheck_samples(op, randn):
    """{(op name, case): arguments} for tests/test_op_table.py (see test_op_conv3x3_relu.py)."""
    x, w, b = leaf(randn(5, 7)), leaf(randn(3, 7)), leaf(randn(3))
    with torch.no_grad():
        out = op("linear")(x, w, b, True)
    grad = randn(*out.shape)
    return {("linear", "relu"): (x, w, b, True), ("linear", "nobias"): (x, w, None, False),
            **{("linear_backward", case): (grad, out, x.detach(), w.detach(), True, *flags)
               for case, flags in GRAD_FLAGS.items()}}
