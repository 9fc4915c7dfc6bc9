"""PyTorch's own OpInfo sample inputs for the stock ops lenet_fast replaces, fed to every
backend: inputs nobody on this project chose.

The tensors of each sample of `conv2d`, `max_pool2d`, `linear`, `relu` and
`cross_entropy` (from torch.testing._internal.common_methods_invocations) go to the
lenet_fast op that covers them, with that op's fixed semantics: a convolution at stride
1 (the sample's stride, dilation and groups do not exist in lenet_fast's API and are
dropped; its padding is kept), a 2x2 max-pool at stride 2 (OpInfo's pools are 3x3 and
3x2: their inputs are what is used), ReLU as linear(x, I, relu=True), cross-entropy as
mlp_cross_entropy with one identity layer.  The reference is the stock op with the same
semantics.  Then:
  * in the op's domain (stock and lenet_fast's argument checks accept it): output and
    gradients must match stock at the README's tolerances;
  * outside it (an unbatched image, a 2x3 kernel, padding 2, a weight made for groups,
    probability targets, a 0-d input, a dtype the backend does not take, ...): a
    ValueError or TypeError, never a C++ error, a crash or a wrong number;
  * cross_entropy samples with class weights, reduction "sum"/"none" or another
    ignore_index cannot be asked of mlp_cross_entropy: skipped.
Each test also checks that it met in-domain samples, so it cannot pass empty.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (pip install -e '.[test]')")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

# Importing torch's internal test suite freezes the torch.backends flags for the whole
# process (torch's own tests set them only inside `with` blocks); without undoing that,
# every later test that configures cuDNN as lenet_fast.train does would fail.
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
assert not torch.backends.flags_frozen()

from helpers import check_op  # noqa: E402
from lenet_fast import backends, ops  # noqa: E402

OPINFO = {o.name: o for o in op_db if o.variant_test_name == ""}
DTYPES = [torch.float32, torch.float64]


def conv_cases(sample):
    """conv2d sample -> [(op, reference, inputs, kwargs)], or None when not expressible."""
    x, (w, *rest) = sample.input, sample.args
    b = rest[0] if rest else sample.kwargs.get("bias")
    padding = sample.kwargs.get("padding", 0)
    if padding == "valid":
        padding = 0
    elif padding == "same":
        if tuple(w.shape[2:]) != (3, 3):
            return None  # "same" for another kernel size has no single padding of ours
        padding = 1
    elif isinstance(padding, (tuple, list)):
        if len(set(padding)) != 1:
            return None
        padding = padding[0]

    def stock(op):
        def reference(x, w, b):
            y = F.relu(F.conv2d(x, w, b, padding=padding))
            return F.max_pool2d(y, 2) if op == "conv3x3_relu_maxpool2x2" else y
        return reference

    return [(lambda x, w, b, op=op, be=None: getattr(ops, op)(x, w, b, padding=padding, backend=be),
             stock(op), [x, w, b]) for op in ("conv3x3_relu", "conv3x3_relu_maxpool2x2")]


def pool_cases(sample):
    return [(lambda x, be=None: ops.maxpool2x2(x, backend=be), lambda x: F.max_pool2d(x, 2), [sample.input])]


def linear_cases(sample):
    w, *rest = sample.args
    b = rest[0] if rest else sample.kwargs.get("bias")
    return [(lambda x, w, b, relu=relu, be=None: ops.linear(x, w, b, relu=relu, backend=be),
             (lambda x, w, b: F.relu(F.linear(x, w, b))) if relu else F.linear, [sample.input, w, b])
            for relu in (False, True)]


def relu_cases(sample):
    """ReLU exists fused into linear: linear(x, I, relu=True) is relu(x) exactly."""
    x = sample.input
    k = x.shape[-1] if x.dim() else 1
    eye = torch.eye(k, dtype=x.dtype)
    return [(lambda x, be=None: ops.linear(x, eye.to(x.device, x.dtype), None, relu=True, backend=be),
             F.relu, [x])]


def cross_entropy_cases(sample):
    """cross_entropy(x, t) is mlp_cross_entropy's loss with one identity layer."""
    (target,) = sample.args
    kw = dict(sample.kwargs)
    if kw.pop("reduction", "mean") != "mean" or kw.pop("ignore_index", -100) != -100 or kw:
        return None
    x = sample.input
    c = x.shape[1] if x.dim() > 1 else 1
    eye, zero = torch.eye(c, dtype=x.dtype), torch.zeros(c, dtype=x.dtype)
    target = target.detach()

    def op(x, be=None):
        return ops.mlp_cross_entropy(x, [eye.to(x.device, x.dtype)], [zero.to(x.device, x.dtype)],
                                     target.to(x.device), backend=be)[0]

    return [(op, lambda x: F.cross_entropy(x, target), [x])]


MAPPINGS = {
    "nn.functional.conv2d": conv_cases,
    "nn.functional.max_pool2d": pool_cases,
    "nn.functional.linear": linear_cases,
    "nn.functional.relu": relu_cases,
    "nn.functional.cross_entropy": cross_entropy_cases,
}


def _in_domain(reference, inputs, run) -> bool:
    """Whether lenet_fast should compute this (stock accepts it and our op's argument
    checks do too): decided by calling our op on the CPU's torch backend, the reference."""
    try:
        reference(*[None if t is None else t.detach() for t in inputs])
    except Exception:
        return False
    try:
        run(*[None if t is None else t.detach() for t in inputs], be="torch")
    except (ValueError, TypeError):
        return False
    return True


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(MAPPINGS))
def test_opinfo_samples(backend_device, name, dtype):
    backend, device = backend_device
    in_domain = out_of_domain = 0
    seen = set()
    for sample in OPINFO[name].sample_inputs("cpu", dtype, requires_grad=False):
        cases = MAPPINGS[name](sample)
        if cases is None:
            continue
        for i, (run, reference, inputs) in enumerate(cases):
            if any(t is not None and not t.is_floating_point() for t in inputs):
                continue
            # Many samples differ only in options dropped here: each shape once.
            key = (i, repr(sample.kwargs.get("padding")) if name.endswith("conv2d") else "",
                   *(None if t is None else tuple(t.shape) for t in inputs))
            if key in seen:
                continue
            seen.add(key)
            if _in_domain(reference, inputs, run):
                if dtype not in backends.get_backend(backend).dtypes:
                    with pytest.raises(TypeError, match=f"the {backend} backend supports"):
                        run(*[None if t is None else t.to(device) for t in inputs], be=backend)
                    out_of_domain += 1
                    continue
                try:
                    check_op(lambda *a: run(*a, be=backend), reference, inputs, device=device)
                except AssertionError as exc:
                    raise AssertionError(f"{name} sample {sample.summary() if hasattr(sample, 'summary') else sample}"
                                         f": {exc}") from None
                in_domain += 1
            else:
                with pytest.raises((ValueError, TypeError)) as info:
                    run(*[None if t is None else t.to(device) for t in inputs], be=backend)
                assert str(info.value), f"{name}: an empty error message"
                out_of_domain += 1
    assert in_domain > 0 or dtype not in backends.get_backend(backend).dtypes, \
        f"{name}: no in-domain sample met ({out_of_domain} outside the domain)"
