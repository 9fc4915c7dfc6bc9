"""ops.maxpool2x2 on every backend against max_pool2d(x, 2): values, ties, NaN and gradient routing.

Max-pool selects and copies, so outputs and gradients must match stock exactly.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import LAYOUTS, check_op, exact_tensor, leaf, skip_unless_dtype
from lenet_fast import ops

# LeNet's two pooling inputs at batch 64 (11x11 is odd: floor mode drops the last row
# and column), then batch 1, the smallest window, odd non-square sizes and an empty batch.
SHAPES = [(64, 6, 26, 26), (64, 16, 11, 11), (1, 1, 2, 2), (2, 3, 5, 7), (1, 2, 3, 2), (3, 1, 9, 4), (0, 6, 26, 26)]


def reference(x):
    return F.max_pool2d(x, 2)


def pool(backend):
    return lambda x: ops.maxpool2x2(x, backend=backend)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_stock_exactly(backend_device, shape):
    backend, device = backend_device
    # Few distinct values: most windows hold ties.
    x = exact_tensor(shape, 1.0, -2, 2, generator=torch.Generator().manual_seed(0))
    check_op(pool(backend), reference, [x], device=device, fwd_rel=0, grad_rel=0)


def test_ties_first_maximum_wins(backend_device):
    backend, device = backend_device
    # Each window has its maximum twice or more; stock routes the gradient to the
    # first in row-major order.
    x = torch.tensor([[[[3.0, 3.0, 1.0, 5.0], [3.0, 0.0, 5.0, 5.0], [-1.0, -1.0, 0.0, 2.0], [-1.0, -1.0, 2.0, 2.0]]]])
    out = check_op(pool(backend), reference, [x], device=device, fwd_rel=0, grad_rel=0)
    assert out.cpu().tolist() == [[[[3.0, 5.0], [-1.0, 2.0]]]]


def test_nan_wins_and_propagates(backend_device):
    backend, device = backend_device
    nan = float("nan")
    # Windows: one NaN; two NaNs; NaN beside +inf; no NaN but -inf everywhere.
    x = torch.tensor(
        [[[[1.0, nan, nan, 2.0], [0.0, 9.0, nan, 0.0], [float("inf"), 0.0, -float("inf"), -float("inf")],
           [nan, 1.0, -float("inf"), -float("inf")]]]]
    )
    out = check_op(pool(backend), reference, [x], device=device, fwd_rel=0, grad_rel=0)
    assert torch.isnan(out.cpu()).tolist() == [[[[True, True], [True, False]]]]


def test_ties_and_nan_with_a_dropped_row(backend_device):
    """Ties, NaN beside ties, NaN in two windows of one row, and an odd fifth row of nines
    that floor mode drops (its gradient is zero)."""
    backend, device = backend_device
    nan = float("nan")
    x = torch.tensor(
        [
            [1.0, 1.0, 2.0, nan, 0.0, 0.0],
            [1.0, 1.0, nan, 5.0, 0.0, 0.0],
            [nan, 3.0, -1.0, -1.0, 7.0, 1.0],
            [2.0, nan, -1.0, -2.0, 7.0, 7.0],
            [9.0, 9.0, 9.0, 9.0, 9.0, 9.0],
        ]
    ).reshape(1, 1, 5, 6)
    check_op(pool(backend), reference, [x], device=device, fwd_rel=0, grad_rel=0)


def test_random_values(backend_device):
    backend, device = backend_device
    x = torch.randn(2, 8, 10, 12, generator=torch.Generator().manual_seed(3))
    check_op(pool(backend), reference, [x], device=device, fwd_rel=0, grad_rel=0)


def test_float64(backend_device):
    backend, device = backend_device
    skip_unless_dtype(backend, torch.float64)
    x = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    check_op(pool(backend), reference, [x], device=device, fwd_rel=0, grad_rel=0)


@pytest.mark.parametrize("layout", [*LAYOUTS, "transposed"])
def test_non_contiguous_input_and_gradient(backend_device, layout):
    """x and the upstream gradient in a non-contiguous layout (or x a transposed view)."""
    backend, device = backend_device
    x = torch.randn(2, 8, 10, 12, generator=torch.Generator().manual_seed(3))
    if layout == "transposed":
        check_op(lambda t: ops.maxpool2x2(t.transpose(2, 3), backend=backend),
                 lambda t: reference(t.transpose(2, 3)), [x], device=device, fwd_rel=0, grad_rel=0)
        return
    check_op(pool(backend), reference, [x], device=device, fwd_rel=0, grad_rel=0, layout=LAYOUTS[layout])


# --------------------------------------------------------------------------- opcheck samples


def opcheck_samples(op, randn):
    """{(op name, case): arguments} for tests/test_op_table.py (see test_op_conv3x3_relu.py)."""
    x = leaf(randn(3, 2, 8, 7))
    with torch.no_grad():
        pooled, code = op("maxpool2x2")(x)
    return {("maxpool2x2", "odd"): (x,), ("maxpool2x2_backward", "odd"): (randn(*pooled.shape), code, x.detach())}
