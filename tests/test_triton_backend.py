"""What is specific to the "triton" backend: tracing (the backward ops in traced graphs,
the flags that skip an unneeded input gradient) and the eager backward's shortcut past
the op dispatcher, the uint8 pooling codes, the softmax kernel's blocks and bad targets,
the dtype it refuses, the TF32 switch, a deterministic weight gradient from many partial
sums, and (on a GPU) indices past 2**31.  Without a GPU the kernels run under
TRITON_INTERPRET=1 on CPU tensors.

Output values against stock PyTorch are checked in tests/test_op_<name>.py and
tests/test_model.py, and what both kernel backends promise for every op (registration,
opcheck, fakes, the backward contract, double backward) in tests/test_op_table.py.
Tolerances: helpers.FWD_REL / GRAD_REL against a float64 reference.
"""

import os
import types

import torch

if "TRITON_INTERPRET" not in os.environ:  # tests/conftest.py normally decides this first
    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

import lenet_fast  # noqa: E402
from helpers import FWD_REL, GRAD_REL, assert_close_scaled  # noqa: E402
from lenet_fast import triton_backend  # noqa: E402, F401  (registers the ops)
from lenet_fast.kernels import _common  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU, or TRITON_INTERPRET=1 for CPU tensors", allow_module_level=True)

OPS = torch.ops.lenet_fast

# The registered forward ops as functions of the backend arguments, returning the public output.
tb = types.SimpleNamespace(
    conv3x3_relu=lambda x, w, b, padding: OPS.triton_conv3x3_relu(x, w, b, padding),
    maxpool2x2=lambda x: OPS.triton_maxpool2x2(x)[0],
    conv3x3_relu_maxpool2x2=lambda x, w, b, padding: OPS.triton_conv3x3_relu_maxpool2x2(x, w, b, padding)[0],
    linear=lambda x, w, b, relu: OPS.triton_linear(x, w, b, relu),
)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def integers(*shape, lo=-3, hi=3, seed=0):
    """Small integers as fp32: sums of products are exact, so maxima tie exactly."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, shape, generator=g).float().to(DEVICE)


def window_position(flat_index, width):
    """ATen's flat argmax index (ih*W + iw) as a 0..3 position in its 2x2 window."""
    ih, iw = flat_index // width, flat_index % width
    return (ih % 2) * 2 + iw % 2


# --------------------------------------------------------------------------- tracing and skipped input gradients


def _traced_nodes(fn, *args):
    """The lenet_fast op nodes of the graph make_fx records for fn(*args)."""
    graph = make_fx(fn, tracing_mode="real")(*args).graph
    return [node for node in graph.nodes if node.op == "call_function" and str(node.target).startswith("lenet_fast.")]


def _traced_ops(fn, *args):
    """Names of the lenet_fast ops in the graph make_fx records for fn(*args)."""
    return [str(node.target).split(".")[1] for node in _traced_nodes(fn, *args)]


LAYERS = {
    # name: (backend function, input, weight, extra args)
    "conv3x3_relu": (tb.conv3x3_relu, (2, 3, 6, 7), (4, 3, 3, 3), (1,)),
    "conv3x3_relu_maxpool2x2": (tb.conv3x3_relu_maxpool2x2, (2, 3, 6, 7), (4, 3, 3, 3), (0,)),
    "linear": (tb.linear, (5, 7), (3, 7), (True,)),
}


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("input_needs_grad", [False, True])
def test_backward_traces_and_skips_unneeded_input_gradient(layer, input_needs_grad):
    fn, x_shape, w_shape, extra = LAYERS[layer]

    def step(x, w, b):
        x = x.requires_grad_(input_needs_grad)
        w, b = w.requires_grad_(), b.requires_grad_()
        out = fn(x, w, b, *extra)
        wanted = (x, w, b) if input_needs_grad else (w, b)
        return torch.autograd.grad(out.sum(), wanted)

    x, w, b = randn(*x_shape, seed=1), randn(*w_shape, seed=2), randn(w_shape[0], seed=3)
    nodes = _traced_nodes(step, x, w, b)
    traced = [str(node.target).split(".")[1] for node in nodes]
    op = f"triton_{layer}"
    assert traced == [op, f"{op}_backward"], traced
    # One backward op; its input_grad / weight_grad flags say which gradients it computes.
    assert nodes[1].args[-2:] == (input_needs_grad, True), nodes[1].args


def test_maxpool_backward_traces():
    def step(x):
        return torch.autograd.grad(tb.maxpool2x2(x.requires_grad_()).sum(), x)

    assert _traced_ops(step, randn(2, 3, 5, 6)) == ["triton_maxpool2x2", "triton_maxpool2x2_backward"]


def test_eager_backward_launches_without_the_op_dispatcher(monkeypatch):
    """Plain eager autograd calls the kernels' backward directly (a registered op's Python
    dispatch costs as much host time as the launch); traced graphs still show the
    backward ops (the two tests above)."""
    from torch._library.custom_ops import OPDEFS

    def registered_op_called(*args):
        raise AssertionError("a registered backward op was called in plain eager autograd")

    for name in ("conv3x3_relu", "maxpool2x2", "conv3x3_relu_maxpool2x2", "linear"):
        monkeypatch.setattr(OPDEFS[f"lenet_fast::triton_{name}_backward"], "_opoverload", registered_op_called)
    for fn, x_shape, w_shape, extra in LAYERS.values():
        x, w, b = (t.requires_grad_() for t in (randn(*x_shape, seed=1), randn(*w_shape, seed=2),
                                                 randn(w_shape[0], seed=3)))
        fn(x, w, b, *extra).sum().backward()
        assert x.grad is not None and w.grad is not None and b.grad is not None
    x = randn(2, 3, 5, 6).requires_grad_()
    tb.maxpool2x2(x).sum().backward()
    assert x.grad is not None


# --------------------------------------------------------------------------- uint8 pooling codes


def test_maxpool_winners_are_uint8_positions_matching_aten():
    x = integers(2, 3, 9, 8, lo=-2, hi=2)  # many exact ties
    x[0, 0, 0, :2] = float("nan")          # two NaNs in one window: the last one wins
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, :2, :2] = float("-inf")        # all -inf: position 0
    out, winner = OPS.triton_maxpool2x2(x)
    _, flat = F.max_pool2d(x, 2, return_indices=True)
    assert winner.dtype == torch.uint8 and winner.shape == out.shape
    assert torch.equal(winner.long(), window_position(flat, x.shape[-1]))


def test_fused_winners_follow_relu_then_pool():
    # Integer data: exact convolution sums, ties among positive maxima, and
    # windows that ReLU clamps to all zeros: code 4, ReLU blocks the gradient
    # (lenet_fast.ops, the backward contract).
    x = integers(2, 2, 9, 10, lo=-2, hi=2, seed=1)
    w = integers(5, 2, 3, 3, lo=-1, hi=1, seed=2)
    b = integers(5, lo=-2, hi=2, seed=3)
    _, winner = OPS.triton_conv3x3_relu_maxpool2x2(x, w, b, 1)
    ref, flat = F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 2, return_indices=True)
    assert winner.dtype == torch.uint8 and winner.shape == ref.shape
    assert torch.equal(winner.long(), torch.where(ref <= 0, 4, window_position(flat, 10)))
    assert (ref == 0).any(), "the case should include windows clamped to zero"


# --------------------------------------------------------------------------- backend-level behaviour


def test_softmax_cross_entropy_kernel_blocks_and_bad_targets():
    """Several programs of 16 rows (as on a GPU), a target outside [0, C) turning only its
    own row's loss and gradient into NaN (the wrapper raises before that on the CPU; on
    a GPU this NaN is what flags it), and an ignored row (-100) adding nothing; the
    gradient is divided by the count of rows not ignored, read from the device."""
    from lenet_fast.kernels.mlp_cross_entropy import IGNORE_INDEX, softmax_cross_entropy_kernel

    z = randn(40, 10, seed=8) * 3
    t = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    t[17], t[33], t[5] = 10, -1, IGNORE_INDEX
    row_loss, dz = torch.empty(40, device=DEVICE), torch.empty_like(z)
    counted = torch.tensor(39.0, device=DEVICE)
    _common.launch(softmax_cross_entropy_kernel, (3,), z, t, row_loss, dz, counted, 40, 10,
                   BLOCK_R=16, BLOCK_C=16, IGNORE=IGNORE_INDEX, num_warps=4)
    bad = torch.zeros(40, dtype=torch.bool, device=DEVICE)
    bad[17] = bad[33] = True
    assert row_loss[bad].isnan().all() and dz[bad].isnan().all()
    assert row_loss[5] == 0 and (dz[5] == 0).all()
    good = ~bad
    good[5] = False
    ref = F.cross_entropy(z[good].double(), t[good], reduction="none")
    assert_close_scaled(row_loss[good], ref, FWD_REL, "row losses")
    ref_dz = (torch.softmax(z[good].double(), 1) - F.one_hot(t[good], 10).double()) / 39
    assert_close_scaled(dz[good], ref_dz, GRAD_REL, "d loss / d logits")


def test_rejects_dtypes_other_than_float32():
    x = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)
    w = torch.randn(2, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float32"):
        lenet_fast.ops.linear(x, w, backend="triton")


def test_tf32_is_opt_in(monkeypatch):
    """Every tl.dot gets input_precision="ieee" unless ALLOW_TF32 is set."""
    x, w, b = randn(4, 1, 6, 6), randn(2, 1, 3, 3), randn(2)

    def precisions():
        with _common.recording_launches() as launches:
            from lenet_fast.kernels import conv3x3_relu_maxpool2x2, linear

            conv3x3_relu_maxpool2x2.forward(x, w, b, 0)
            linear.forward(x.view(4, 36), randn(3, 36), None, False)
        assert len(launches) == 2
        return {launch.kwargs["PRECISION"] for launch in launches}

    monkeypatch.setattr(_common, "ALLOW_TF32", False)
    assert precisions() == {"ieee"}
    monkeypatch.setattr(_common, "ALLOW_TF32", True)
    assert precisions() == {"tf32"}


def test_weight_gradient_with_many_partial_sums_is_deterministic():
    """Enough pixel blocks that the reduction is split over several programs: the partial
    sums are added in a fixed order, so two runs give the same bits.  (This shape against
    stock: tests/test_op_conv3x3_relu_maxpool2x2.py.)"""
    x = randn(9, 2, 30, 30, seed=1)
    w = randn(3, 2, 3, 3, seed=2).requires_grad_()
    b = randn(3, seed=3).requires_grad_()
    grad_out = randn(9, 3, 14, 14, seed=4)

    def grads():
        out = tb.conv3x3_relu_maxpool2x2(x, w, b, 0)
        return torch.autograd.grad(out, (w, b), grad_out)

    first, second = grads(), grads()
    assert all(torch.equal(a, c) for a, c in zip(first, second))


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="needs a GPU with > 20 GiB (tensors of more than 2**31 elements)")
def test_indices_past_2_31_elements():
    # 2**31 + a bit of fp32 input: every flat offset past 2**31 must be int64.
    n = 2**31 // (28 * 28) + 2
    x = torch.randn(n, 1, 28, 28, device="cuda")
    w = torch.randn(2, 1, 3, 3, device="cuda")
    b = torch.randn(2, device="cuda")
    pooled, _ = OPS.triton_maxpool2x2(x)
    tail = x[-3:]
    assert torch.equal(pooled[-3:], F.max_pool2d(tail, 2))  # max-pool copies values: exact
    fused, _ = OPS.triton_conv3x3_relu_maxpool2x2(x, w, b, 0)
    tail, w, b = (t.double().cpu() for t in (tail, w, b))
    assert_close_scaled(fused[-3:], F.max_pool2d(F.relu(F.conv2d(tail, w, b)), 2), FWD_REL, "fused tail")
