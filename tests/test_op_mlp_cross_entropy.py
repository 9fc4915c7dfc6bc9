"""ops.mlp_cross_entropy on every backend against the layers one by one from torch.nn.functional.

The reference runs in float64 on the same float32 inputs; loss, logits and the
gradient of every input are compared, with the upstream gradient reaching both
outputs (the loss and the logits) so that both backward paths are exercised.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import F64_REL, FWD_REL, GRAD_REL, assert_close_scaled, head_inputs, leaf, skip_unless_dtype
from lenet_fast import ops

# (batch, in_features, layer widths): LeNet's head at batch 64, then the edges: one layer,
# one class, odd sizes, batch 1, the empty batch (stock's mean over nothing is NaN).
SHAPES = [
    (64, 400, (120, 84, 10)),
    (1, 400, (120, 84, 10)),
    (7, 33, (17, 5)),
    (5, 6, (3,)),
    (3, 4, (2, 1)),
    (0, 400, (120, 84, 10)),
]


def reference(x, weights, biases, target):
    x = torch.flatten(x, 1)
    for weight, bias in zip(weights[:-1], biases[:-1]):
        x = F.relu(F.linear(x, weight, bias))
    logits = F.linear(x, weights[-1], biases[-1])
    return F.cross_entropy(logits, target), logits


def run(fn, x, weights, biases, target, device, dtype, reach=("loss", "logits")):
    """(loss, logits, gradients of x, weights..., biases...) for loss * 0.75 + (logits * G).sum(),
    or one of the two terms alone (`reach`): the other output then gets no gradient at all."""
    x = leaf(x.to(device, dtype))
    weights = [leaf(w.to(device, dtype)) for w in weights]
    biases = [leaf(b.to(device, dtype)) for b in biases]
    loss, logits = fn(x, weights, biases, target.to(device))
    g = torch.linspace(-1, 1, logits.numel(), dtype=dtype, device=device).reshape(logits.shape)
    terms = {"loss": loss * 0.75, "logits": (logits * g).sum()}
    grads = torch.autograd.grad(sum(terms[name] for name in reach), [x, *weights, *biases])
    return loss, logits, grads


def compare(backend, device, inputs, reach=("loss", "logits"), dtype=torch.float32):
    """The backend in `dtype` against the reference in float64: FWD_REL / GRAD_REL for
    float32, F64_REL for float64."""
    loss, logits, grads = run(lambda *a: ops.mlp_cross_entropy(*a, backend=backend), *inputs, device, dtype, reach)
    ref_loss, ref_logits, ref_grads = run(reference, *inputs, "cpu", torch.float64, reach)
    fwd_rel, grad_rel = (FWD_REL, GRAD_REL) if dtype == torch.float32 else (F64_REL, F64_REL)
    assert loss.shape == () and loss.dtype == dtype and loss.device.type == torch.device(device).type
    assert_close_scaled(loss, ref_loss, fwd_rel, "loss")
    assert_close_scaled(logits, ref_logits, fwd_rel, "logits")
    for i, (got, want) in enumerate(zip(grads, ref_grads)):
        assert_close_scaled(got, want, grad_rel, f"gradient of input {i}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-" + "-".join(map(str, s[2])))
def test_matches_stock(backend_device, shape):
    backend, device = backend_device
    compare(backend, device, head_inputs(*shape))


@pytest.mark.parametrize("shape", [(4, 6, (5, 4, 3)), (64, 400, (120, 84, 10))],
                         ids=lambda s: f"{s[0]}x{s[1]}-" + "-".join(map(str, s[2])))
def test_float64(backend_device, shape):
    """Both outputs reached, so both backward paths run in float64."""
    backend, device = backend_device
    skip_unless_dtype(backend, torch.float64)
    x, weights, biases, target = head_inputs(*shape, seed=12)
    compare(backend, device, (x.double(), [w.double() for w in weights], [b.double() for b in biases], target),
            dtype=torch.float64)


@pytest.mark.parametrize("reach", ["loss", "logits"])
def test_gradient_through_one_output_only(backend_device, reach):
    """Training uses the loss alone; the other output's gradient is then absent (not
    zeros: the ext autograd node does not materialise it)."""
    backend, device = backend_device
    compare(backend, device, head_inputs(64, 400, (120, 84, 10), seed=3), reach=(reach,))


@pytest.mark.parametrize("frozen", ["x", "parameters"])
def test_gradient_of_part_of_the_inputs(backend_device, frozen):
    """Inputs that need no gradient get none, and the others' are still right (the ext
    backward then skips the input-gradient or the weight-gradient GEMMs)."""
    backend, device = backend_device
    x, weights, biases, target = head_inputs(64, 400, (120, 84, 10), seed=9)
    grads = {}
    for name, fn, dev, dtype in (("got", lambda *a: ops.mlp_cross_entropy(*a, backend=backend), device, torch.float32),
                                 ("want", reference, "cpu", torch.float64)):
        xs = leaf(x.to(dev, dtype), frozen != "x")
        params = [leaf(t.to(dev, dtype), frozen != "parameters") for t in (*weights, *biases)]
        loss, _ = fn(xs, params[:3], params[3:], target.to(dev))
        wanted = [xs] if frozen == "parameters" else params
        grads[name] = torch.autograd.grad(loss, wanted)
    for i, (got, want) in enumerate(zip(grads["got"], grads["want"])):
        assert_close_scaled(got, want, GRAD_REL, f"gradient {i}")


def test_nan_input_gives_nan_like_stock(backend_device):
    backend, device = backend_device
    x, weights, biases, target = head_inputs(6, 9, (7, 4), seed=3)
    x[2, 5] = float("nan")
    compare(backend, device, (x, weights, biases, target))


def test_large_logits_do_not_overflow(backend_device):
    backend, device = backend_device
    x, weights, biases, target = head_inputs(5, 8, (6,), seed=4)
    compare(backend, device, (x * 300.0, weights, biases, target))  # logits ~ +-1e3: exp() needs the max shift


def test_non_contiguous_inputs(backend_device):
    backend, device = backend_device
    x, weights, biases, target = head_inputs(9, 12, (7, 5), seed=7)
    x = x.t().contiguous().t()                                        # column-major
    weights = [w.t().contiguous().t() for w in weights]
    target = torch.stack([target, target], 1)[:, 0]                   # stride 2
    assert not x.is_contiguous() and not weights[0].is_contiguous() and not target.is_contiguous()
    compare(backend, device, (x, weights, biases, target))


@pytest.mark.parametrize("batch", [64, 1, 0])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_unflattened_conv_features(backend_device, batch, layout):
    """A conv stack's (N, C, H, W) output goes in as it is, flattened from dim 1 like
    torch.flatten(x, 1), also when it is not contiguous; x's gradient keeps x's shape."""
    backend, device = backend_device
    x, weights, biases, target = head_inputs(batch, 400, (120, 84, 10), seed=8)
    x = x.reshape(batch, 16, 5, 5)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        assert batch <= 1 or not x.is_contiguous()
    compare(backend, device, (x, weights, biases, target))


def test_target_out_of_range_fails(backend_device):
    backend, device = backend_device
    x, weights, biases, target = head_inputs(4, 5, (3,), seed=5)
    target[1] = 3
    if device == "cuda":
        pytest.skip("out-of-range targets trip a device-side assert on CUDA, as in stock")
    with pytest.raises(IndexError, match="3"):
        ops.mlp_cross_entropy(x.to(device), [w.to(device) for w in weights], [b.to(device) for b in biases],
                              target.to(device), backend=backend)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a: {**a, "weights": a["weights"][0]}, TypeError, "weights and biases must be lists"),
        (lambda a: {**a, "biases": a["biases"][:1]}, ValueError, "one bias per weight"),
        (lambda a: {**a, "weights": [], "biases": []}, ValueError, "at least one layer"),
        (lambda a: {**a, "x": a["x"][:, :4]}, ValueError, r"x has 4 features .* weights\[0\] expects 5"),
        (lambda a: {**a, "weights": [a["weights"][0], a["weights"][1][:, :2]]}, ValueError,
         r"layer 0 gives 3 features .* weights\[1\] expects 2"),
        (lambda a: {**a, "biases": [a["biases"][0], a["biases"][1][:1]]}, ValueError, r"biases\[1\] must have shape"),
        (lambda a: {**a, "target": a["target"].float()}, TypeError, "target must be an int64 tensor"),
        (lambda a: {**a, "target": a["target"][:2]}, ValueError, r"target must have shape \(4,\)"),
        (lambda a: {**a, "x": a["x"].double()}, TypeError, r"weights\[0\] has dtype torch.float32"),
        (lambda a: {**a, "x": a["x"][0]},
         ValueError, r"x must be at least 2-D \(N, in_features, ...\), got shape \(5,\)"),
    ],
    ids=["weights-not-list", "bias-count", "no-layers", "x-features", "layer-chain", "bias-shape",
         "target-dtype", "target-shape", "dtype-mismatch", "x-rank"],
)
def test_bad_input_names_the_argument(change, error, message):
    x, weights, biases, target = head_inputs(4, 5, (3, 2), seed=6)
    args = change({"x": x, "weights": weights, "biases": biases, "target": target})
    with pytest.raises(error, match=message):
        ops.mlp_cross_entropy(args["x"], args["weights"], args["biases"], args["target"], backend="torch")


# --------------------------------------------------------------------------- opcheck samples


def opcheck_samples(op, randn):
    """{(op name, case): arguments} for tests/test_op_table.py (see test_op_conv3x3_relu.py):
    the head on 2-D features and on a conv stack's (N, C, H, W) output; its backward with
    the loss's gradient, the logits', or both."""
    x, weights, biases, target = head_inputs(4, 6, (5, 4, 3), seed=12)
    device = randn(1).device
    x, target = leaf(x.to(device)), target.to(device)
    weights, biases = [leaf(t.to(device)) for t in weights], [leaf(t.to(device)) for t in biases]
    x4 = leaf(x.reshape(4, 2, 1, 3))
    with torch.no_grad():
        _, logits, dlogits, hidden = op("mlp_cross_entropy")(x, weights, biases, target)
        _, logits4, dlogits4, hidden4 = op("mlp_cross_entropy")(x4, weights, biases, target)
    saved = (dlogits, logits, x.detach(), [w.detach() for w in weights], list(hidden))
    saved4 = (dlogits4, logits4, x4.detach(), [w.detach() for w in weights], list(hidden4))
    one, half = torch.tensor(1.0, device=device), torch.tensor(0.5, device=device)
    return {
        ("mlp_cross_entropy", "2d"): (x, weights, biases, target),
        ("mlp_cross_entropy", "4d"): (x4, weights, biases, target),
        ("mlp_cross_entropy_backward", "both-outputs"): (half, randn(*logits.shape), *saved, True, True),
        ("mlp_cross_entropy_backward", "loss-only-no-input-grad"): (one, None, *saved, False, True),
        ("mlp_cross_entropy_backward", "4d-loss-only"): (one, None, *saved4, True, True),
        ("mlp_cross_entropy_backward", "logits-only-no-weight-grad"):
            (None, randn(*logits.shape), *saved, True, False),
    }
