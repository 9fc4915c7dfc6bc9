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

import importlib
import os

import pytest
import torch

from helpers import leaf
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

def _op_tests(op):
    """The op's own test module, tests/test_op_<name>.py, which holds its opcheck samples."""
    return importlib.import_module(f"test_op_{op.name}")


def _samples(backend, device):
    """{(op name, case): arguments} of every op's forward and backward, from each op's test
    file (`opcheck_samples`): forward arguments that want gradients, backward arguments
    (detached) from the backend's own forward outputs."""
    g = torch.Generator().manual_seed(9)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    samples = {}
    for op in OPS:
        samples.update(_op_tests(op).opcheck_samples(lambda name: _op(backend, name), randn))
    return samples


def _fake(name):
    """The table's fake of op `name` (forward or backward): output shapes without a backend."""
    op = ops.OPS_BY_NAME[name.removesuffix("_backward")]
    return op.backward_fake if name.endswith("_backward") else op.fake


# The cases, known without a backend (collection must not need one): the samples built on
# meta tensors from the table's fakes.
SAMPLES = sorted({key for op in OPS
                  for key in _op_tests(op).opcheck_samples(_fake, lambda *shape: torch.empty(shape, device="meta"))})


def test_every_op_has_samples():
    table = {f"{op.name}{suffix}" for op in OPS for suffix in ("", "_backward")}
    assert {name for name, _ in SAMPLES} == table


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

# The ops whose backward takes (input_grad, weight_grad) as its last two arguments.
FLAGGED = [op for op in OPS if op.backward_schema.split(")")[0].endswith("bool input_grad, bool weight_grad")]


@kernel_backends
@pytest.mark.parametrize("op", FLAGGED, ids=lambda op: op.name)
@pytest.mark.parametrize("wanted", ["no-input-grad", "no-weight-grad"])
def test_backward_op_returns_empty_gradients_not_wanted(backend_device, op, wanted):
    """(grad_x, grad_weight(s), grad_bias(es)): the ones not wanted are empty tensors; the
    wanted ones are bitwise those of a call that wants every gradient."""
    backend, device = backend_device
    name = f"{op.name}_backward"
    sample = next(v for (n, _), v in _samples(backend, device).items() if n == name)
    full_args = (*sample[:-2], True, True)
    args = (*sample[:-2], wanted != "no-input-grad", wanted != "no-weight-grad")
    op = _op(backend, name)
    full, got = op(*full_args), op(*args)
    grad_x, grad_params = got[0], _flat(got[1:])
    if wanted == "no-input-grad":
        assert grad_x.numel() == 0, tuple(grad_x.shape)
        for g, want in zip(grad_params, _flat(full[1:]), strict=True):
            assert torch.equal(g, want)
    else:
        assert torch.equal(grad_x, full[0])
        assert all(g.numel() == 0 for g in grad_params), [tuple(g.shape) for g in grad_params]


def _differentiable_call(op, args, forward_op):
    """(inputs, call(*inputs) -> a scalar) for forward arguments `args` of `op`: its
    floating-point tensors (lists flattened) are the inputs, x first; call runs `forward_op`
    (the registered op, autograd attached) and sums its first public output."""
    spec, inputs = [], []
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.is_floating_point():
            spec.append(len(inputs))
            inputs.append(arg.detach())
        elif isinstance(arg, list):
            spec.append(list(range(len(inputs), len(inputs) + len(arg))))
            inputs += [t.detach() for t in arg]
        else:
            spec.append(("constant", arg))

    def call(*leaves):
        built = [leaves[k] if isinstance(k, int) else [leaves[i] for i in k] if isinstance(k, list) else k[1]
                 for k in spec]
        out = op.public(forward_op(*built))
        return (out[0] if isinstance(out, tuple) else out).sum()

    return inputs, call


def _first_sample(op, backend, device):
    """The first forward sample of op from its test file, as _differentiable_call's pair."""
    args = next(v for (name, _), v in _samples(backend, device).items() if name == op.name)
    return _differentiable_call(op, args, _op(backend, op.name))


def _input_count(op):
    args = next(v for (name, _), v in _op_tests(op).opcheck_samples(
        _fake, lambda *shape: torch.empty(shape, device="meta")).items() if name == op.name)
    return len(_differentiable_call(op, args, None)[0])


# Which inputs want no gradient: x (a first layer), the first or second parameter, every parameter.
FROZEN = {"x": lambda n: {0}, "param1": lambda n: {1}, "param2": lambda n: {2}, "params": lambda n: set(range(1, n))}
FROZEN_CASES = [pytest.param(op, frozen, id=f"{op.name}-{frozen}")
                for op in OPS for frozen in (FROZEN if _input_count(op) > 2 else ["nothing"])]


@kernel_backends
@pytest.mark.parametrize("op, frozen", FROZEN_CASES)
def test_gradient_not_requested_is_none(backend_device, op, frozen):
    backend, device = backend_device
    inputs, call = _first_sample(op, backend, device)
    no_grad = FROZEN[frozen](len(inputs)) if frozen in FROZEN else set()
    leaves = [leaf(t, i not in no_grad) for i, t in enumerate(inputs)]
    call(*leaves).backward()
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
    inputs, call = _first_sample(op, backend, device)
    leaves = [leaf(t) for t in inputs]
    out = call(*leaves)
    name = f"lenet_fast::{KERNEL_BACKENDS[backend]}_{op.name}_backward"
    with pytest.raises(NotImplementedError, match=rf"double backward .* not supported by {name}\b"):
        torch.autograd.grad(out, leaves[0], create_graph=True)
    (grad,) = torch.autograd.grad(call(*leaves), leaves[0])
    assert grad.shape == leaves[0].shape and not grad.requires_grad
