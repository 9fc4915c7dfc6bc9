"""The op tests catch subtle kernel bugs: each deliberately broken implementation below
must make the shared checker (helpers.check_op) fail on the inputs the op tests use."""

import pytest
import torch
import torch.nn.functional as F

import test_op_conv3x3_relu_maxpool2x2 as fused_tests
import test_op_maxpool2x2 as pool_tests
from helpers import check_op, exact_tensor
from test_op_conv3x3_relu import conv_inputs


def pool_last_max_wins(x):
    # Flipping both spatial axes of an even-sized map maps 2x2 windows onto windows and
    # reverses the order inside each: the *last* maximum wins ties.
    return F.max_pool2d(x.flip(-1, -2), 2).flip(-1, -2)


def pool_ignoring_nan(x):
    return F.max_pool2d(torch.where(torch.isnan(x), torch.full_like(x, -float("inf")), x), 2)


def fused_with_bias_gradient_dropped(x, w, b):
    return F.max_pool2d(F.relu(F.conv2d(x, w, b.detach())), 2) + 0 * b.sum()


def test_ties_routed_to_the_last_maximum_are_caught():
    x = exact_tensor((2, 3, 6, 8), 1.0, -2, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match="gradient"):
        check_op(pool_last_max_wins, pool_tests.reference, [x], device="cpu", fwd_rel=0, grad_rel=0)


def test_nan_not_propagated_is_caught():
    x = torch.tensor([[[[1.0, float("nan")], [0.0, 2.0]]]])
    with pytest.raises(AssertionError, match="output"):
        check_op(pool_ignoring_nan, pool_tests.reference, [x], device="cpu", fwd_rel=0, grad_rel=0)


def test_missing_bias_gradient_is_caught():
    with pytest.raises(AssertionError, match="gradient of input 2"):
        check_op(fused_with_bias_gradient_dropped, lambda x, w, b: fused_tests.reference(x, w, b, 0),
                 conv_inputs(2, 3, 8, 8, 4), device="cpu")


def test_flipped_kernel_is_caught():
    """Convolution instead of cross-correlation: the classic index bug."""
    with pytest.raises(AssertionError, match="output"):
        check_op(lambda x, w, b: F.relu(F.conv2d(x, w.flip(-1, -2), b, padding=1)),
                 lambda x, w, b: F.relu(F.conv2d(x, w, b, padding=1)), conv_inputs(1, 2, 6, 6, 3), device="cpu")
