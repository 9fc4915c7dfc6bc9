"""Stock semantics at the edges, the same on every backend: non-finite values in the
convolution backward, ignore_index in the head's loss, empty feature and channel
dimensions, double backward, and dtypes a backend does not take."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import GRAD_REL, assert_close_scaled, grads_of, leaf
from lenet_fast import backends, ops

DTYPE = {"ext": torch.float64, "torch": torch.float64, "triton": torch.float32}
# The Triton interpreter's numpy matmul warns about the NaN these tests feed it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _stock_conv(op, padding):
    def run(x, w, b):
        y = F.relu(F.conv2d(x, w, b, padding=padding))
        return F.max_pool2d(y, 2) if op == "conv3x3_relu_maxpool2x2" else y
    return run


def assert_same_nonfinite_then_close(actual, expected, name):
    """NaN and +-inf exactly where the reference has them; finite values within GRAD_REL
    of the finite values' scale."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    for what, test in (("NaN", torch.isnan), ("+inf", lambda t: t == math.inf), ("-inf", lambda t: t == -math.inf)):
        got, want = test(actual), test(expected)
        assert torch.equal(got, want), (f"{name}: {what} at {int(got.sum())} places, stock at {int(want.sum())}; "
                                        f"differ at {torch.nonzero(got ^ want).tolist()[:5]}")
    finite = torch.isfinite(expected)
    assert_close_scaled(actual[finite], expected[finite], GRAD_REL, name)


# Each case puts one non-finite value where a kernel that multiplies the zero padding
# of a gradient buffer (0 * w, 0 * x) would spread it further than stock's dense
# formula does: a weight tap, an input pixel on the border, an input pixel that a
# flat row-major buffer would pair with the previous row's end.
NONFINITE_CASES = {
    "nan weight": lambda x, w: w.__setitem__((1, 0, 0, 1), math.nan),
    "inf weight": lambda x, w: w.__setitem__((2, 1, 2, 2), math.inf),
    "inf x corner": lambda x, w: x.__setitem__((0, 1, 0, 0), math.inf),
    "inf x row start": lambda x, w: x.__setitem__((1, 0, 3, 0), -math.inf),
    "nan x": lambda x, w: x.__setitem__((0, 1, 2, 3), math.nan),
}


@pytest.mark.parametrize("op", ["conv3x3_relu", "conv3x3_relu_maxpool2x2"])
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("size", [(6, 6), (7, 9)], ids=["even", "odd"])  # odd: floor-mode pooling drops a row
@pytest.mark.parametrize("case", list(NONFINITE_CASES))
def test_nonfinite_values_reach_the_gradients_as_in_stock(backend_device, op, padding, size, case):
    backend, device = backend_device
    dtype = DTYPE[backend]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, *size, generator=g, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64) / 3
    b = torch.randn(3, generator=g, dtype=torch.float64) * 0.1
    NONFINITE_CASES[case](x, w)
    inputs = [x.to(dtype), w.to(dtype), b.to(dtype)]  # rounded once: both sides see the same values
    ours = [leaf(t.to(device)) for t in inputs]
    refs = [leaf(t.double()) for t in inputs]
    out = getattr(ops, op)(*ours, padding=padding, backend=backend)
    ref = _stock_conv(op, padding)(*refs)
    assert_same_nonfinite_then_close(out, ref, "output")
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(dtype)
    for name, got, want in zip(("grad x", "grad weight", "grad bias"), grads_of(out, ours, grad.to(device)),
                               grads_of(ref, refs, grad.double())):
        assert_same_nonfinite_then_close(got, want, name)


@pytest.mark.parametrize("shape", [(3, 4, 0), (2, 0), (0, 0), (5, 1, 0)])
def test_linear_without_input_features_is_the_bias(backend_device, shape):
    """in_features == 0: every output is the bias (or 0), as stock; gradients: the bias
    gets the summed output gradient, x and the empty weight get empty gradients."""
    backend, device = backend_device
    dtype = DTYPE[backend]
    x = torch.randn(shape, dtype=dtype)
    w, b = torch.randn(5, 0, dtype=dtype), torch.randn(5, dtype=dtype)
    for relu in (False, True):
        ours = [leaf(t.to(device)) for t in (x, w, b)]
        refs = [leaf(t.double()) for t in (x, w, b)]
        out = ops.linear(*ours, relu=relu, backend=backend)
        ref = F.linear(*refs)
        ref = F.relu(ref) if relu else ref
        assert out.shape == ref.shape == (*shape[:-1], 5)
        assert_close_scaled(out, ref, 1e-6, "output")
        grad = torch.randn(ref.shape, dtype=torch.float64)
        for name, got, want in zip(("x", "weight", "bias"), grads_of(out, ours, grad.to(dtype).to(device)),
                                   grads_of(ref, refs, grad)):
            assert_close_scaled(got, want, GRAD_REL, f"grad {name}")


@pytest.mark.parametrize("target", [[3, -100, 0, -100, 9, 1], [-100] * 6, [-100, 2, 2, 2, 2, 2]],
                         ids=["some ignored", "all ignored", "first ignored"])
def test_cross_entropy_ignores_target_minus_100_as_stock(backend_device, target):
    """A target of -100 (stock cross_entropy's ignore_index) adds nothing to the loss or the
    gradients, and the mean is over the other rows; every row ignored: NaN loss (0 / 0)
    and zero gradients, as in stock."""
    backend, device = backend_device
    dtype = DTYPE[backend]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 12, generator=g, dtype=dtype)
    w1, b1 = torch.randn(8, 12, generator=g, dtype=dtype) / 4, torch.randn(8, generator=g, dtype=dtype) / 10
    w2, b2 = torch.randn(10, 8, generator=g, dtype=dtype) / 3, torch.randn(10, generator=g, dtype=dtype) / 10
    t = torch.tensor(target)
    ours = [leaf(v.to(device)) for v in (x, w1, b1, w2, b2)]
    refs = [leaf(v.double()) for v in (x, w1, b1, w2, b2)]
    loss, logits = ops.mlp_cross_entropy(ours[0], ours[1::2], ours[2::2], t.to(device), backend=backend)
    ref_logits = F.linear(F.relu(F.linear(refs[0], refs[1], refs[2])), refs[3], refs[4])
    ref_loss = F.cross_entropy(ref_logits, t)
    assert_close_scaled(logits, ref_logits, 1e-5, "logits")
    assert_close_scaled(loss, ref_loss, 1e-5, "loss")  # NaN where stock's is NaN
    for name, got, want in zip(("x", "w1", "b1", "w2", "b2"), torch.autograd.grad(loss, ours),
                               torch.autograd.grad(ref_loss, refs)):
        assert_close_scaled(got, want, GRAD_REL, f"grad {name}")


def test_cross_entropy_other_negative_targets_still_fail_on_the_cpu(backend_device):
    backend, device = backend_device
    if device != "cpu":
        pytest.skip("on a GPU a kernel cannot raise: the loss is NaN there (docs/kernels.md)")
    x, w, b = torch.randn(3, 4, dtype=DTYPE[backend]), torch.eye(4, dtype=DTYPE[backend]), torch.zeros(4)
    with pytest.raises(IndexError, match="-5"):
        ops.mlp_cross_entropy(x, [w], [b.to(x.dtype)], torch.tensor([0, -5, 1]), backend=backend)


def test_maxpool_refuses_zero_channels_as_stock(backend_device):
    backend, device = backend_device
    x = torch.zeros(2, 0, 4, 4, dtype=DTYPE[backend], device=device)
    with pytest.raises(RuntimeError):
        F.max_pool2d(x, 2)
    with pytest.raises(ValueError, match=r"x of shape \(2, 0, 4, 4\) has no channels"):
        ops.maxpool2x2(x, backend=backend)


@pytest.mark.parametrize("op", ["conv3x3_relu", "conv3x3_relu_maxpool2x2", "linear", "mlp_cross_entropy"])
def test_double_backward_is_refused_never_wrong(backend_device, op):
    """A backward with create_graph=True (gradient penalties, Hessians) through lenet_fast's
    kernels raises NotImplementedError naming the op; torch's own backend differentiates
    twice as stock does."""
    backend, device = backend_device
    dtype = DTYPE[backend]
    g = torch.Generator().manual_seed(5)
    x = leaf(torch.randn(2, 2, 6, 6, generator=g, dtype=dtype).to(device))
    w = leaf(torch.randn(3, 2, 3, 3, generator=g, dtype=dtype).to(device))
    if op == "linear":
        x, w = leaf(torch.randn(4, 5, dtype=dtype).to(device)), leaf(torch.randn(3, 5, dtype=dtype).to(device))
        out = ops.linear(x, w, relu=True, backend=backend)
    elif op == "mlp_cross_entropy":
        x, w = leaf(torch.randn(4, 5, dtype=dtype).to(device)), leaf(torch.randn(3, 5, dtype=dtype).to(device))
        out = ops.mlp_cross_entropy(x, [w], [torch.zeros(3, dtype=dtype, device=device)],
                                    torch.tensor([0, 2, 1, 1], device=device), backend=backend)[0]
    else:
        out = getattr(ops, op)(x, w, None, backend=backend)
    loss = (out * out).sum()
    if backend == "torch":
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        gx.sum().backward()
        assert w.grad is not None
        return
    with pytest.raises(NotImplementedError, match=r"double backward .* not supported by lenet_fast::"):
        torch.autograd.grad(loss, x, create_graph=True)
    # the first derivative alone still works
    assert torch.autograd.grad(loss, x)[0].shape == x.shape


@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_a_backend_named_for_a_dtype_it_does_not_take_says_so(backend):
    supported = backends.get_backend(backend).dtypes
    dtype = next(d for d in (torch.float16, torch.bfloat16, torch.float64) if d not in supported)
    x, w = torch.randn(3, 4, dtype=dtype), torch.randn(2, 4, dtype=dtype)
    names = ", ".join(str(d).replace("torch.", "") for d in supported)
    with pytest.raises(TypeError, match=rf"the {backend} backend supports {names} tensors, got "
                                        rf"{str(dtype).replace('torch.', '')}"):
        ops.linear(x, w, backend=backend)
    model_dtype_error = pytest.raises(TypeError, match=f"the {backend} backend supports")
    import lenet_fast

    with model_dtype_error:
        lenet_fast.LeNet(backend=backend).to(dtype)(torch.zeros(1, 1, 28, 28, dtype=dtype))
