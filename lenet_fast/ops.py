"""The fused ops: each declared once, here, with its public function and its checks.

    conv3x3_relu(x, weight, bias, padding=0)            relu(conv2d(x, weight, bias, padding=padding))
    maxpool2x2(x)                                       max_pool2d(x, 2)
    conv3x3_relu_maxpool2x2(x, weight, bias, padding=0) max_pool2d(relu(conv2d(...)), 2)
    linear(x, weight, bias, relu=False)                 linear(x, weight, bias), then relu if asked
    mlp_cross_entropy(x, weights, biases, target)       (cross_entropy(logits, target), logits) where
                                                        logits = an MLP: linear + relu per layer, plain last layer

Every public function validates its arguments (the one place that raises the
user-facing ValueError / TypeError naming the argument and its shape), then runs
the op on the chosen backend (`lenet_fast.backends`).  Kernels only assert.

An `OpDef` is what every backend and tool reads: the torch backend runs its
`reference`; the kernel backends register ``lenet_fast::<backend>_<name>`` and
``..._backward`` with its two schemas (triton from Python, kernels/<name>.py; ext
from C++, csrc/<name>.cpp) and its fakes; `register_autograd` glue follows
`setup_context` / `backward`; tests, benchmarks and compile_check iterate `OPS`.

The backward contract, the same for both kernel backends:
  * forward returns the public output plus what its backward needs that the
    inputs do not hold (pooling: a uint8 code per pooled element, 0..3 = the
    winner's row-major place in the window, 4 = ReLU blocks the gradient; the
    head: d loss / d logits and the hidden activations); ReLU's mask is read from
    the saved output (or the code), never stored apart;
  * one backward op per forward op computes every gradient, with `input_grad` /
    `weight_grad` saying which are wanted (the ones not wanted come back as empty
    tensors); an undefined output gradient means zero.

Each public function first tries one boolean expression that accepts the common
valid call (`_conv_args_ok`, ...): at LeNet's small shapes the named checks, a call
per argument, cost as much as the kernel they guard.  Only when it says no do the
`_check_*` functions run, to pass the unusual valid call or name what is wrong.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import backends


@dataclasses.dataclass(frozen=True)
class OpDef:
    """One fused op as the backends, tools and tests see it (see the module docstring)."""

    name: str
    schema: str                 # forward: "(args) -> returns", the op's name left out
    backward_schema: str
    reference: Callable         # stock torch.nn.functional, on the backend arguments: the semantics
    public: Callable            # the public outputs, from the forward op's outputs
    fake: Callable              # forward's output shapes (torch.compile, opcheck)
    backward_fake: Callable
    setup_context: Callable     # register_autograd glue: what forward saves...
    backward: Callable          # ...and how backward calls the backward op: backward(ctx, backward_op, *grads)


def _empty(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0)


def _flags(ctx) -> tuple[bool, bool]:
    """(input_grad, weight_grad) for the backward op from autograd's needs_input_grad of
    (x, weight(s), bias(es), ...)."""
    needs = ctx.needs_input_grad
    return needs[0], needs[1] or needs[2]


# --------------------------------------------------------------------------- checks shared by several ops


def _check_tensor(name: str, t: object, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype} (shape {tuple(t.shape)})")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _check_same(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; use one dtype")


def _like_x(t, x: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == x.dtype and t.device == x.device


def _check_pool_input(name: str, shape: tuple[int, ...], what: str) -> None:
    if shape[1] == 0:  # as stock max_pool2d, which refuses a 4-D input without channels
        raise ValueError(f"{name} {what} {tuple(shape)} has no channels; max-pooling needs at least one")
    if shape[-2] < 2 or shape[-1] < 2:
        raise ValueError(f"{name} {what} {tuple(shape)} is smaller than the 2x2 pooling window")


def check_images(x, like: torch.Tensor, image_shape: tuple[int, ...], model: str) -> None:
    """TypeError/ValueError unless x is a batch (N, *image_shape) of like's dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 + len(image_shape) or x.shape[1:] != image_shape:
        raise ValueError(f"{model} expects x of shape (N, {', '.join(map(str, image_shape))}), got {tuple(x.shape)}")
    if x.device != like.device or x.dtype != like.dtype:
        raise ValueError(
            f"x is {x.dtype} on {x.device} but the model's parameters are {like.dtype} on {like.device}; "
            "move one to match (model.to(...) or x.to(...))"
        )


def check_target(x: torch.Tensor, target) -> None:
    """ValueError unless target is int64 class indices (N,) on x's device."""
    if not (isinstance(target, torch.Tensor) and target.dtype == torch.int64
            and target.shape == x.shape[:1] and target.device == x.device):
        got = (f"{target.dtype} of shape {tuple(target.shape)} on {target.device}"
               if isinstance(target, torch.Tensor) else type(target).__name__)
        raise ValueError(f"target must be int64 of shape ({x.shape[0]},) on {x.device}, got {got}")


def _backend(backend: str, x: torch.Tensor) -> backends.Backend:
    return backends.implementation(backend, x.device, x.dtype)


# --------------------------------------------------------------------------- conv3x3 + bias + ReLU (+ max-pool 2x2)


def _conv_args_ok(x, weight, bias, padding, min_size: int) -> bool:
    """True only for arguments that _check_conv_args passes (and, for the fused op, whose
    convolution output is at least min_size - 2 pixels high and wide)."""
    return (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 4 and _like_x(weight, x)
            and weight.shape[1:] == (x.shape[1], 3, 3) and weight.shape[0] > 0 and x.shape[1] > 0
            and (bias is None or (_like_x(bias, x) and bias.shape == weight.shape[:1]))
            and type(padding) is int and 0 <= padding <= 1
            and x.shape[2] + 2 * padding >= min_size and x.shape[3] + 2 * padding >= min_size)


def _check_conv_args(x, weight, bias, padding) -> None:
    _check_tensor("x", x, 4)
    _check_tensor("weight", weight, 4)
    if bias is not None:
        _check_tensor("bias", bias, 1)
    _check_same(x, weight=weight, bias=bias)
    if isinstance(padding, bool) or padding not in (0, 1):
        raise ValueError(f"padding must be 0 or 1, got {padding!r}")
    c_out, c_in, kh, kw = weight.shape
    if (kh, kw) != (3, 3):
        raise ValueError(f"weight must have shape (C_out, C_in, 3, 3), got {tuple(weight.shape)}")
    if c_in != x.shape[1]:
        raise ValueError(
            f"weight expects {c_in} input channels (weight shape {tuple(weight.shape)}) "
            f"but x has {x.shape[1]} (x shape {tuple(x.shape)})"
        )
    if c_out == 0 or c_in == 0:
        raise ValueError(f"weight must have at least one input and output channel, got {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != c_out:
        raise ValueError(
            f"bias must have shape ({c_out},) to match weight {tuple(weight.shape)}, got {tuple(bias.shape)}"
        )
    h, w = x.shape[2] + 2 * padding, x.shape[3] + 2 * padding
    if h < 3 or w < 3:
        raise ValueError(
            f"x of shape {tuple(x.shape)} with padding={padding} is smaller than the 3x3 kernel"
        )


def _conv_out(x: torch.Tensor, weight: torch.Tensor, padding: int) -> tuple[int, int, int, int]:
    return x.shape[0], weight.shape[0], x.shape[2] + 2 * padding - 2, x.shape[3] + 2 * padding - 2


def _pooled(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:-2], shape[-2] // 2, shape[-1] // 2)


def _param_grads_fake(x, weight, input_grad, weight_grad):
    gx = x.new_empty(x.shape) if input_grad else _empty(x)
    gw = weight.new_empty(weight.shape) if weight_grad else _empty(x)
    gb = weight.new_empty(weight.shape[0]) if weight_grad else _empty(x)
    return gx, gw, gb


def _param_grads(ctx, grads) -> tuple:
    """The backward op's (grad_x, grad_w, grad_b) as autograd wants them for (x, weight, bias, attr)."""
    gx, gw, gb = grads
    needs = ctx.needs_input_grad
    return (gx if needs[0] else None, gw if needs[1] else None,
            gb if ctx.has_bias and needs[2] else None, None)


def _layer_setup(ctx, inputs, output):
    """conv3x3_relu and linear: save (out, x, weight) and the layer's attribute (padding or relu)."""
    x, weight, bias, attr = inputs
    ctx.attr, ctx.has_bias = attr, bias is not None
    ctx.save_for_backward(output, x, weight)


def _layer_backward(ctx, backward_op, grad):
    """Backward of a layer that saved (out or code, x, weight): one call of its backward op."""
    if grad is None:
        return None, None, None, None
    first, x, weight = ctx.saved_tensors
    return _param_grads(ctx, backward_op(grad, first, x, weight, ctx.attr, *_flags(ctx)))


CONV3X3_RELU = OpDef(
    name="conv3x3_relu",
    schema="(Tensor x, Tensor weight, Tensor? bias, int padding) -> Tensor",
    backward_schema="(Tensor grad_out, Tensor out, Tensor x, Tensor weight, int padding, bool input_grad, "
                    "bool weight_grad) -> (Tensor, Tensor, Tensor)",
    reference=lambda x, weight, bias, padding: F.relu(F.conv2d(x, weight, bias, padding=padding)),
    public=lambda out: out,
    fake=lambda x, weight, bias, padding: x.new_empty(_conv_out(x, weight, padding)),
    backward_fake=lambda grad_out, out, x, weight, padding, input_grad, weight_grad:
        _param_grads_fake(x, weight, input_grad, weight_grad),
    setup_context=_layer_setup,
    backward=_layer_backward,
)


def conv3x3_relu(x, weight, bias=None, *, padding: int = 0, backend: str = "auto") -> torch.Tensor:
    """relu(conv2d(x, weight, bias, padding=padding)) for a 3x3 kernel, stride 1, NCHW."""
    if not _conv_args_ok(x, weight, bias, padding, 3):
        _check_conv_args(x, weight, bias, padding)
    return _backend(backend, x).run(CONV3X3_RELU, x, weight, bias, padding)


def _code_setup(ctx, inputs, output):
    """The pooling ops: save (code, x[, weight]); the code is bookkeeping, not differentiable."""
    x, *rest = inputs
    code = output[1]
    if rest:
        weight, bias, padding = rest
        ctx.attr, ctx.has_bias = padding, bias is not None
    ctx.save_for_backward(code, x, *rest[:1])
    ctx.mark_non_differentiable(code)
    ctx.set_materialize_grads(False)  # no zero-filled "gradient" of the code at every backward


def _maxpool_backward(ctx, backward_op, grad, _grad_code):
    code, x = ctx.saved_tensors
    return None if grad is None else backward_op(grad, code, x)


def _conv_relu_pool_backward(ctx, backward_op, grad, _grad_code):
    return _layer_backward(ctx, backward_op, grad)


MAXPOOL2X2 = OpDef(
    name="maxpool2x2",
    schema="(Tensor x) -> (Tensor, Tensor)",
    backward_schema="(Tensor grad_out, Tensor code, Tensor x) -> Tensor",
    reference=lambda x: F.max_pool2d(x, 2),
    public=lambda outputs: outputs[0],
    fake=lambda x: (x.new_empty(_pooled(x.shape)), x.new_empty(_pooled(x.shape), dtype=torch.uint8)),
    backward_fake=lambda grad_out, code, x: grad_out.new_empty(x.shape),
    setup_context=_code_setup,
    backward=_maxpool_backward,
)


def maxpool2x2(x, *, backend: str = "auto") -> torch.Tensor:
    """max_pool2d(x, 2): 2x2 window, stride 2, floor mode; NaN wins, first maximum wins ties."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 4
            and x.shape[1] > 0 and x.shape[2] >= 2 and x.shape[3] >= 2):
        _check_tensor("x", x, 4)
        _check_pool_input("x", tuple(x.shape), "of shape")
    return _backend(backend, x).run(MAXPOOL2X2, x)


def _conv_relu_pool_fake(x, weight, bias, padding):
    shape = _pooled(_conv_out(x, weight, padding))
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8)


CONV3X3_RELU_MAXPOOL2X2 = OpDef(
    name="conv3x3_relu_maxpool2x2",
    schema="(Tensor x, Tensor weight, Tensor? bias, int padding) -> (Tensor, Tensor)",
    backward_schema="(Tensor grad_out, Tensor code, Tensor x, Tensor weight, int padding, bool input_grad, "
                    "bool weight_grad) -> (Tensor, Tensor, Tensor)",
    reference=lambda x, weight, bias, padding: F.max_pool2d(F.relu(F.conv2d(x, weight, bias, padding=padding)), 2),
    public=lambda outputs: outputs[0],
    fake=_conv_relu_pool_fake,
    backward_fake=lambda grad_out, code, x, weight, padding, input_grad, weight_grad:
        _param_grads_fake(x, weight, input_grad, weight_grad),
    setup_context=_code_setup,
    backward=_conv_relu_pool_backward,
)


def conv3x3_relu_maxpool2x2(x, weight, bias=None, *, padding: int = 0, backend: str = "auto") -> torch.Tensor:
    """max_pool2d(relu(conv2d(x, weight, bias, padding=padding)), 2) in one fused op."""
    if not _conv_args_ok(x, weight, bias, padding, 4):
        _check_conv_args(x, weight, bias, padding)
        _check_pool_input("x", _conv_out(x, weight, padding),
                          f"of shape {tuple(x.shape)} gives a convolution output of shape")
    return _backend(backend, x).run(CONV3X3_RELU_MAXPOOL2X2, x, weight, bias, padding)


# --------------------------------------------------------------------------- linear (+ ReLU)


def _linear_args_ok(x, weight, bias) -> bool:
    """True only for arguments that _check_linear_args passes."""
    return (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 1 and _like_x(weight, x)
            and weight.dim() == 2 and x.shape[-1] == weight.shape[1]
            and (bias is None or (_like_x(bias, x) and bias.shape == weight.shape[:1])))


def _check_linear_args(x, weight, bias) -> None:
    _check_tensor("x", x)
    _check_tensor("weight", weight, 2)
    if bias is not None:
        _check_tensor("bias", bias, 1)
    _check_same(x, weight=weight, bias=bias)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., in_features), got shape {tuple(x.shape)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) "
            f"but weight expects {in_features} (weight shape {tuple(weight.shape)})"
        )
    if bias is not None and bias.shape[0] != out_features:
        raise ValueError(
            f"bias must have shape ({out_features},) to match weight {tuple(weight.shape)}, got {tuple(bias.shape)}"
        )


def _linear_reference(x, weight, bias, relu):
    y = F.linear(x, weight, bias)
    return F.relu(y) if relu else y


LINEAR = OpDef(
    name="linear",
    schema="(Tensor x, Tensor weight, Tensor? bias, bool relu) -> Tensor",
    backward_schema="(Tensor grad_out, Tensor out, Tensor x, Tensor weight, bool relu, bool input_grad, "
                    "bool weight_grad) -> (Tensor, Tensor, Tensor)",
    reference=_linear_reference,
    public=lambda out: out,
    fake=lambda x, weight, bias, relu: x.new_empty((x.shape[0], weight.shape[0])),
    backward_fake=lambda grad_out, out, x, weight, relu, input_grad, weight_grad:
        _param_grads_fake(x, weight, input_grad, weight_grad),
    setup_context=_layer_setup,
    backward=_layer_backward,
)


def linear(x, weight, bias=None, *, relu: bool = False, backend: str = "auto") -> torch.Tensor:
    """linear(x, weight, bias), then ReLU when relu=True; x is (..., in_features)."""
    if not _linear_args_ok(x, weight, bias):
        _check_linear_args(x, weight, bias)
    impl = _backend(backend, x)
    if x.dim() == 2:
        return impl.run(LINEAR, x, weight, bias, bool(relu))
    out_features, in_features = weight.shape
    # The row count spelled out: reshape(-1, 0) of an empty x is ambiguous (in_features 0).
    y = impl.run(LINEAR, x.reshape(math.prod(x.shape[:-1]), in_features), weight, bias, bool(relu))
    return y.reshape(*x.shape[:-1], out_features)


# --------------------------------------------------------------------------- classifier head + cross-entropy


def _mlp_reference(x, weights, biases, target):
    x = torch.flatten(x, 1)  # (N, *) -> (N, features); x itself when already 2-D
    for weight, bias in zip(weights[:-1], biases[:-1]):
        x = F.relu(F.linear(x, weight, bias))
    logits = F.linear(x, weights[-1], biases[-1])
    return F.cross_entropy(logits, target), logits


def _mlp_fake(x, weights, biases, target):
    hidden = [x.new_empty((x.shape[0], w.shape[0])) for w in weights[:-1]]
    logits = x.new_empty((x.shape[0], weights[-1].shape[0]))
    return x.new_empty(()), logits, torch.empty_like(logits), hidden


def _mlp_backward_fake(grad_loss, grad_logits, dlogits, logits, x, weights, hidden, input_grad, weight_grad):
    grad_x = x.new_empty(x.shape) if input_grad else _empty(x)
    grad_w = [w.new_empty(w.shape) if weight_grad else _empty(x) for w in weights]
    grad_b = [w.new_empty(w.shape[0]) if weight_grad else _empty(x) for w in weights]
    return grad_x, grad_w, grad_b


def _mlp_setup(ctx, inputs, output):
    x, weights, biases, target = inputs
    loss, logits, dlogits, hidden = output
    ctx.layers = len(weights)
    ctx.save_for_backward(dlogits, logits, x, *weights, *hidden)
    ctx.mark_non_differentiable(dlogits, *hidden)
    ctx.set_materialize_grads(False)


def _mlp_backward(ctx, backward_op, grad_loss, grad_logits, _grad_dlogits, _grad_hidden):
    if grad_loss is None and grad_logits is None:
        return None, None, None, None
    dlogits, logits, x, *rest = ctx.saved_tensors
    weights, hidden = rest[:ctx.layers], rest[ctx.layers:]
    needs = ctx.needs_input_grad
    grad_x, grad_w, grad_b = backward_op(grad_loss, grad_logits, dlogits, logits, x, weights, hidden, *_flags(ctx))
    return (grad_x if needs[0] else None, list(grad_w) if needs[1] else None,
            list(grad_b) if needs[2] else None, None)


MLP_CROSS_ENTROPY = OpDef(
    name="mlp_cross_entropy",
    schema="(Tensor x, Tensor[] weights, Tensor[] biases, Tensor target) -> (Tensor, Tensor, Tensor, Tensor[])",
    backward_schema="(Tensor? grad_loss, Tensor? grad_logits, Tensor dlogits, Tensor logits, Tensor x, "
                    "Tensor[] weights, Tensor[] hidden, bool input_grad, bool weight_grad) "
                    "-> (Tensor, Tensor[], Tensor[])",
    reference=_mlp_reference,
    public=lambda outputs: (outputs[0], outputs[1]),
    fake=_mlp_fake,
    backward_fake=_mlp_backward_fake,
    setup_context=_mlp_setup,
    backward=_mlp_backward,
)


def mlp_cross_entropy(x, weights, biases, target, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """A classifier head and its loss in one op: returns (loss, logits).

    logits = x -> [linear(., weights[i], biases[i]) + relu] for every layer but the last
    -> linear(., weights[-1], biases[-1]); loss = cross_entropy(logits, target) (mean over
    the batch, target -100 ignored; no class weights or label smoothing).  x is
    (N, in_features), or (N, *) flattened from dim 1 as torch.flatten(x, 1) would (a conv
    stack's output as it is: the flattening then costs no autograd node of its own);
    target int64 (N,) of class indices.  Both outputs are differentiable, and x's gradient
    has x's shape.  On a kernel backend the whole head is one autograd node.
    """
    _check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must be at least 2-D (N, in_features, ...), got shape {tuple(x.shape)}")
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise TypeError(f"weights and biases must be lists of tensors, got {type(weights).__name__} "
                        f"and {type(biases).__name__}")
    if len(weights) == 0 or len(weights) != len(biases):
        raise ValueError(f"need one bias per weight and at least one layer, got {len(weights)} weights "
                         f"and {len(biases)} biases")
    features, device, dtype = math.prod(x.shape[1:]), x.device, x.dtype
    for i, (weight, bias) in enumerate(zip(weights, biases)):
        # Names are formatted only on failure: per layer they cost more than the checks.
        if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.dtype == dtype
                and isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.dtype == dtype
                and weight.device == device and bias.device == device):
            _check_tensor(f"weights[{i}]", weight, 2)
            _check_tensor(f"biases[{i}]", bias, 1)
            _check_same(x, **{f"weights[{i}]": weight, f"biases[{i}]": bias})
        if weight.shape[1] != features:
            what = f"x has {features} features (shape {tuple(x.shape)})" if i == 0 else (
                f"layer {i - 1} gives {features} features (weights[{i - 1}] shape {tuple(weights[i - 1].shape)})")
            raise ValueError(f"{what} but weights[{i}] expects {weight.shape[1]} (shape {tuple(weight.shape)})")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"biases[{i}] must have shape ({weight.shape[0]},) to match weights[{i}] "
                             f"{tuple(weight.shape)}, got {tuple(bias.shape)}")
        if weight.shape[0] == 0:
            raise ValueError(f"weights[{i}] must have at least one output feature, got shape {tuple(weight.shape)}")
        features = weight.shape[0]
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64:
        what = target.dtype if isinstance(target, torch.Tensor) else type(target).__name__
        raise TypeError(f"target must be an int64 tensor of class indices, got {what}")
    if target.shape != (x.shape[0],):
        raise ValueError(f"target must have shape ({x.shape[0]},) to match x {tuple(x.shape)}, "
                         f"got {tuple(target.shape)}")
    if target.device != x.device:
        raise ValueError(f"target is on {target.device} but x is on {x.device}; move them to one device")
    return _backend(backend, x).run(MLP_CROSS_ENTROPY, x, list(weights), list(biases), target)


#: Every fused op, in the order of the table above.
OPS: tuple[OpDef, ...] = (CONV3X3_RELU, MAXPOOL2X2, CONV3X3_RELU_MAXPOOL2X2, LINEAR, MLP_CROSS_ENTROPY)
OPS_BY_NAME: dict[str, OpDef] = {op.name: op for op in OPS}


def register_kernel_ops(prefix: str, forward: Callable[[OpDef], Any] | None = None,
                        backward: Callable[[OpDef], Any] | None = None) -> None:
    """Define ``lenet_fast::<prefix>_<name>`` and its ``_backward`` for every op of the table.

    forward/backward(op) give the Python implementation (a kernel backend written in
    Python: registered as triton ops, with the fake inferred from it, and autograd from
    the op's glue); without them only the schemas and fakes are registered and the
    kernels come from C++ (the ext backend: csrc/<name>.cpp registers kernels and autograd).
    """
    from torch.library import register_autograd, triton_op

    for op in OPS:
        fwd, bwd = f"lenet_fast::{prefix}_{op.name}", f"lenet_fast::{prefix}_{op.name}_backward"
        if forward is None:
            torch.library.define(fwd, op.schema)
            torch.library.define(bwd, op.backward_schema)
            torch.library.register_fake(fwd)(op.fake)
            torch.library.register_fake(bwd)(op.backward_fake)
            continue
        triton_op(fwd, forward(op), mutates_args=(), schema=op.schema)
        backward_op = triton_op(bwd, backward(op), mutates_args=(), schema=op.backward_schema)
        register_autograd(fwd, _glue(op, bwd, backward_op, backward(op)), setup_context=op.setup_context)


def _glue(op: OpDef, name: str, backward_op, launch: Callable):
    """The op's autograd backward, calling `launch` (the Python backward) directly in plain
    eager mode and the registered `backward_op` under tracing: passing through the
    custom-op dispatcher costs host time per call, which bounds a small net's eager step
    on a GPU; under torch.compile / export / make_fx / opcheck (a dispatch mode is active)
    or a torch.func transform the op is called, so graphs see it."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    def call(*args):
        grad = next((a for a in args if isinstance(a, torch.Tensor)), None)
        eager = (type(grad) is torch.Tensor and _get_current_dispatch_mode() is None
                 and not torch._C._are_functorch_transforms_active())
        if eager and torch.is_grad_enabled():
            raise NotImplementedError(
                f"lenet_fast: double backward (a backward with create_graph=True, e.g. for a gradient penalty or a "
                f"Hessian) is not supported by {name}; use backend=\"torch\" for that computation")
        return (launch if eager else backward_op)(*args)

    return lambda ctx, *grads: op.backward(ctx, call, *grads)
