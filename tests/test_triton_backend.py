"""What is specific to the "triton" backend; the generic op tests (tests/test_op_*.py,
tests/test_model.py) compare every backend with stock PyTorch.

Here: the custom-op registration (schemas, opcheck, tracing), skipping the
input gradient, the uint8 pooling codes, non-contiguous inputs and gradients,
LeNet's exact layer shapes at batch 64, a full training step, the TF32 switch,
and (on a GPU) indices past 2**31.  Without a GPU the kernels run under
TRITON_INTERPRET=1 on CPU tensors.
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
from lenet_fast import ops as lf_ops  # noqa: E402
from lenet_fast import triton_backend  # noqa: E402, F401  (registers the ops)
from lenet_fast.kernels import _common  # noqa: E402
from lenet_fast.model import LeNet, TorchLeNet  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU, or TRITON_INTERPRET=1 for CPU tensors", allow_module_level=True)

# Stated tolerance for fp32 results, relative to the output's scale.
REL = 1e-4
OPS = torch.ops.lenet_fast

# The registered forward ops as functions of the backend arguments, returning the public output.
tb = types.SimpleNamespace(
    conv3x3_relu=lambda x, w, b, padding: OPS.triton_conv3x3_relu(x, w, b, padding),
    maxpool2x2=lambda x: OPS.triton_maxpool2x2(x)[0],
    conv3x3_relu_maxpool2x2=lambda x, w, b, padding: OPS.triton_conv3x3_relu_maxpool2x2(x, w, b, padding)[0],
    linear=lambda x, w, b, relu: OPS.triton_linear(x, w, b, relu),
)


def assert_close_to_scale(actual, expected, name):
    """|actual - expected| <= REL * max|expected| + REL * |expected|."""
    expected = expected.detach().to(actual.device, actual.dtype)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach(), expected, rtol=REL, atol=REL * max(scale, 1e-30),
                               msg=lambda m: f"{name}: {m}")


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


# --------------------------------------------------------------------------- registration


OP_NAMES = [name for op in lf_ops.OPS for name in (f"triton_{op.name}", f"triton_{op.name}_backward")]


@pytest.mark.parametrize("name", OP_NAMES)
def test_registered_under_torch_ops_lenet_fast(name):
    op = getattr(OPS, name).default
    schema = str(op._schema)
    assert schema.startswith(f"lenet_fast::{name}("), schema
    # No op mutates or aliases its inputs.
    assert "!" not in schema and "(a" not in schema, schema


def test_schemas_of_the_forward_ops():
    assert "Tensor? bias" in str(OPS.triton_conv3x3_relu.default._schema)
    assert "Tensor? bias" in str(OPS.triton_linear.default._schema)
    assert str(OPS.triton_maxpool2x2.default._schema).endswith("-> (Tensor, Tensor)")
    assert str(OPS.triton_conv3x3_relu_maxpool2x2.default._schema).endswith("-> (Tensor, Tensor)")


def _forward_op_cases():
    x = randn(2, 3, 6, 7, seed=1)
    w = randn(4, 3, 3, 3, seed=2)
    b = randn(4, seed=3)
    return {
        "conv3x3_relu": (OPS.triton_conv3x3_relu.default, (x, w, b, 1)),
        "maxpool2x2": (OPS.triton_maxpool2x2.default, (x,)),
        "conv3x3_relu_maxpool2x2": (OPS.triton_conv3x3_relu_maxpool2x2.default, (x, w, None, 0)),
        "linear": (OPS.triton_linear.default, (randn(5, 42, seed=4), randn(6, 42, seed=5), randn(6, seed=6), True)),
        "mlp_cross_entropy": (OPS.triton_mlp_cross_entropy.default,
                              (randn(5, 2, 3, 7, seed=7), [randn(6, 42, seed=8), randn(7, 6, seed=9)],
                               [randn(6, seed=10), randn(7, seed=11)], torch.tensor([0, 6, 3, 3, 1], device=DEVICE))),
    }


# opcheck's fake-tensor and AOT-dispatch tests run the op body on fake tensors.
# Under TRITON_INTERPRET=1, wrap_triton hands back the interpreted kernel, which
# then executes on those fake tensors and fails (see /work/shared/BUILDING.md),
# so on CPU only the schema and autograd-registration tests can run.
OPCHECK_TESTS = ("test_schema", "test_autograd_registration") + (
    () if INTERPRETED else ("test_faketensor", "test_aot_dispatch_dynamic")
)


FORWARD_OPS = ["conv3x3_relu", "maxpool2x2", "conv3x3_relu_maxpool2x2", "linear", "mlp_cross_entropy"]


@pytest.mark.parametrize("case", FORWARD_OPS)
def test_opcheck(case):
    op, args = _forward_op_cases()[case]
    args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


@pytest.mark.skipif(INTERPRETED, reason="fake-tensor tracing cannot run interpreted Triton kernels (BUILDING.md)")
@pytest.mark.parametrize("case", FORWARD_OPS)
def test_fake_tensor_shapes_match_real(case):
    op, args = _forward_op_cases()[case]
    real = op(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    def flat(out):
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [t for o in out for t in (o if isinstance(o, (tuple, list)) else (o,))]

    for r, f in zip(flat(real), flat(fake), strict=True):
        assert (r.shape, r.dtype) == (f.shape, f.dtype)


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


def test_gradient_not_requested_is_none():
    x = randn(2, 1, 8, 8)
    w = randn(3, 1, 3, 3).requires_grad_()
    b = randn(3).requires_grad_()
    tb.conv3x3_relu_maxpool2x2(x, w, b, 0).sum().backward()
    assert x.grad is None and w.grad is not None and b.grad is not None


# --------------------------------------------------------------------------- uint8 pooling codes


def test_maxpool_winners_are_uint8_positions_matching_aten():
    x = integers(2, 3, 9, 8, lo=-2, hi=2)  # many exact ties
    x[0, 0, 0, :2] = float("nan")          # two NaNs in one window: the last one wins
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, :2, :2] = float("-inf")        # all -inf: position 0
    out, winner = OPS.triton_maxpool2x2(x)
    ref, flat = F.max_pool2d(x, 2, return_indices=True)
    assert winner.dtype == torch.uint8 and winner.shape == out.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(winner.long(), window_position(flat, x.shape[-1]))


def test_fused_winners_follow_relu_then_pool():
    # Integer data: exact convolution sums, ties among positive maxima, and
    # windows that ReLU clamps to all zeros: code 4, ReLU blocks the gradient
    # (lenet_fast.ops, the backward contract).
    x = integers(2, 2, 9, 10, lo=-2, hi=2, seed=1)
    w = integers(5, 2, 3, 3, lo=-1, hi=1, seed=2)
    b = integers(5, lo=-2, hi=2, seed=3)
    out, winner = OPS.triton_conv3x3_relu_maxpool2x2(x, w, b, 1)
    ref, flat = F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 2, return_indices=True)
    assert winner.dtype == torch.uint8
    assert torch.equal(out, ref)
    assert torch.equal(winner.long(), torch.where(out <= 0, 4, window_position(flat, 10)))
    assert (out == 0).any(), "the case should include windows clamped to zero"


# --------------------------------------------------------------------------- non-contiguous inputs and gradients


def _strided(t):
    """The same values as t, in a non-contiguous (every-other-column) layout."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], device=t.device, dtype=t.dtype)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize("layer", ["conv3x3_relu", "conv3x3_relu_maxpool2x2", "maxpool2x2", "linear"])
def test_non_contiguous_inputs_and_grad_outputs(layer):
    if layer == "maxpool2x2":
        fn, args = tb.maxpool2x2, [randn(2, 3, 7, 6, seed=1)]
    elif layer == "linear":
        fn, args = tb.linear, [randn(6, 10, seed=1), randn(4, 10, seed=2), randn(4, seed=3), True]
    else:
        fn = getattr(tb, layer)
        args = [randn(2, 3, 7, 8, seed=1), randn(4, 3, 3, 3, seed=2), randn(4, seed=3), 1]

    def run(make_layout):
        leaves = [make_layout(a).requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        out = fn(*leaves)
        grad_out = make_layout(randn(*out.shape, seed=9))
        tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
        return out, torch.autograd.grad(out, tensors, grad_out)

    def channels_last_or_transposed(t):
        if t.dim() == 4:
            view = t.contiguous(memory_format=torch.channels_last)
        elif t.dim() == 2:
            view = t.t().contiguous().t()
        else:
            return _strided(t)
        return view if not view.is_contiguous() else _strided(t)

    ref_out, ref_grads = run(lambda t: t.detach().clone())
    for layout in (_strided, channels_last_or_transposed):
        out, grads = run(lambda t: layout(t.detach()))
        # The wrappers copy to contiguous once; the kernels then see the same
        # values in the same order, so results are identical, not just close.
        assert torch.equal(out, ref_out)
        for g, r in zip(grads, ref_grads):
            assert torch.equal(g, r)


# --------------------------------------------------------------------------- LeNet's exact shapes at batch 64


BATCH = 64
LENET_LAYERS = {
    # name: (fused op or linear, input shape, weight shape, relu, input needs grad)
    "conv1": ("conv", (BATCH, 1, 28, 28), (6, 1, 3, 3), True, False),
    "conv2": ("conv", (BATCH, 6, 13, 13), (16, 6, 3, 3), True, True),
    "fc1": ("linear", (BATCH, 400), (120, 400), True, True),
    "fc2": ("linear", (BATCH, 120), (84, 120), True, True),
    "fc3": ("linear", (BATCH, 84), (10, 84), False, True),
}


@pytest.mark.parametrize("layer", list(LENET_LAYERS))
def test_lenet_layer_shapes_batch64_forward_backward(layer):
    kind, x_shape, w_shape, relu, x_grad = LENET_LAYERS[layer]
    x = randn(*x_shape, seed=1).requires_grad_(x_grad)
    w = (randn(*w_shape, seed=2) * 0.3).requires_grad_()
    b = (randn(w_shape[0], seed=3) * 0.1).requires_grad_()
    if kind == "conv":
        out = tb.conv3x3_relu_maxpool2x2(x, w, b, 0)
        ref = F.max_pool2d(F.relu(F.conv2d(x, w, b)), 2)
    else:
        out = tb.linear(x, w, b, relu)
        ref = F.linear(x, w, b)
        ref = F.relu(ref) if relu else ref
    assert_close_to_scale(out, ref, f"{layer} output")
    grad_out = randn(*out.shape, seed=4)
    wanted = [t for t in (x, w, b) if t.requires_grad]
    for name, got, want in zip("xwb" if x_grad else "wb", torch.autograd.grad(out, wanted, grad_out),
                               torch.autograd.grad(ref, wanted, grad_out)):
        assert_close_to_scale(got, want, f"{layer} grad {name}")


def test_lenet_training_step_matches_torch():
    torch.manual_seed(0)
    model = LeNet(backend="triton").to(DEVICE)
    reference = TorchLeNet().to(DEVICE)
    reference.load_state_dict(model.state_dict())
    images = randn(BATCH, 1, 28, 28, seed=5)
    labels = torch.randint(0, 10, (BATCH,), generator=torch.Generator().manual_seed(6)).to(DEVICE)

    losses = []
    for net in (model, reference):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        optimizer.zero_grad()
        loss = F.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=REL, atol=0)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert_close_to_scale(p.grad, q.grad, f"grad of {name}")
        assert_close_to_scale(p, q, f"{name} after the SGD step")


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
    assert_close_to_scale(row_loss[good], ref, "row losses")
    ref_dz = (torch.softmax(z[good].double(), 1) - F.one_hot(t[good], 10).double()) / 39
    assert_close_to_scale(dz[good], ref_dz, "d loss / d logits")


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
    # Enough pixel blocks that the reduction is split over several programs.
    x = randn(9, 2, 30, 30, seed=1)
    w = randn(3, 2, 3, 3, seed=2).requires_grad_()
    b = randn(3, seed=3).requires_grad_()
    grad_out = randn(9, 3, 14, 14, seed=4)

    def grads():
        out = tb.conv3x3_relu_maxpool2x2(x, w, b, 0)
        return torch.autograd.grad(out, (w, b), grad_out)

    first, second = grads(), grads()
    assert all(torch.equal(a, c) for a, c in zip(first, second))
    ref = F.max_pool2d(F.relu(F.conv2d(x, w, b)), 2)
    for got, want in zip(first, torch.autograd.grad(ref, (w, b), grad_out)):
        assert_close_to_scale(got, want, "gradient")


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED, reason="needs a GPU with > 20 GiB (tensors of more than 2**31 elements)")
def test_indices_past_2_31_elements():
    # 2**31 + a bit of fp32 input: every flat offset past 2**31 must be int64.
    n = 2**31 // (28 * 28) + 2
    x = torch.randn(n, 1, 28, 28, device="cuda")
    w = torch.randn(2, 1, 3, 3, device="cuda")
    b = torch.randn(2, device="cuda")
    pooled, winner = OPS.triton_maxpool2x2(x)
    tail = x[-3:]
    assert torch.equal(pooled[-3:], F.max_pool2d(tail, 2))
    fused, _ = OPS.triton_conv3x3_relu_maxpool2x2(x, w, b, 0)
    assert_close_to_scale(fused[-3:], F.max_pool2d(F.relu(F.conv2d(tail, w, b)), 2), "fused tail")
