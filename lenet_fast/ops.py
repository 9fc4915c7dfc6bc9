"""The public functional API: fused ops with stock PyTorch semantics.

Every op validates its arguments here, once, then hands them to the selected
backend (see `lenet_fast.backends`).  Bad input raises ValueError or TypeError
naming the argument and its shape; backends only ever see valid input.

Each op first tries one boolean expression that accepts the common valid call
(`_conv_args_ok`, ...): at LeNet's small shapes the named checks, a call per
argument, cost as much as the kernel they guard.  Only when it says no do the
`_check_*` functions run, to pass the unusual valid call or name what is wrong.

    conv3x3_relu(x, weight, bias, padding=0)            relu(conv2d(x, weight, bias, padding=padding))
    maxpool2x2(x)                                       max_pool2d(x, 2)
    conv3x3_relu_maxpool2x2(x, weight, bias, padding=0) max_pool2d(relu(conv2d(...)), 2)
    linear(x, weight, bias, relu=False)                 linear(x, weight, bias), then relu if asked
    mlp_cross_entropy(x, weights, biases, target)       (cross_entropy(logits, target), logits) where
                                                        logits = an MLP: linear + relu per layer, plain last layer
"""

from __future__ import annotations

import math

import torch

from . import backends


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


def _check_pool_input(name: str, shape: tuple[int, ...], what: str) -> None:
    if shape[1] == 0:  # as stock max_pool2d, which refuses a 4-D input without channels
        raise ValueError(f"{name} {what} {tuple(shape)} has no channels; max-pooling needs at least one")
    if shape[-2] < 2 or shape[-1] < 2:
        raise ValueError(f"{name} {what} {tuple(shape)} is smaller than the 2x2 pooling window")


def _impl(backend: str, x: torch.Tensor):
    return backends.implementation(backend, x.device, x.dtype)


def conv3x3_relu(x, weight, bias=None, *, padding: int = 0, backend: str = "auto") -> torch.Tensor:
    """relu(conv2d(x, weight, bias, padding=padding)) for a 3x3 kernel, stride 1, NCHW."""
    if not _conv_args_ok(x, weight, bias, padding, 3):
        _check_conv_args(x, weight, bias, padding)
    return _impl(backend, x).conv3x3_relu(x, weight, bias, padding)


def maxpool2x2(x, *, backend: str = "auto") -> torch.Tensor:
    """max_pool2d(x, 2): 2x2 window, stride 2, floor mode; NaN wins, first maximum wins ties."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 4
            and x.shape[1] > 0 and x.shape[2] >= 2 and x.shape[3] >= 2):
        _check_tensor("x", x, 4)
        _check_pool_input("x", tuple(x.shape), "of shape")
    return _impl(backend, x).maxpool2x2(x)


def conv3x3_relu_maxpool2x2(x, weight, bias=None, *, padding: int = 0, backend: str = "auto") -> torch.Tensor:
    """max_pool2d(relu(conv2d(x, weight, bias, padding=padding)), 2) in one fused op."""
    if not _conv_args_ok(x, weight, bias, padding, 4):
        _check_conv_args(x, weight, bias, padding)
        conv_shape = (x.shape[0], weight.shape[0], x.shape[2] + 2 * padding - 2, x.shape[3] + 2 * padding - 2)
        _check_pool_input("x", conv_shape, f"of shape {tuple(x.shape)} gives a convolution output of shape")
    return _impl(backend, x).conv3x3_relu_maxpool2x2(x, weight, bias, padding)


def linear(x, weight, bias=None, *, relu: bool = False, backend: str = "auto") -> torch.Tensor:
    """linear(x, weight, bias), then ReLU when relu=True; x is (..., in_features)."""
    if not _linear_args_ok(x, weight, bias):
        _check_linear_args(x, weight, bias)
    impl = _impl(backend, x)
    if x.dim() == 2:
        return impl.linear(x, weight, bias, bool(relu))
    out_features, in_features = weight.shape
    # The row count spelled out: reshape(-1, 0) of an empty x is ambiguous (in_features 0).
    y = impl.linear(x.reshape(math.prod(x.shape[:-1]), in_features), weight, bias, bool(relu))
    return y.reshape(*x.shape[:-1], out_features)


def mlp_cross_entropy(x, weights, biases, target, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """A classifier head and its loss in one op: returns (loss, logits).

    logits = x -> [linear(., weights[i], biases[i]) + relu] for every layer but the last
    -> linear(., weights[-1], biases[-1]); loss = cross_entropy(logits, target) (mean over
    the batch; no class weights, ignore_index or label smoothing).  x is (N, in_features),
    or (N, *) flattened from dim 1 as torch.flatten(x, 1) would (a conv stack's output
    as it is: on the ext backend the flattening then costs no autograd node of its own);
    target int64 (N,) of class indices.  Both outputs are differentiable, and x's gradient
    has x's shape.  On the ext backend the whole head is one autograd node, which is what
    makes it faster than the layers one by one (docs/benchmarks.md).
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
    return _impl(backend, x).mlp_cross_entropy(x, list(weights), list(biases), target)
