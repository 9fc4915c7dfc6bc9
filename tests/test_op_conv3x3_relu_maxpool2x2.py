"""ops.conv3x3_relu_maxpool2x2 on every backend against max_pool2d(relu(conv2d(...)), 2).

Inputs are exact-arithmetic (see helpers.exact_tensor), so the convolution is
bitwise the same in every summation order and the pooling winners, hence the
gradient routing, must agree with stock exactly; exact ties are frequent.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import check_op
from lenet_fast import ops
from test_op_conv3x3_relu import conv_inputs

# (N, C_in, H, W, C_out, padding): LeNet's two stages at batch 64, then batch 1 with the
# smallest image that pools (4x4), odd sizes whose last conv row/column is dropped by
# the floor-mode pooling, padding 1 (a 3x3 image pools to 1x1), C_out 1, 64 channels,
# an image wide enough that one pooled row spans two vector blocks of the CPU kernel
# (17 pooled columns), 5 channels with padding on a row of 10 pixels (the CPU
# backward's channels-last conversion: one whole 8-pixel block and one overlapping
# it), and an empty batch.
SHAPES = [
    (64, 1, 28, 28, 6, 0),
    (64, 6, 13, 13, 16, 0),
    (2, 5, 11, 10, 7, 1),
    (1, 1, 4, 4, 1, 0),
    (2, 3, 7, 6, 5, 1),
    (3, 2, 9, 8, 4, 0),
    (1, 2, 3, 3, 2, 1),
    (2, 1, 5, 5, 1, 1),
    (1, 64, 4, 5, 64, 1),
    (2, 1, 36, 35, 3, 1),
    (0, 6, 13, 13, 16, 0),
]


def reference(x, weight, bias, padding):
    return F.max_pool2d(F.relu(F.conv2d(x, weight, bias, padding=padding)), 2)


def fused(backend, padding):
    return lambda x, w, b: ops.conv3x3_relu_maxpool2x2(x, w, b, padding=padding, backend=backend)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_stock(backend_device, shape):
    backend, device = backend_device
    *size, padding = shape
    check_op(fused(backend, padding), lambda x, w, b: reference(x, w, b, padding), conv_inputs(*size), device=device)


def test_first_layer_needs_no_input_grad(backend_device):
    backend, device = backend_device
    check_op(
        fused(backend, 0),
        lambda x, w, b: reference(x, w, b, 0),
        conv_inputs(4, 1, 10, 10, 6, seed=5),
        device=device,
        needs_grad=[False, True, True],
    )


@pytest.mark.parametrize("shape", [(8, 1, 12, 12, 6), (8, 6, 13, 13, 16)], ids=["cin1", "cin6"])
@pytest.mark.parametrize("bias_shift", [-1.0, -2.0, -4.0, -8.0])
def test_mostly_masked_windows(backend_device, shape, bias_shift):
    """ReLU blocks most pool winners, as in LeNet on real data (74-86% of conv2's windows
    while training on MNIST; random inputs block far fewer): the backward must drop
    exactly the masked windows, up to all of them."""
    backend, device = backend_device
    x, weight, bias = conv_inputs(*shape)
    bias = bias + bias_shift
    masked = (reference(x, weight, bias, 0) == 0).float().mean().item()
    assert masked >= 0.3, f"only {masked:.0%} of the windows are masked: the test would not test masking"
    check_op(fused(backend, 0), lambda x, w, b: reference(x, w, b, 0), [x, weight, bias], device=device)


def test_constant_image_ties_route_to_first(backend_device):
    """A constant image makes all four conv outputs in a window equal and positive."""
    backend, device = backend_device
    x = torch.ones(2, 3, 6, 6)
    weight = torch.full((4, 3, 3, 3), 0.125)
    bias = torch.tensor([0.5, -0.25, 0.0, 1.0])
    out = check_op(fused(backend, 0), lambda x, w, b: reference(x, w, b, 0), [x, weight, bias], device=device)
    assert out.shape == (2, 4, 2, 2)


def test_nan_input_propagates(backend_device):
    backend, device = backend_device
    x, weight, bias = conv_inputs(1, 2, 8, 8, 3, seed=2)
    x[0, 1, 3, 4] = float("nan")
    out = check_op(
        fused(backend, 1), lambda x, w, b: reference(x, w, b, 1), [x, weight, bias], device=device,
        needs_grad=[False, False, False],
    )
    assert torch.isnan(out).any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's 0 * inf in the interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_input_reaches_the_gradients_as_in_stock(backend_device, bad):
    """Stock's dense backward multiplies every conv output's gradient, 0 where a
    window lost, by x, so one NaN/inf in x poisons grad_weight; a winners-only
    shortcut must not hide it.  (A NaN weight poisons grad_x in every backend,
    but the exact set of poisoned positions depends on how the zero border of
    the transposed convolution is summed, so it is not compared.)"""
    backend, device = backend_device
    for c_in in (1, 6):  # both CPU winners-only engines (one channel, channels-last)
        x, weight, bias = conv_inputs(2, c_in, 8, 8, 3, seed=4)
        x[0, 0, 2, 5] = bad
        got, want = [], []
        for dtype, dev, fn, into in ((x.dtype, device, fused(backend, 0), got),
                                     (torch.float64, "cpu", lambda a, w, b: reference(a, w, b, 0), want)):
            leaves = [t.to(dev, dtype).requires_grad_() for t in (x, weight, bias)]
            grads = torch.autograd.grad(fn(*leaves).nan_to_num().sum(), leaves[:2])
            into += [g.isfinite().cpu() for g in grads]
        for g, w in zip(got, want):
            assert torch.equal(g, w), f"finite pattern of a gradient differs from stock (C_in={c_in})"


def test_random_normal_inputs_forward(backend_device):
    """Rounding within the stated tolerance on Gaussian data (forward: a near-tie can only
    pick a value within rounding of the other, so the output still agrees)."""
    backend, device = backend_device
    check_op(
        fused(backend, 0),
        lambda x, w, b: reference(x, w, b, 0),
        conv_inputs(8, 6, 13, 13, 16, seed=7, exact=False),
        device=device,
        needs_grad=[False, False, False],
    )


def test_non_contiguous_input(backend_device):
    backend, device = backend_device
    x, weight, bias = conv_inputs(2, 6, 13, 13, 16, seed=4)
    x_strided = x.to(device).to(memory_format=torch.channels_last)
    out = ops.conv3x3_relu_maxpool2x2(x_strided, weight.to(device), bias.to(device), backend=backend)
    assert torch.equal(out.cpu(), reference(x, weight, bias, 0))
