"""Bad input to any op raises ValueError/TypeError naming the argument and its shape.

Validation runs before a backend is chosen, so these hold for every backend.
"""

import pytest
import torch

from lenet_fast import ops

X = torch.zeros(2, 6, 13, 13)
W = torch.zeros(16, 6, 3, 3)
B = torch.zeros(16)
CONV_OPS = [ops.conv3x3_relu, ops.conv3x3_relu_maxpool2x2]


@pytest.mark.parametrize("op", CONV_OPS)
@pytest.mark.parametrize(
    "x, weight, bias, padding, error, pattern",
    [
        (torch.zeros(6, 13, 13), W, B, 0, ValueError, r"x must be 4-D, got shape \(6, 13, 13\)"),
        (X, torch.zeros(16, 6, 3), B, 0, ValueError, r"weight must be 4-D, got shape \(16, 6, 3\)"),
        (X, torch.zeros(16, 6, 5, 5), B, 0, ValueError, r"\(C_out, C_in, 3, 3\), got \(16, 6, 5, 5\)"),
        (X, torch.zeros(16, 3, 3, 3), B, 0, ValueError, r"3 input channels .*\(2, 6, 13, 13\)"),
        (X, W, torch.zeros(8), 0, ValueError, r"bias must have shape \(16,\).*got \(8,\)"),
        (X, W, torch.zeros(16, 1), 0, ValueError, r"bias must be 1-D, got shape \(16, 1\)"),
        (X, W, B, 2, ValueError, r"padding must be 0 or 1, got 2"),
        (X, W, B, True, ValueError, r"padding must be 0 or 1, got True"),
        (torch.zeros(2, 6, 2, 13), W, B, 0, ValueError, r"\(2, 6, 2, 13\) with padding=0 is smaller than the 3x3"),
        (X.long(), W, B, 0, TypeError, r"x must be a floating-point tensor, got dtype torch.int64"),
        (X.to(torch.uint8), W, B, 0, TypeError, r"x must be a floating-point tensor"),
        (X, W.double(), B, 0, TypeError, r"weight has dtype torch.float64 but x has dtype torch.float32"),
        (X, W, B.to("meta"), 0, ValueError, r"bias is on meta but x is on cpu"),
        ("image", W, B, 0, TypeError, r"x must be a torch.Tensor, got str"),
    ],
)
def test_conv_bad_input(op, x, weight, bias, padding, error, pattern):
    with pytest.raises(error, match=pattern):
        op(x, weight, bias, padding=padding, backend="torch")


def test_fused_op_needs_a_conv_output_that_pools():
    with pytest.raises(ValueError, match=r"\(1, 6, 3, 9\) gives a convolution output of shape \(1, 16, 1, 7\)"):
        ops.conv3x3_relu_maxpool2x2(torch.zeros(1, 6, 3, 9), W, B, backend="torch")


@pytest.mark.parametrize(
    "x, error, pattern",
    [
        (torch.zeros(6, 26, 26), ValueError, r"x must be 4-D, got shape \(6, 26, 26\)"),
        (torch.zeros(1, 6, 1, 26), ValueError, r"\(1, 6, 1, 26\) is smaller than the 2x2 pooling window"),
        (torch.zeros(1, 6, 4, 4, dtype=torch.int32), TypeError, r"x must be a floating-point tensor"),
        ([[1.0]], TypeError, r"x must be a torch.Tensor, got list"),
    ],
)
def test_pool_bad_input(x, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.maxpool2x2(x, backend="torch")


@pytest.mark.parametrize(
    "x, weight, bias, error, pattern",
    [
        (torch.zeros(4, 400), torch.zeros(120, 399), None, ValueError, r"x has 400 features .*\(120, 399\)"),
        (torch.zeros(4, 400), torch.zeros(120, 400, 1), None, ValueError, r"weight must be 2-D, got shape \(120, 400, 1\)"),
        (torch.zeros(4, 400), torch.zeros(120, 400), torch.zeros(84), ValueError, r"bias must have shape \(120,\).*got \(84,\)"),
        (torch.zeros(()), torch.zeros(120, 400), None, ValueError, r"at least 1 dimension"),
        (torch.zeros(4, 400, dtype=torch.int64), torch.zeros(120, 400), None, TypeError, r"x must be a floating-point"),
        (torch.zeros(4, 400), torch.zeros(120, 400, device="meta"), None, ValueError, r"weight is on meta but x is on cpu"),
    ],
)
def test_linear_bad_input(x, weight, bias, error, pattern):
    with pytest.raises(error, match=pattern):
        ops.linear(x, weight, bias, backend="torch")


def test_unknown_backend_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'cudnn'; valid backends are \['auto', 'torch'"):
        ops.maxpool2x2(torch.zeros(1, 1, 2, 2), backend="cudnn")
