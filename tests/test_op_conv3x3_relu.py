"""ops.conv3x3_relu on every backend against relu(conv2d(...)) from torch.nn.functional."""

import pytest
import torch
import torch.nn.functional as F

from helpers import F64_REL, GRAD_FLAGS, LAYOUTS, check_op, exact_tensor, leaf, skip_unless_dtype
from lenet_fast import ops

# (N, C_in, H, W, C_out, padding): LeNet's two layers at batch 64, then the edges:
# batch 1 (at LeNet's first layer too), odd and non-square sizes, the smallest image,
# padding 1, C_in 1 and C_out 1, channel counts that are not multiples of the CPU
# kernels' blocks (13 in, 9 out), 64 channels, and an empty batch.
SHAPES = [
    (64, 1, 28, 28, 6, 0),
    (64, 6, 13, 13, 16, 0),
    (1, 1, 28, 28, 6, 0),
    (1, 1, 3, 3, 1, 0),
    (1, 3, 5, 7, 4, 1),
    (3, 2, 9, 4, 1, 0),
    (2, 1, 1, 1, 3, 1),
    (2, 5, 6, 11, 7, 1),
    (2, 13, 5, 4, 9, 0),
    (1, 64, 5, 4, 64, 1),
    (0, 6, 13, 13, 16, 0),
]


def reference(x, weight, bias, padding):
    return F.relu(F.conv2d(x, weight, bias, padding=padding))


def conv_inputs(n, c_in, h, w, c_out, seed=0, exact=True):
    g = torch.Generator().manual_seed(seed)
    if exact:
        x = exact_tensor((n, c_in, h, w), 0.25, generator=g)
        weight = exact_tensor((c_out, c_in, 3, 3), 0.125, generator=g)
        bias = exact_tensor((c_out,), 0.125, generator=g)
    else:
        x = torch.randn((n, c_in, h, w), generator=g)
        weight = torch.randn((c_out, c_in, 3, 3), generator=g) / (3 * c_in**0.5)
        bias = torch.randn((c_out,), generator=g) * 0.1
    return x, weight, bias


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_stock(backend_device, shape):
    backend, device = backend_device
    *size, padding = shape
    inputs = conv_inputs(*size)
    check_op(
        lambda x, w, b: ops.conv3x3_relu(x, w, b, padding=padding, backend=backend),
        lambda x, w, b: reference(x, w, b, padding),
        inputs,
        device=device,
    )


@pytest.mark.parametrize("padding", [0, 1])
def test_random_normal_inputs(backend_device, padding):
    """Rounding, not just indexing: Gaussian inputs within the stated tolerance."""
    backend, device = backend_device
    inputs = conv_inputs(4, 6, 13, 13, 16, seed=1, exact=False)
    check_op(
        lambda x, w, b: ops.conv3x3_relu(x, w, b, padding=padding, backend=backend),
        lambda x, w, b: reference(x, w, b, padding),
        inputs,
        device=device,
    )


def test_first_layer_needs_no_input_grad(backend_device):
    backend, device = backend_device
    inputs = conv_inputs(3, 1, 8, 8, 6)
    check_op(
        lambda x, w, b: ops.conv3x3_relu(x, w, b, backend=backend),
        lambda x, w, b: reference(x, w, b, 0),
        inputs,
        device=device,
        needs_grad=[False, True, True],
    )


@pytest.mark.parametrize("shape", [(2, 3, 7, 6, 5, 1), (64, 6, 13, 13, 16, 0), (2, 1, 6, 6, 1, 1),
                                   (2, 13, 5, 4, 9, 0), (0, 3, 8, 8, 4, 0)], ids=lambda s: "x".join(map(str, s)))
def test_without_bias(backend_device, shape):
    backend, device = backend_device
    *size, padding = shape
    x, weight, _ = conv_inputs(*size)
    check_op(
        lambda x, w: ops.conv3x3_relu(x, w, None, padding=padding, backend=backend),
        lambda x, w: reference(x, w, None, padding),
        [x, weight],
        device=device,
    )


# Small shapes, both paddings, Gaussian values: a float64 kernel must match stock to
# float64 rounding (F64_REL).
F64_SHAPES = [(2, 2, 6, 7, 3, 0), (2, 3, 5, 6, 2, 1), (1, 1, 4, 5, 1, 0), (8, 3, 12, 11, 5, 0)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", F64_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float64(backend_device, shape, bias):
    backend, device = backend_device
    skip_unless_dtype(backend, torch.float64)
    *size, padding = shape
    x, weight, b = (t.double() for t in conv_inputs(*size, seed=7, exact=False))
    check_op(
        lambda x, w, b=None: ops.conv3x3_relu(x, w, b, padding=padding, backend=backend),
        lambda x, w, b=None: reference(x, w, b, padding),
        [x, weight, b] if bias else [x, weight],
        device=device, fwd_rel=F64_REL, grad_rel=F64_REL,
    )


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_non_contiguous_inputs_and_gradient(backend_device, layout):
    """x, weight, bias and the upstream gradient in a non-contiguous layout."""
    backend, device = backend_device
    check_op(
        lambda x, w, b: ops.conv3x3_relu(x, w, b, padding=1, backend=backend),
        lambda x, w, b: reference(x, w, b, 1),
        conv_inputs(3, 4, 12, 10, 5),
        device=device, layout=LAYOUTS[layout],
    )


# --------------------------------------------------------------------------- opcheck samples


def opcheck_samples(op, randn):
    """{(op name, case): arguments} for tests/test_op_table.py's opcheck and fake checks of
    the op and its backward; op(name) is the backend's registered op, randn(*shape) a
    seeded tensor on the device."""
    x, w, b = leaf(randn(3, 2, 8, 7)), leaf(randn(4, 2, 3, 3) / 4), leaf(randn(4) / 10)
    with torch.no_grad():
        out = op("conv3x3_relu")(x, w, b, 0)
    grad = randn(*out.shape)
    return {("conv3x3_relu", "padding"): (x, w, b, 1), ("conv3x3_relu", "nobias"): (x, w, None, 0),
            **{("conv3x3_relu_backward", case): (grad, out, x.detach(), w.detach(), 0, *flags)
               for case, flags in GRAD_FLAGS.items()}}
