"""What is specific to the "ext" backend (lenet_fast._C, csrc/): its CPU engine paths,
determinism across runs and thread counts, count_correct, run_backward, errors from its
kernel checks, its CUDA build's resource usage and torch.compile.

Output values against stock PyTorch are checked in tests/test_op_<name>.py and
tests/test_model.py, and what both kernel backends promise for every op (registration,
opcheck, fakes, the backward contract, double backward) in tests/test_op_table.py.
Tolerances: helpers.GRAD_REL where two paths may round differently, else bitwise.
CUDA variants run only where a GPU and the CUDA kernels are present.
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers import GRAD_REL, assert_close_scaled, head_inputs, leaf

try:
    from lenet_fast import ext_backend as E
except ImportError as exc:  # pragma: no cover
    pytest.skip(f"ext backend unavailable: {exc}", allow_module_level=True)

from lenet_fast import ops as lf_ops  # noqa: E402

OPS = torch.ops.lenet_fast


def _public(name):
    """The ext op `name` returning its public outputs (lenet_fast.ops.OpDef.public), as
    lenet_fast.backends.ExtBackend runs it."""
    op, fn = lf_ops.OPS_BY_NAME[name], getattr(OPS, f"ext_{name}").default
    return lambda *args: op.public(fn(*args))


conv3x3_relu, maxpool2x2, conv3x3_relu_maxpool2x2, linear, mlp_cross_entropy = map(
    _public, ("conv3x3_relu", "maxpool2x2", "conv3x3_relu_maxpool2x2", "linear", "mlp_cross_entropy"))
count_correct, run_backward = OPS.ext_count_correct.default, OPS.run_backward.default


def _devices():
    devs = ["cpu"]
    marks = []
    if not torch.cuda.is_available():
        marks = [pytest.mark.skip(reason="no CUDA GPU")]
    elif not E.HAS_CUDA_KERNELS:
        marks = [pytest.mark.skip(reason="lenet_fast._C built without CUDA kernels")]
    return [pytest.param(d) for d in devs] + [pytest.param("cuda", marks=[pytest.mark.cuda, *marks])]


DEVICES = _devices()


def _conv_inputs(n, cin, cout, h, w, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g, dtype=dtype).to(device).requires_grad_()
    wt = (torch.randn(cout, cin, 3, 3, generator=g, dtype=dtype) / (3 * cin**0.5)).to(device).requires_grad_()
    b = (torch.randn(cout, generator=g, dtype=dtype) * 0.1).to(device).requires_grad_() if bias else None
    return x, wt, b


def _head_inputs(dtype, device, n=4, widths=(5, 4, 3), seed=12):
    """helpers.head_inputs as leaves of `dtype` on `device` (6 input features)."""
    x, weights, biases, target = head_inputs(n, 6, widths, seed)
    as_leaf = lambda t: leaf(t.to(device, dtype))  # noqa: E731
    return as_leaf(x), [as_leaf(w) for w in weights], [as_leaf(b) for b in biases], target.to(device)


# --- the CPU engine paths: each must agree with the other path it replaces -------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "shape",
    # (N, Cout, H, W, padding): LeNet conv1; pooled width a multiple of the vector
    # width with an odd conv width (19 -> 17 -> 8); odd sizes; padding 1; tiny.
    [(4, 6, 28, 28, 0), (3, 5, 12, 19, 0), (2, 3, 9, 18, 1), (2, 7, 11, 35, 1), (1, 1, 4, 4, 0)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_fused_forward_cin1_path_matches_channels_last_path(shape, dtype):
    # Cin == 1 takes the pixel-vectorised CPU forward (fused_forward_cin1 in
    # csrc/cpu_fused.h); adding a second, all-zero input channel with zero
    # weights sends the same conv through the channels-last engine with the
    # same per-output summation order (the extra terms add +0).  Values and
    # winner codes must be bit-identical, including ties and NaN windows.  (Both
    # against stock, these shapes included: tests/test_op_conv3x3_relu_maxpool2x2.py.)
    n, cout, h, w, p = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, h, w, generator=g, dtype=dtype)
    x[0, 0, h // 2, w // 2] = float("nan")
    x[-1, 0, 0, :3] = float("nan")
    x[-1, 0, h - 1, w - 2 :] = 0.0  # zero region: ties at the bias, masked windows
    wt = torch.randn(cout, 1, 3, 3, generator=g, dtype=dtype) / 3
    wt[0] = 0.0  # channel 0: every window a tie at its bias
    b = torch.randn(cout, generator=g, dtype=dtype) * 0.1
    b[0] = 0.0 if cout == 1 else 0.25
    x2 = torch.cat([x, torch.zeros_like(x)], 1)
    w2 = torch.cat([wt, torch.zeros_like(wt)], 1)
    for bias in (b, None):
        out1, idx1 = OPS.ext_conv3x3_relu_maxpool2x2(x, wt, bias, p)
        out2, idx2 = OPS.ext_conv3x3_relu_maxpool2x2(x2, w2, bias, p)
        assert torch.equal(idx1, idx2)
        assert torch.equal(out1.isnan(), out2.isnan())
        assert torch.equal(out1.nan_to_num(), out2.nan_to_num())
        assert torch.equal(out1.signbit(), out2.signbit())


@pytest.mark.parametrize(
    "shape",
    [(5, 1, 6, 28, 28, 1), (9, 6, 16, 13, 13, 0), (3, 8, 3, 7, 9, 1), (1, 2, 5, 10, 9, 0), (2, 5, 7, 11, 8, 1)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_fused_backward_fast_path_matches_general_path(shape):
    # float32 with 1..8 input channels takes the winners-only backward of
    # csrc/cpu_fused.h; float64 takes the dense general path (cpu_conv.h).  Same
    # codes, same gradients: they must agree to float32 rounding, GRAD_REL (and both
    # match stock: tests/test_op_conv3x3_relu_maxpool2x2.py, float32 and float64).
    n, cin, cout, h, w, p = shape
    x, wt, b = _conv_inputs(n, cin, cout, h, w, torch.float32, "cpu", seed=21)
    out, idx = OPS.ext_conv3x3_relu_maxpool2x2(x, wt, b, p)
    assert (idx == 4).any() and (idx < 4).any()  # some windows masked by ReLU, some not
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(22))
    fast = OPS.ext_conv3x3_relu_maxpool2x2_backward(g, idx, x.detach(), wt.detach(), p, True, True)
    gen = OPS.ext_conv3x3_relu_maxpool2x2_backward(
        g.double(), idx, x.detach().double(), wt.detach().double(), p, True, True
    )
    for a, c, what in zip(fast, gen, ("grad_x", "grad_w", "grad_b")):
        assert_close_scaled(a, c, GRAD_REL, what)
    only_w = OPS.ext_conv3x3_relu_maxpool2x2_backward(g, idx, x.detach(), wt.detach(), p, False, True)
    only_x = OPS.ext_conv3x3_relu_maxpool2x2_backward(g, idx, x.detach(), wt.detach(), p, True, False)
    assert torch.equal(only_w[1], fast[1]) and torch.equal(only_w[2], fast[2]) and torch.equal(only_x[0], fast[0])


# --- torch.library.opcheck of the ext-only op that opcheck can run ----------------------
# (run_backward and ext_lenet_sgd_step have side effects; the table's ops for both kernel
# backends: tests/test_op_table.py.)
def test_opcheck_count_correct():
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(9))
    torch.library.opcheck(count_correct, (logits, torch.tensor([0, 3, 9, 9, 1, 2])))


# --- determinism ------------------------------------------------------------------------
def _grads(fn, inputs, seed=2):
    y = fn(*inputs)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad(y, diff, g)


@pytest.mark.parametrize(
    "op",
    [
        ("fused", conv3x3_relu_maxpool2x2, (64, 6, 16, 13, 13, 0)),
        ("fused", conv3x3_relu_maxpool2x2, (37, 1, 6, 28, 28, 1)),
        ("conv_relu", conv3x3_relu, (33, 6, 16, 13, 13, 0)),
    ],
    ids=lambda o: o[0] + "-" + "x".join(map(str, o[2])),
)
def test_conv_gradients_deterministic_across_runs_and_threads(op):
    _, fn, (n, cin, cout, h, w, p) = op
    x, wt, b = _conv_inputs(n, cin, cout, h, w, torch.float32, "cpu", seed=12)
    threads = torch.get_num_threads()
    try:
        runs = []
        for nt in (threads, threads, 1, 3):
            torch.set_num_threads(nt)
            runs.append(_grads(lambda *a: fn(*a, p), (x, wt, b)))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(a, c)


@pytest.mark.parametrize("shape", [(64, 400, 120), (100, 84, 10), (7, 120, 84)], ids=lambda s: "x".join(map(str, s)))
def test_linear_deterministic_across_runs(shape):
    """Same inputs, same thread count -> the same bits.  (Across thread counts the
    GEMMs, at::mm as in stock, may round differently: MKL splits them per thread.)"""
    n, k, o = shape
    g = torch.Generator().manual_seed(13)
    x = torch.randn(n, k, generator=g, requires_grad=True)
    w = torch.randn(o, k, generator=g, requires_grad=True)
    b = torch.randn(o, generator=g, requires_grad=True)
    runs = [[linear(x, w, b, True).detach(), *_grads(lambda *a: linear(*a, True), (x, w, b))] for _ in range(3)]
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(a, c)


@pytest.mark.parametrize("shape", [(64, 400, 120), (100, 84, 10), (1024, 400, 120)],
                         ids=lambda s: "x".join(map(str, s)))
def test_linear_backward_deterministic_per_thread_count(shape):
    """The backward's two GEMMs run side by side, one per thread: for each thread count
    the gradients are the same bits run after run, and across thread counts they agree
    to float32 GEMM rounding (GRAD_REL).  (Bitwise across thread counts is not promised:
    with many cores the bits differed at 1024x400x120, most likely MKL splitting a GEMM's
    reduction for the global thread count, as torch turns MKL's dynamic threading off.)"""
    n, k, o = shape
    g = torch.Generator().manual_seed(14)
    x, w = torch.randn(n, k, generator=g), torch.randn(o, k, generator=g)
    out, grad = torch.randn(n, o, generator=g), torch.randn(n, o, generator=g)
    threads = torch.get_num_threads()
    by_count = {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            first, second = (OPS.ext_linear_backward(grad, out, x, w, True, True, True) for _ in range(2))
            for a, c in zip(first, second):
                assert torch.equal(a, c), f"{count} thread(s): two runs differ"
            by_count[count] = first
    finally:
        torch.set_num_threads(threads)
    for a, c, what in zip(by_count[1], by_count[2], ("grad_x", "grad_w", "grad_b")):
        assert_close_scaled(a, c, GRAD_REL, what)


def test_mlp_cross_entropy_deterministic_across_runs():
    x, weights, biases, target = _head_inputs(torch.float32, "cpu", n=64, widths=(120, 84, 10))
    runs = []
    for _ in range(3):
        loss, logits = mlp_cross_entropy(x, weights, biases, target)
        runs.append([loss.detach(), logits.detach(), *torch.autograd.grad(loss, [x, *weights, *biases])])
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mlp_cross_entropy_unit_loss_gradient_is_exact(dtype):
    """A loss gradient of exactly 1 (what loss.backward() sends) skips the scaling pass over
    dlogits; scaling by 2 is exact in floating point, so the two paths must agree bitwise."""
    x, weights, biases, target = _head_inputs(dtype, "cpu", n=64, widths=(120, 84, 10))
    loss, _ = mlp_cross_entropy(x, weights, biases, target)
    params = [x, *weights, *biases]
    unit = torch.autograd.grad(loss, params, torch.ones((), dtype=dtype), retain_graph=True)
    two = torch.autograd.grad(loss, params, torch.full((), 2.0, dtype=dtype), retain_graph=True)
    half = torch.autograd.grad(loss, params, torch.full((), 0.5, dtype=dtype))
    for u, t, h in zip(unit, two, half):
        assert torch.equal(u * 2, t) and torch.equal(u * 0.5, h)


def test_pool_gradients_deterministic():
    g = torch.Generator().manual_seed(13)
    p = torch.randn(8, 6, 26, 26, generator=g, requires_grad=True)
    assert torch.equal(_grads(maxpool2x2, (p,))[0], _grads(maxpool2x2, (p,))[0])


# --- torch.compile: the same kernels in one graph, so the same bits ------------------------
def test_torch_compile_fullgraph():
    x, w, b = _conv_inputs(4, 1, 6, 28, 28, torch.float32, "cpu")

    def f(x, w, b):
        return conv3x3_relu_maxpool2x2(x, w, b, 0).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, w, b), f(x, w, b))


def test_torch_compile_fullgraph_mlp_cross_entropy():
    x, weights, biases, target = _head_inputs(torch.float32, "cpu")

    def f(x, weights, biases):
        loss, logits = mlp_cross_entropy(x, weights, biases, target)
        return loss + logits.square().mean()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    params = [x, *weights, *biases]
    got = torch.autograd.grad(compiled(x, weights, biases), params)
    want = torch.autograd.grad(f(x, weights, biases), params)
    for a, c in zip(got, want):
        assert torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
def test_failed_kernel_check_is_a_python_error(device):
    """A failed TORCH_CHECK inside the extension reaches Python as an exception.  (With one
    build of torch 2.11 / Python 3.12 the IndexError of an out-of-range target in the CPU
    head killed the process instead; this separates "every C++ throw crashes there" from
    "that one does".)"""
    x, w = torch.randn(4, 5, device=device), torch.randn(3, 6, device=device)
    with pytest.raises(RuntimeError, match="linear expects x"):
        OPS.ext_linear(x, w, None, False)


# --- build facts ---------------------------------------------------------------------------
def test_cuda_resource_usage():
    from lenet_fast import ext_resources

    if not E.HAS_CUDA_KERNELS:
        with pytest.raises(RuntimeError, match="without CUDA"):
            ext_resources.cuda_resource_usage()
        return
    rows = ext_resources.cuda_resource_usage()
    # The architectures the build was asked for (setup.py's default: sm_80 and sm_90;
    # gpu_check.sh builds for the local GPU only).
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0").replace(" ", ";").split(";")
    wanted = {"sm_" + a.removesuffix("+PTX").replace(".", "") for a in arch_list if a}
    assert {r["arch"] for r in rows} >= wanted
    spilled = [r for r in rows if r["local"] or r["stack"]]
    assert not spilled, spilled


def test_parse_resource_usage_sample():
    from lenet_fast.ext_resources import parse_resource_usage

    text = """
Fatbin elf code:
================
arch = sm_90
Resource usage:
 Common:
  GLOBAL:0
 Function _ZN10lenet_fast4cuda6detail15conv_fwd_kernelIfLb1EEEvPKT_S5_S5_PS3_PhNS0_8ConvDimsENS1_7FwdGridEl:
  REG:128 STACK:0 SHARED:11392 LOCAL:0 CONSTANT[0]:616 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    (row,) = parse_resource_usage(text)
    assert row["arch"] == "sm_90" and row["registers"] == 128 and row["shared"] == 11392
    assert row["local"] == 0 and row["stack"] == 0
    assert row["kernel"].endswith("conv_fwd_kernel")


# --- run_backward: loss.backward() started from C++ ---------------------------------------
@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_run_backward_matches_loss_backward_bitwise(backend):
    import lenet_fast

    torch.manual_seed(0)
    model = lenet_fast.LeNet(backend=backend)
    x, y = torch.randn(17, 1, 28, 28), torch.randint(0, 10, (17,))
    model.forward_with_loss(x, y)[0].backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    run_backward(model.forward_with_loss(x, y)[0])
    for (name, p), g in zip(model.named_parameters(), expected):
        assert torch.equal(p.grad, g), name


def test_run_backward_bad_loss_is_torchs_error():
    with pytest.raises(RuntimeError, match="does not require grad"):
        run_backward(torch.ones(()))
    with pytest.raises(RuntimeError, match="only for scalar outputs"):
        run_backward(torch.ones(3, requires_grad=True) * 2)


@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_training_step_uses_the_helpers_of_its_own_backend(backend):
    """An ext LeNet's eager training step starts backward from C++ and counts with one op;
    a LeNet on another backend (and the stock models the benchmarks compare against) uses
    torch's own loss.backward() and count: no extension call when another backend runs."""
    import lenet_fast
    from lenet_fast import optim, training

    helpers = {"lenet_fast::run_backward": "backward", "lenet_fast::ext_count_correct": "count"}
    torch.manual_seed(0)
    model = lenet_fast.LeNet(backend=backend)
    optimizer = optim.make_optimizer(model.parameters(), "sgd", 0.05)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:  # the ops called
        training.train_step(model, optimizer, x, y, fused=False)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    calls = [helpers[e.name] for e in events if e.name in helpers]
    assert calls == (["backward", "count"] if backend == "ext" else [])
    assert all(p.grad is not None for p in model.parameters())


# --- count_correct: (logits.argmax(1) == target).sum() in one op ---------------------------
def _count_reference(logits, target):
    return (logits.argmax(1) == target).sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,c", [(0, 10), (1, 1), (1, 10), (7, 3), (64, 10), (129, 37)])
def test_count_correct_matches_stock(device, dtype, n, c):
    g = torch.Generator().manual_seed(n * 100 + c)
    # Rounded to a coarse grid so that rows hold ties; targets hit the argmax about half the time.
    logits = (torch.randn(n, c, generator=g) * 2).round().to(device=device, dtype=dtype)
    hit = torch.rand(n, generator=g) < 0.5
    target = torch.where(hit, logits.float().cpu().argmax(1), torch.randint(0, c, (n,), generator=g)).to(device)
    got = count_correct(logits, target)
    assert got.dtype == torch.int64 and got.shape == () and got.device == logits.device
    assert got.item() == _count_reference(logits, target).item()


@pytest.mark.parametrize("device", DEVICES)
def test_count_correct_ties_nan_inf_and_strides(device):
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[1.0, 3.0, 3.0],        # tie: the first maximum (1) wins
                           [nan, 5.0, nan],        # NaN is the maximum: its first index (0)
                           [2.0, nan, 9.0],        # NaN beats 9
                           [-inf, -inf, -inf],     # all equal: index 0
                           [0.0, inf, 1.0]], device=device)
    for target in ([1, 0, 1, 0, 1], [2, 1, 2, 1, 0], [0, 0, 0, 0, 0]):
        t = torch.tensor(target, device=device)
        assert count_correct(logits, t).item() == _count_reference(logits, t).item()
    wide = torch.randn(6, 20, device=device)
    strided, t = wide[:, ::2], torch.randint(0, 10, (6,), device=device)  # non-contiguous logits
    assert count_correct(strided, t).item() == _count_reference(strided, t).item()
    assert count_correct(wide.t().contiguous().t(), torch.zeros(6, dtype=torch.int64, device=device)).item() == \
        _count_reference(wide, torch.zeros(6, dtype=torch.int64, device=device)).item()


def test_count_correct_needs_no_grad_and_records_no_graph():
    logits = torch.randn(8, 10, requires_grad=True) * 1.0
    count = count_correct(logits, torch.zeros(8, dtype=torch.int64))
    assert not count.requires_grad and count.grad_fn is None


@pytest.mark.parametrize("logits,target,match", [
    (torch.randn(4), torch.zeros(4, dtype=torch.int64), r"logits \(N, C\)"),
    (torch.randn(4, 0), torch.zeros(4, dtype=torch.int64), r"C >= 1"),
    (torch.randn(4, 3), torch.zeros(5, dtype=torch.int64), r"target must be int64 of shape \(4,\)"),
    (torch.randn(4, 3), torch.zeros(4, dtype=torch.int32), r"target must be int64"),
    (torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.int64), r"target must be int64 of shape \(4,\)"),
])
def test_count_correct_bad_inputs(logits, target, match):
    with pytest.raises(RuntimeError, match=match):
        count_correct(logits, target)
