"""ops.conv3x3_relu on every backend against relu(conv2d(...)) from torch.nn.functional."""

import pytest
import torch
import torch.nn.functional as F

from helpers import check_op, exact_tensor
from lenet_fast import ops

# (N, C_in, H, W, C_out, padding): LeNet's two layers at batch 64, then the edges:
# batch 1, odd and non-square sizes, the smallest image, padding 1, C_in 1 and C_out 1,
# 64 channels, and an empty batch.
SHAPES = [
    (64, 1, 28, 28, 6, 0),
    (64, 6, 13, 13, 16, 0),
    (1, 1, 3, 3, 1, 0),
    (1, 3, 5, 7, 4, 1),
    (3, 2, 9, 4, 1, 0),
    (2, 1, 1, 1, 3, 1),
    (2, 5, 6, 11, 7, 1),
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


def test_without_bias(backend_device):
    backend, device = backend_device
    x, weight, _ = conv_inputs(2, 3, 7, 6, 5)
    check_op(
        lambda x, w: ops.conv3x3_relu(x, w, None, padding=1, backend=backend),
        lambda x, w: reference(x, w, None, 1),
        [x, weight],
        device=device,
    )


def test_non_contiguous_input(backend_device):
    backend, device = backend_device
    x, weight, bias = conv_inputs(3, 4, 12, 10, 5)
    x_strided = x.to(device).to(memory_format=torch.channels_last)[:, :, 1:, ::2]
    out = ops.conv3x3_relu(x_strided, weight.to(device), bias.to(device), backend=backend)
    expected = reference(x[:, :, 1:, ::2].double(), weight.double(), bias.double(), 0)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=0, atol=1e-5)
