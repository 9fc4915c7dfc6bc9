"""What every kernel backend promises for every op of the table (lenet_fast.ops.OPS),
checked once for both ("triton" and "ext"), on every device where the backend runs here:

  * registration: lenet_fast::<prefix>_<name> and ..._backward exist, with the table's
    schemas, and none mutates or aliases its inputs;
  * torch.library.opcheck of every forward and backward op;
  * the registered fakes give the real ops' output shapes and dtypes;
  * the backward contract (lenet_fast.ops): the gradients a backward op is not asked for
    come back as empty tensors, the others are those of a call that wants all; through
    autograd an input that wants no gradient gets none;
  * double backward (create_graph=True) is refused with an error naming the backward op.

Output values against stock PyTorch: tests/test_op_<name>.py.
"""

import os

import pytest
import torch

from helpers import head_inputs, leaf
from lenet_fast import ops
from lenet_fast.ops import OPS

KERNEL_BACKENDS = {"triton": "triton", "ext": "ext"}  # backend name: op name prefix
# The conftest fixture, for the kernel backends only: it skips (with the reason) a backend
# that cannot run on the device here, or fails when the backend is required.
BACKEND_DEVICES = [pytest.param((backend, device), id=f"{backend}-{device}")
                   for backend in KERNEL_BACKENDS for device in ("cpu", "cuda")]
kernel_backends = pytest.mark.parametrize("backend_device", BACKEND_DEVICES, indirect=True)

# Under TRITON_INTERPRET=1, triton_op's kernels run even on fake tensors, and fail there:
# fake-tensor tracing (opcheck's test_faketensor and test_aot_dispatch_dynamic, FakeTensorMode)
# cannot run interpreted Triton ops.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _fakes_run(backend):
    return not (backend == "triton" and INTERPRETED)


def _op(backend, name):
    return getattr(torch.ops.lenet_fast, f"{KERNEL_BACKENDS[backend]}_{name}").default


# --------------------------------------------------------------------------- registration


@pytest.mark.parametrize("backend", list(KERNEL_BACKENDS))
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_every_op_is_registered_with_the_tables_schemas(backend, op):
    from lenet_fast import backends

    why = backends.unavailable_reason(backend)
    if why is not None:  # as the conftest fixture: a required backend must not skip
        if backend in os.environ.get("LENET_FAST_REQUIRE_BACKENDS", "").split(","):
            pytest.fail(f"required backend {backend!r} is unavailable here: {why}")
        pytest.skip(why)
    for suffix, schema in (("", op.schema), ("_backward", op.backward_schema)):
        name = f"{KERNEL_BACKENDS[backend]}_{op.name}{suffix}"
        registered = getattr(torch.ops.lenet_fast, name).default._schema
        assert registered == torch._C.parse_schema(f"lenet_fast::{name}{schema}"), str(registered)
        # No op mutates or aliases its inputs.
        assert "!" not in str(registered) and "(a" not in str(registered), str(registered)


# --------------------------------------------------------------------------- sample arguments

# One or more calls of every forward and backward op: (op name, what the case varies).
SAMPLES = [
    ("conv3x3_relu", "padding"), ("conv3x3_relu", "nobias"),
    ("conv3x3_relu_backward", "all"), ("conv3x3_relu_backward", "no-input-grad"),
    ("conv3x3_relu_backward", "no-weight-grad"),
    ("maxpool2x2", "odd"), ("maxpool2x2_backward", "odd"),
    ("conv3x3_relu_maxpool2x2", "padding"), ("conv3x3_relu_maxpool2x2", "nobias"),
    ("conv3x3_relu_maxpool2x2_backward", "all"), ("conv3x3_relu_maxpool2x2_backward", "no-input-grad"),
    ("conv3x3_relu_maxpool2x2_backward", "no-weight-grad"),
    ("linear", "relu"), ("linear", "nobias"),
    ("linear_backward", "all"), ("linear_backward", "no-input-grad"), ("linear_backward", "no-weight-grad"),
    ("mlp_cross_entropy", "2d"), ("mlp_cross_entropy", "4d"),
    ("mlp_cross_entropy_backward", "both-outputs"), ("mlp_cross_entropy_backward", "loss-only-no-input-grad"),
    ("mlp_cross_entropy_backward", "4d-loss-only"), ("mlp_cross_entropy_backward", "logits-only-no-weight-grad"),
]


def _samples(backend, device):
    """{(op name, case): arguments}: forward arguments that want gradients, backward
    arguments (detached) from the backend's own forward outputs."""
    g = torch.Generator().manual_seed(9)

    def op(name):
        return _op(backend, name)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    def d(t):
        return t.detach()

    def head(logits, dlogits, hidden, x):
        """The mlp backward's (dlogits, logits, x, weights, hidden) arguments."""
        return dlogits, logits, d(x), [d(t) for t in hw], list(hidden)

    x, w, b = leaf(randn(3, 2, 8, 7)), leaf(randn(4, 2, 3, 3) / 4), leaf(randn(4) / 10)
    a, lw, lb = leaf(randn(5, 7)), leaf(randn(3, 7)), leaf(randn(3))
    hx, hw, hb, ht = head_inputs(4, 6, (5, 4, 3), seed=12)
    hx, hw, hb, ht = leaf(hx.to(device)), [leaf(t.to(device)) for t in hw], [leaf(t.to(device)) for t in hb], \
        ht.to(device)
    hx4 = leaf(hx.reshape(4, 2, 1, 3))  # a conv stack's (N, C, H, W) output, flattened by the op
    with torch.no_grad():
        pooled, code = op("conv3x3_relu_maxpool2x2")(x, w, b, 1)
        conv = op("conv3x3_relu")(x, w, b, 0)
        pooled_x, pooled_code = op("maxpool2x2")(x)
        lin = op("linear")(a, lw, lb, True)
        _, logits, dlogits, hidden = op("mlp_cross_entropy")(hx, hw, hb, ht)
        _, logits4, dlogits4, hidden4 = op("mlp_cross_entropy")(hx4, hw, hb, ht)
    flags = {"all": (True, True), "no-input-grad": (False, True), "no-weight-grad": (True, False)}
    grads = {name: randn(*out.shape) for name, out in (("conv", conv), ("pool", pooled), ("linear", lin))}
    conv_backward = {case: (grads["conv"], conv, d(x), d(w), 0, *flags[case]) for case in flags}
    pool_backward = {case: (grads["pool"], code, d(x), d(w), 1, *flags[case]) for case in flags}
    linear_backward = {case: (grads["linear"], lin, d(a), d(lw), True, *flags[case]) for case in flags}
    samples = {
        ("conv3x3_relu", "padding"): (x, w, b, 1),
        ("conv3x3_relu", "nobias"): (x, w, None, 0),
        ("maxpool2x2", "odd"): (x,),
        ("maxpool2x2_backward", "odd"): (randn(*pooled_x.shape), pooled_code, d(x)),
        ("conv3x3_relu_maxpool2x2", "padding"): (x, w, b, 1),
        ("conv3x3_relu_maxpool2x2", "nobias"): (x, w, None, 0),
        ("linear", "relu"): (a, lw, lb, True),
        ("linear", "nobias"): (a, lw, None, False),
        ("mlp_cross_entropy", "2d"): (hx, hw, hb, ht),
        ("mlp_cross_entropy", "4d"): (hx4, hw, hb, ht),
        ("mlp_cross_entropy_backward", "both-outputs"):
            (torch.tensor(0.5, device=device), randn(*logits.shape), *head(logits, dlogits, hidden, hx), True, True),
        ("mlp_cross_entropy_backward", "loss-only-no-input-grad"):
            (torch.tensor(1.0, device=device), None, *head(logits, dlogits, hidden, hx), False, True),
        ("mlp_cross_entropy_backward", "4d-loss-only"):
            (torch.tensor(1.0, device=device), None, *head(logits4, dlogits4, hidden4, hx4), True, True),
        ("mlp_cross_entropy_backward", "logits-only-no-weight-grad"):
            (None, randn(*logits.shape), *head(logits, dlogits, hidden, hx), True, False),
    }
    for case in flags:
        samples["conv3x3_relu_backward", case] = conv_backward[case]
        samples["conv3x3_relu_maxpool2x2_backward", case] = pool_backward[case]
        samples["linear_backward", case] = linear_backward[case]
    return samples


def test_every_op_has_samples():
    table = {f"{op.name}{suffix}" for op in OPS for suffix in ("", "_backward")}
    assert {name for name, _ in SAMPLES} == table
    assert set(_samples("ext" if ops.backends.unavailable_reason("ext", "cpu") is None else "triton", "cpu")) \
        == set(SAMPLES)


SAMPLE_PARAMS = [pytest.param(sample, id=f"{sample[0]}-{sample[1]}") for sample in SAMPLES]


# --------------------------------------------------------------------------- opcheck and fakes


@kernel_backends
@pytest.mark.parametrize("sample", SAMPLE_PARAMS)
def test_opcheck(backend_device, sample):
    backend, device = backend_device
    tests = ("test_schema", "test_autograd_registration")
    if _fakes_run(backend):
        tests += ("test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(_op(backend, sample[0]), _samples(backend, device)[sample], test_utils=tests)


def _flat(out):
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [t for o in out for t in (o if isinstance(o, (tuple, list)) else (o,))]


@kernel_backends
@pytest.mark.parametrize("sample", SAMPLE_PARAMS)
def test_fakes_match_the_real_outputs(backend_device, sample):
    backend, device = backend_device
    if not _fakes_run(backend):
        pytest.skip("fake-tensor tracing cannot run interpreted Triton kernels (TRITON_INTERPRET=1)")
    op, args = _op(backend, sample[0]), _samples(backend, device)[sample]
    with torch.no_grad():
        real = op(*args)
        with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else
                        [mode.from_tensor(t) for t in a] if isinstance(a, list) else a for a in args))
    for r, f in zip(_flat(real), _flat(fake), strict=True):
        assert (r.shape, r.dtype, r.device) == (f.shape, f.dtype, f.device)


# --------------------------------------------------------------------------- the backward contract

# The backward ops that take (input_grad, weight_grad) as their last two arguments.
FLAGGED = ["conv3x3_relu_backward", "conv3x3_relu_maxpool2x2_backward", "linear_backward"]


@kernel_backends
@pytest.mark.parametrize("name", FLAGGED + ["mlp_cross_entropy_backward"])
@pytest.mark.parametrize("wanted", ["no-input-grad", "no-weight-grad"])
def test_backward_op_returns_empty_gradients_not_wanted(backend_device, name, wanted):
    """(grad_x, grad_weight(s), grad_bias(es)): the ones not wanted are empty tensors; the
    wanted ones are bitwise those of a call that wants every gradient."""
    backend, device = backend_device
    samples = _samples(backend, device)
    op = _op(backend, name)
    if name == "mlp_cross_entropy_backward":
        full_args = samples[name, "both-outputs"]
        args = (*full_args[:-2], wanted != "no-input-grad", wanted != "no-weight-grad")
    else:
        full_args, args = samples[name, "all"], samples[name, wanted]
    full, got = op(*full_args), op(*args)
    grad_x, grad_params = got[0], _flat(got[1:])
    if wanted == "no-input-grad":
        assert grad_x.numel() == 0, tuple(grad_x.shape)
        for g, want in zip(grad_params, _flat(full[1:]), strict=True):
            assert torch.equal(g, want)
    else:
        assert torch.equal(grad_x, full[0])
        assert all(g.numel() == 0 for g in grad_params), [tuple(g.shape) for g in grad_params]


def _public_call(name, device):
    """(inputs, call(backend, *inputs) -> a scalar to differentiate) for the public function
    of op `name`: x first, then its parameters."""
    g = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    if name == "maxpool2x2":
        return [randn(2, 3, 6, 7)], lambda backend, x: ops.maxpool2x2(x, backend=backend).sum()
    if name == "linear":
        return [randn(5, 7), randn(3, 7), randn(3)], \
            lambda backend, x, w, b: ops.linear(x, w, b, relu=True, backend=backend).sum()
    if name == "mlp_cross_entropy":
        x, weights, biases, target = head_inputs(4, 6, (5, 3), seed=4)
        return [t.to(device) for t in (x, weights[0], biases[0], weights[1], biases[1])], \
            lambda backend, x, w1, b1, w2, b2: ops.mlp_cross_entropy(x, [w1, w2], [b1, b2], target.to(device),
                                                                      backend=backend)[0]
    fn = getattr(ops, name)
    return [randn(2, 3, 8, 7), randn(4, 3, 3, 3), randn(4)], \
        lambda backend, x, w, b: fn(x, w, b, padding=1, backend=backend).sum()


# Which inputs want no gradient: x (a first layer), one parameter, every parameter.
FROZEN = {"x": lambda n: {0}, "weight": lambda n: {1}, "bias": lambda n: {2}, "parameters": lambda n: set(range(1, n))}
FROZEN_CASES = [pytest.param(op.name, frozen, id=f"{op.name}-{frozen}")
                for op in OPS for frozen in (FROZEN if op.name != "maxpool2x2" else ["nothing"])]


@kernel_backends
@pytest.mark.parametrize("name, frozen", FROZEN_CASES)
def test_gradient_not_requested_is_none(backend_device, name, frozen):
    backend, device = backend_device
    inputs, call = _public_call(name, device)
    no_grad = FROZEN[frozen](len(inputs)) if frozen in FROZEN else set()
    leaves = [leaf(t, i not in no_grad) for i, t in enumerate(inputs)]
    call(backend, *leaves).backward()
    for i, t in enumerate(leaves):
        if i in no_grad:
            assert t.grad is None, f"input {i} wants no gradient but got one"
        else:
            assert t.grad is not None and t.grad.shape == t.shape, f"input {i}: gradient missing"


@kernel_backends
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_double_backward_is_refused(backend_device, op):
    """A backward with create_graph=True raises NotImplementedError naming the backward op
    (never the plain backward's fast path, whose gradient would silently not require
    grad); the first derivative alone still works."""
    backend, device = backend_device
    inputs, call = _public_call(op.name, device)
    leaves = [leaf(t) for t in inputs]
    out = call(backend, *leaves)
    name = f"lenet_fast::{KERNEL_BACKENDS[backend]}_{op.name}_backward"
    with pytest.raises(NotImplementedError, match=rf"double backward .* not supported by {name}\b"):
        torch.autograd.grad(out, leaves[0], create_graph=True)
    (grad,) = torch.autograd.grad(call(backend, *leaves), leaves[0])
    assert grad.shape == leaves[0].shape and not grad.requires_grad
