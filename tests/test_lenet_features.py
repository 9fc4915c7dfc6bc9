"""kernels/lenet_features.py: LeNet's two conv stages in one Triton launch forward and
one backward, against max_pool2d(relu(conv2d(...))) twice, in float64 with autograd.

Inputs are multiples of 1/8 in [-1, 1] (helpers.exact_tensor): every sum is exact in
fp32, so pooling winners cannot flip on rounding and exact ties are frequent; the
codes must equal the winners torch picks.  Without a GPU the kernels run under
TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors, with the CPU's block sizes;
one test runs the GPU's block sizes there too.
"""

import contextlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import assert_close_scaled, exact_tensor
from lenet_fast.kernels import _common
from lenet_fast.kernels import lenet_features as lf
from lenet_fast.model import CONV_STAGES, IMAGE_SHAPE

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU, or TRITON_INTERPRET=1 for CPU tensors", allow_module_level=True)

# The interpreter's numpy arithmetic warns about the NaN some tests feed it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

REL = 1e-5  # relative to max(1, max|reference|)
BLOCKED = 4


def make_inputs(N, seed=0):
    """x, w1, b1, w2, b2, dfeatures: exact-arithmetic fp32 on the CPU."""
    g = torch.Generator().manual_seed(seed)

    def exact(*shape):
        return exact_tensor(shape, 1 / 8, -8, 8, generator=g)

    return (exact(N, 1, 28, 28), exact(6, 1, 3, 3), exact(6), exact(16, 6, 3, 3), exact(16), exact(N, 16, 5, 5))


def stock_code(pooled, index, width):
    """The kernels' code from max_pool2d's flat indices: the winner's row-major place in
    its 2x2 window, or 4 where ReLU blocks the gradient (pooled value <= 0)."""
    place = (index // width % 2) * 2 + index % width % 2
    return torch.where(pooled <= 0, BLOCKED, place).to(torch.uint8)


def reference(x, w1, b1, w2, b2, dfeatures):
    """(features, pooled1, code1, code2, [gw1, gb1, gw2, gb2]) of stock torch in float64."""
    params = [t.double().requires_grad_() for t in (w1, b1, w2, b2)]
    y1 = F.relu(F.conv2d(x.double(), params[0], params[1]))
    pooled1, i1 = F.max_pool2d(y1, 2, return_indices=True)
    y2 = F.relu(F.conv2d(pooled1, params[2], params[3]))
    features, i2 = F.max_pool2d(y2, 2, return_indices=True)
    grads = torch.autograd.grad(features, params, dfeatures.double(), allow_unused=True)
    return (features.detach(), pooled1.detach(), stock_code(pooled1, i1, 26), stock_code(features, i2, 11),
            list(grads))


def ours(x, w1, b1, w2, b2, dfeatures):
    """(features, pooled1, code1, code2, [gw1, gb1, gw2, gb2], partials) of the two kernels."""
    dev = [t.to(DEVICE) for t in (x, w1, b1, w2, b2, dfeatures)]
    features, pooled1, code1, code2 = lf.features_forward(*dev[:5])
    parts = lf.features_backward(dev[5], dev[0], pooled1, code1, code2, dev[3])
    return features, pooled1, code1, code2, [p.sum(0) for p in parts], parts


GRAD_NAMES = ("gw1", "gb1", "gw2", "gb2")


def check_against_stock(got, want, nonfinite=False):
    features, pooled1, code1, code2, grads, _ = got
    features_ref, pooled1_ref, code1_ref, code2_ref, grads_ref = want
    pairs = [("features", features, features_ref), ("pooled1", pooled1, pooled1_ref),
             *zip(GRAD_NAMES, grads, grads_ref)]
    for name, actual, expected in pairs:
        if nonfinite:
            assert_same_nonfinite(actual, expected, name)
        else:
            assert torch.isfinite(expected).all()
        finite = torch.isfinite(expected)
        assert_close_scaled(actual.cpu()[finite], expected[finite], REL, name)
    assert torch.equal(code1.cpu(), code1_ref), "code1 differs from torch's winners"
    assert torch.equal(code2.cpu(), code2_ref), "code2 differs from torch's winners"


def assert_same_nonfinite(actual, expected, name):
    actual = actual.detach().double().cpu()
    for what, test in (("NaN", torch.isnan), ("+inf", lambda t: t == math.inf), ("-inf", lambda t: t == -math.inf)):
        got, want = test(actual), test(expected)
        assert torch.equal(got, want), (f"{name}: {what} at {int(got.sum())} places, stock at {int(want.sum())}; "
                                        f"differ at {torch.nonzero(got ^ want).tolist()[:5]}")


def test_written_for_lenets_stages():
    """The kernels fix LeNet's shapes; they must be those the model declares."""
    assert lf.IMAGE_SHAPE == IMAGE_SHAPE
    assert [(s.in_channels, s.out_channels, s.padding) for s in CONV_STAGES] == [(1, 6, 0), (6, 16, 0)]
    assert (lf.W1_SHAPE, lf.W2_SHAPE) == ((6, 1, 3, 3), (16, 6, 3, 3))


# 1 and 2: one image per program; 3, 37: a last program with fewer images than the
# others (with the CPU's blocks); 64: LeNet's training batch.
@pytest.mark.parametrize("N", [1, 2, 3, 37, 64])
def test_matches_stock(N):
    inputs = make_inputs(N, seed=N)
    got = ours(*inputs)
    features, pooled1, code1, code2, _, parts = got
    assert (features.shape, features.dtype) == ((N, 16, 5, 5), torch.float32)
    assert (pooled1.shape, pooled1.dtype) == ((N, 6, 13, 13), torch.float32)
    assert (code1.shape, code1.dtype) == ((N, 6, 13, 13), torch.uint8)
    assert (code2.shape, code2.dtype) == ((N, 16, 5, 5), torch.uint8)
    P = lf.features_programs(N, on_gpu=DEVICE == "cuda")
    assert [tuple(p.shape) for p in parts] == [(P, 6, 1, 3, 3), (P, 6), (P, 16, 6, 3, 3), (P, 16)]
    assert all(p.dtype == torch.float32 for p in parts)
    want = reference(*inputs)
    check_against_stock(got, want)
    # Ties and ReLU-blocked windows occur, so the routing is really exercised.
    assert (code1 == BLOCKED).any() and (code1 != BLOCKED).any() and (code2 != BLOCKED).any()


def test_partial_dfeatures_shapes_and_buffers():
    """dfeatures as (N, 400); outputs written into given buffers, which come back as
    the same tensors; a wrong buffer is refused, not silently replaced."""
    N = 5
    x, w1, b1, w2, b2, dfeatures = (t.to(DEVICE) for t in make_inputs(N, seed=11))
    P = lf.features_programs(N, on_gpu=DEVICE == "cuda")
    bufs = (torch.full((N, 16, 5, 5), math.nan, device=DEVICE), torch.full((N, 6, 13, 13), math.nan, device=DEVICE),
            torch.full((N, 6, 13, 13), 7, dtype=torch.uint8, device=DEVICE),
            torch.full((N, 16, 5, 5), 7, dtype=torch.uint8, device=DEVICE))
    out = lf.features_forward(x, w1, b1, w2, b2, pooled1=bufs[1], code1=bufs[2], features=bufs[0], code2=bufs[3])
    assert all(a is b for a, b in zip(out, bufs))
    parts_bufs = [torch.full(s, math.nan, device=DEVICE) for s in ((P, 6, 1, 3, 3), (P, 6), (P, 16, 6, 3, 3), (P, 16))]
    parts = lf.features_backward(dfeatures.reshape(N, 400), x, out[1], out[2], out[3], w2, *parts_bufs)
    assert all(a is b for a, b in zip(parts, parts_bufs))
    fresh = lf.features_forward(x, w1, b1, w2, b2)
    assert all(torch.equal(a, b) for a, b in zip(out, fresh))
    fresh_parts = lf.features_backward(dfeatures, x, *fresh[1:], w2)
    assert all(torch.equal(a, b) for a, b in zip(parts, fresh_parts))
    with pytest.raises(ValueError):
        lf.features_forward(x, w1, b1, w2, b2, pooled1=torch.empty(N, 6, 13, 12, device=DEVICE))
    with pytest.raises(ValueError):
        lf.features_backward(dfeatures, x, *fresh[1:], w2, gw1_part=torch.empty(P + 1, 6, 1, 3, 3, device=DEVICE))
    with pytest.raises(TypeError):
        lf.features_forward(x.double(), w1, b1, w2, b2)


@pytest.mark.skipif(not INTERPRETED, reason="the GPU runs its own block sizes in test_matches_stock")
def test_gpu_block_sizes_under_the_interpreter(monkeypatch):
    """The GPU's configuration (one image per program, small pixel blocks, so every
    loop runs several blocks and the last one is partial) computes the same numbers."""
    gpu = lf.features_config(0, on_gpu=True)
    monkeypatch.setattr(lf, "features_config", lambda N, on_gpu=True: gpu)
    N = 3
    assert lf.features_programs(N, on_gpu=False) == N
    inputs = make_inputs(N, seed=3)
    check_against_stock(ours(*inputs), reference(*inputs))


def test_batch_zero_launches_nothing():
    x, w1, b1, w2, b2, dfeatures = (t.to(DEVICE) for t in make_inputs(0))
    with _common.recording_launches() as launches:
        features, pooled1, code1, code2 = lf.features_forward(x, w1, b1, w2, b2)
        parts = lf.features_backward(dfeatures, x, pooled1, code1, code2, w2)
    assert launches == []
    assert [tuple(t.shape) for t in (features, pooled1, code1, code2)] == [(0, 16, 5, 5), (0, 6, 13, 13),
                                                                            (0, 6, 13, 13), (0, 16, 5, 5)]
    assert lf.features_programs(0) == lf.features_programs(0, on_gpu=False) == 0
    assert [tuple(p.shape) for p in parts] == [(0, 6, 1, 3, 3), (0, 6), (0, 16, 6, 3, 3), (0, 16)]
    assert all(torch.equal(p.sum(0), torch.zeros(p.shape[1:], device=DEVICE)) for p in parts)


# Non-finite values reach the outputs and gradients exactly where stock's dense formulas
# put them.  "corner": x[27, 27] feeds only conv1's output (25, 25), whose pooled value
# (12, 12) feeds only conv2's output (10, 10), which floor-mode pooling drops: the
# features stay finite, but 0 * NaN makes gw2[:, :, 2, 2] and gw1[:, 0, 2, 2] NaN in
# stock, and here.  "nan w2": d pooled1 is NaN wherever that tap reaches an existing
# conv2 output, so it tests which taps the input gradient sums.
NONFINITE_CASES = {
    "nan x": lambda x, w2: x.__setitem__((1, 0, 9, 14), math.nan),
    "nan x corner": lambda x, w2: x.__setitem__((0, 0, 27, 27), math.nan),
    "-inf x edge": lambda x, w2: x.__setitem__((1, 0, 0, 5), -math.inf),
    "nan w2": lambda x, w2: w2.__setitem__((3, 2, 0, 2), math.nan),
}


@pytest.mark.parametrize("case", list(NONFINITE_CASES))
def test_nonfinite_values_as_in_stock(case):
    x, w1, b1, w2, b2, dfeatures = make_inputs(2, seed=7)
    NONFINITE_CASES[case](x, w2)
    inputs = (x, w1, b1, w2, b2, dfeatures)
    got, want = ours(*inputs), reference(*inputs)
    check_against_stock(got, want, nonfinite=True)
    if case == "nan x corner":
        assert torch.isfinite(got[0]).all()
        assert got[4][2][:, :, 2, 2].isnan().all() and got[4][0][:, 0, 2, 2].isnan().all()


@pytest.mark.parametrize("tap, stock_nan", [((0, 0), False), ((2, 2), True)], ids=["tap00", "tap22"])
def test_input_gradient_sums_exactly_the_taps_stock_does(tap, stock_nan):
    """conv2's input gradient (inside the backward) sums w2 * gconv2 over exactly the conv2
    outputs that exist, zero gradient or not.  pooled1's channel 2 is made ReLU-blocked
    everywhere but at (12, 12): tap (0, 0) of conv2 reaches that pixel from no existing
    output, tap (2, 2) only from output (10, 10), which floor-mode pooling drops.  A NaN
    in that tap of w2 therefore reaches gb1[2] and gw1[2] (through 0 * NaN) in stock for
    tap (2, 2) only."""
    x, w1, b1, w2, b2, dfeatures = make_inputs(2, seed=5)
    w1[2] = 0.0
    w1[2, 0, 1, 1] = 1.0
    b1[2] = -2.0  # conv1's channel 2 is x - 2 < 0, except where x is 4
    x[:, 0, 25:27, 25:27] = 4.0  # its window (12, 12)
    w2[3, 2, tap[0], tap[1]] = math.nan
    inputs = (x, w1, b1, w2, b2, dfeatures)
    got, want = ours(*inputs), reference(*inputs)
    assert (got[2][:, 2] != BLOCKED).sum() == 2  # only (12, 12), in both images
    check_against_stock(got, want, nonfinite=True)
    assert want[4][1][2].isnan().item() == stock_nan


def test_bitwise_reproducible():
    inputs = make_inputs(37, seed=21)
    first, second = ours(*inputs), ours(*inputs)
    for a, b in zip((*first[:4], *first[5]), (*second[:4], *second[5])):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _record(N, device):
    """Launches of each wrapper at batch N on `device` tensors (fake ones for CUDA)."""
    with FakeTensorMode() if device == "cuda" else contextlib.nullcontext():
        x, w1, b1, w2, b2 = (torch.empty(s, device=device) for s in
                             ((N, 1, 28, 28), (6, 1, 3, 3), (6,), (16, 6, 3, 3), (16,)))
        with _common.recording_launches() as fwd:
            features, pooled1, code1, code2 = lf.features_forward(x, w1, b1, w2, b2)
        with _common.recording_launches() as bwd:
            parts = lf.features_backward(torch.empty_like(features), x, pooled1, code1, code2, w2)
        return fwd, bwd, [tuple(p.shape) for p in parts]


@pytest.mark.parametrize("N", [64, 256, 1024])
def test_one_launch_each_on_a_gpu(N):
    """What the wrappers would launch for CUDA tensors (recorded on fake ones, no GPU
    needed): one launch each, one program per image, P rows of partials."""
    fwd, bwd, part_shapes = _record(N, "cuda")
    assert [launch.kernel for launch in fwd] == [lf.lenet_features_fwd_kernel]
    assert [launch.kernel for launch in bwd] == [lf.lenet_features_bwd_kernel]
    P = lf.features_programs(N)
    assert P == N and fwd[0].grid == bwd[0].grid == (P,)
    assert part_shapes == [(P, 6, 1, 3, 3), (P, 6), (P, 16, 6, 3, 3), (P, 16)]


@pytest.mark.parametrize("N", [1, 37])
def test_one_launch_each_on_the_cpu(N):
    fwd, bwd, part_shapes = _record(N, "cpu")
    assert len(fwd) == len(bwd) == 1
    P = lf.features_programs(N, on_gpu=False)
    assert fwd[0].grid == bwd[0].grid == (P,) and part_shapes[1] == (P, 6)
