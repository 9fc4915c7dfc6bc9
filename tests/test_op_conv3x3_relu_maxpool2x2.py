"""ops.conv3x3_relu_maxpool2x2 on every backend against max_pool2d(relu(conv2d(...)), 2).

Inputs are exact-arithmetic (see helpers.exact_tensor), so the convolution is
bitwise the same in every summation order and the pooling winners, hence the
gradient routing, must agree with stock exactly; exact ties are frequent.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import F64_REL, GRAD_FLAGS, LAYOUTS, check_op, leaf, skip_unless_dtype
from lenet_fast import ops
from test_op_conv3x3_relu import conv_inputs

# (N, C_in, H, W, C_out, padding): LeNet's two stages at batch 64 and its first at batch 1,
# then batch 1 with the smallest image that pools (4x4), odd sizes whose last conv
# row/column is dropped by the floor-mode pooling, padding 1 (a 3x3 image pools to 1x1),
# C_out 1, 64 channels, and an empty batch.  For the CPU kernels: an image wide enough
# that one pooled row spans two vector blocks (17 pooled columns); one input channel
# (the pixel-vectorised forward) with a pooled width a multiple of the vector width from
# an odd conv width (19 -> 17 -> 8), and with padding (9x18, 11x35, 28x28); 5 channels
# with padding on a row of 10 pixels (the backward's channels-last conversion: one
# whole 8-pixel block and one overlapping it); 8 input channels, the most the float32
# winners-only backward takes, and 13 (with 9 outputs, neither a multiple of a block),
# past it.  For the Triton kernels: enough pixels that the weight gradient's reduction
# is split over several programs (9x2x30x30).
SHAPES = [
    (64, 1, 28, 28, 6, 0),
    (64, 6, 13, 13, 16, 0),
    (1, 1, 28, 28, 6, 0),
    (2, 5, 11, 10, 7, 1),
    (1, 1, 4, 4, 1, 0),
    (2, 3, 7, 6, 5, 1),
    (3, 2, 9, 8, 4, 0),
    (3, 2, 9, 11, 5, 0),
    (1, 2, 3, 3, 2, 1),
    (2, 1, 5, 5, 1, 1),
    (1, 64, 4, 5, 64, 1),
    (2, 1, 36, 35, 3, 1),
    (3, 1, 12, 19, 5, 0),
    (2, 1, 9, 18, 3, 1),
    (2, 1, 11, 35, 7, 1),
    (5, 1, 28, 28, 6, 1),
    (3, 8, 7, 9, 3, 1),
    (2, 13, 5, 4, 9, 0),
    (9, 2, 30, 30, 3, 0),
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


@pytest.mark.parametrize("shape", [(4, 1, 10, 10, 6), (64, 1, 28, 28, 6)], ids=lambda s: "x".join(map(str, s)))
def test_first_layer_needs_no_input_grad(backend_device, shape):
    """LeNet's first stage: the images want no gradient, the parameters do."""
    backend, device = backend_device
    check_op(
        fused(backend, 0),
        lambda x, w, b: reference(x, w, b, 0),
        conv_inputs(*shape, seed=5),
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


# (N, C_in, H, W, C_out, padding, bias, NaN places): inside a padded image; at a corner and
# in another sample, without bias; one input channel (the CPU's pixel-vectorised forward)
# with NaN windows, and a zero region whose windows tie at the bias or are masked.
NAN_CASES = {
    "padded": ((1, 2, 8, 8, 3, 1), True, [(0, 1, 3, 4)]),
    "corner-nobias": ((2, 2, 9, 9, 3, 0), False, [(0, 1, 4, 4), (1, 0, 0, 0)]),
    "cin1": ((3, 1, 12, 19, 5, 0), True, [(0, 0, 6, 9), (2, 0, 0, 0), (2, 0, 0, 1), (2, 0, 0, 2)]),
}


@pytest.mark.parametrize("case", list(NAN_CASES))
def test_nan_input_propagates(backend_device, case):
    """NaN reaches exactly the outputs it touches in stock (check_op compares NaN places)."""
    backend, device = backend_device
    (*size, padding), bias, places = NAN_CASES[case]
    x, weight, b = conv_inputs(*size, seed=2)
    for place in places:
        x[place] = float("nan")
    if case == "cin1":
        x[-1, 0, -1, -2:] = 0.0
        weight[0] = 0.0
    inputs = [x, weight, b] if bias else [x, weight]
    out = check_op(
        lambda x, w, b=None: ops.conv3x3_relu_maxpool2x2(x, w, b, padding=padding, backend=backend),
        lambda x, w, b=None: reference(x, w, b, padding), inputs, device=device, needs_grad=[False] * len(inputs),
    )
    assert torch.isnan(out).any()


def test_zero_weights_every_window_ties(backend_device):
    """Zero weights: every conv output is its channel's bias, so every window is a four-way
    tie, positive (routed to the first), negative (masked by ReLU) or exactly zero."""
    backend, device = backend_device
    x, _, _ = conv_inputs(2, 2, 7, 8, 3, seed=6)
    weight = torch.zeros(3, 2, 3, 3)
    bias = torch.tensor([0.5, -0.5, 0.0])
    check_op(fused(backend, 1), lambda x, w, b: reference(x, w, b, 1), [x, weight, bias], device=device)


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


@pytest.mark.parametrize("shape", [(2, 3, 7, 6, 5, 1), (3, 1, 12, 19, 5, 0), (64, 6, 13, 13, 16, 0),
                                   (2, 13, 5, 4, 9, 0), (0, 6, 13, 13, 16, 0)], ids=lambda s: "x".join(map(str, s)))
def test_without_bias(backend_device, shape):
    backend, device = backend_device
    *size, padding = shape
    x, weight, _ = conv_inputs(*size)
    check_op(
        lambda x, w: ops.conv3x3_relu_maxpool2x2(x, w, None, padding=padding, backend=backend),
        lambda x, w: reference(x, w, None, padding),
        [x, weight],
        device=device,
    )


# Small shapes, both paddings, one input channel, Gaussian values: a float64 kernel must
# match stock to float64 rounding (F64_REL).
F64_SHAPES = [(2, 2, 6, 7, 3, 0), (2, 3, 5, 6, 2, 1), (1, 1, 4, 5, 1, 0), (8, 3, 12, 11, 5, 1), (3, 1, 12, 19, 5, 0)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", F64_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float64(backend_device, shape, bias):
    backend, device = backend_device
    skip_unless_dtype(backend, torch.float64)
    *size, padding = shape
    x, weight, b = (t.double() for t in conv_inputs(*size, seed=7, exact=False))
    check_op(
        lambda x, w, b=None: ops.conv3x3_relu_maxpool2x2(x, w, b, padding=padding, backend=backend),
        lambda x, w, b=None: reference(x, w, b, padding),
        [x, weight, b] if bias else [x, weight],
        device=device, fwd_rel=F64_REL, grad_rel=F64_REL,
    )


@pytest.mark.parametrize("shape", [(2, 6, 13, 13, 16, 0), (2, 3, 7, 8, 4, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_non_contiguous_inputs_and_gradient(backend_device, layout, shape):
    """x, weight, bias and the upstream gradient in a non-contiguous layout."""
    backend, device = backend_device
    *size, padding = shape
    check_op(fused(backend, padding), lambda x, w, b: reference(x, w, b, padding), conv_inputs(*size, seed=4),
             device=device, layout=LAYOUTS[layout])


# --------------------------------------------------------------------------- opcheck samples


def opcheck_samples(op, randn):
    """{(op name, case): arguments} for tests/test_op_table.py (see test_op_conv3x3_relu.py)."""
    x, w, b = leaf(randn(3, 2, 8, 7)), leaf(randn(4, 2, 3, 3) / 4), leaf(randn(4) / 10)
    with torch.no_grad():
        pooled, code = op("conv3x3_relu_maxpool2x2")(x, w, b, 1)
    grad = randn(*pooled.shape)
    return {("conv3x3_relu_maxpool2x2", "padding"): (x, w, b, 1),
            ("conv3x3_relu_maxpool2x2", "nobias"): (x, w, None, 0),
            **{("conv3x3_relu_maxpool2x2_backward", case): (grad, code, x.detach(), w.detach(), 1, *flags)
               for case, flags in GRAD_FLAGS.items()}}
