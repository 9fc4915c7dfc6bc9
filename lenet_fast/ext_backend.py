"""The "ext" backend: the C++/CUDA extension lenet_fast._C (sources in csrc/).

The kernels are registered as torch ops ``torch.ops.lenet_fast.ext_*`` with
TORCH_LIBRARY (schemas), CPU/CUDA kernels and C++ autograd; this module adds the
fake (meta) implementations that torch.compile and torch.library.opcheck need,
and the functions the backend registry expects (see lenet_fast/backends.py).

Importing it raises ImportError, with the reason, when the extension is not built.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        f"lenet_fast._C is not built ({exc}): reinstall with "
        "`pip install --no-build-isolation -e .` (without LENET_FAST_BUILD_EXT=0) "
        "and a C++ compiler; set CUDA_HOME for the CUDA kernels"
    ) from exc

#: True when the extension was compiled with its CUDA kernels.
HAS_CUDA_KERNELS: bool = bool(_C.HAS_CUDA)

_ops = torch.ops.lenet_fast
_conv_relu = _ops.ext_conv3x3_relu.default
_maxpool = _ops.ext_maxpool2x2.default
_conv_relu_pool = _ops.ext_conv3x3_relu_maxpool2x2.default
_linear = _ops.ext_linear.default
_mlp_cross_entropy = _ops.ext_mlp_cross_entropy.default
_count_correct = _ops.ext_count_correct.default
_run_backward = _ops.run_backward.default

#: Every op the extension registers (forward and backward), for opcheck and tests.
OP_NAMES = (
    "ext_conv3x3_relu",
    "ext_conv3x3_relu_backward",
    "ext_maxpool2x2",
    "ext_maxpool2x2_backward",
    "ext_conv3x3_relu_maxpool2x2",
    "ext_conv3x3_relu_maxpool2x2_backward",
    "ext_linear",
    "ext_linear_backward",
    "ext_mlp_cross_entropy",
    "ext_mlp_cross_entropy_backward",
    "ext_count_correct",
)


# --- the functions of the backend registry ----------------------------------------
def conv3x3_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    return _conv_relu(x, weight, bias, padding)


def maxpool2x2(x: torch.Tensor) -> torch.Tensor:
    return _maxpool(x)[0]


def conv3x3_relu_maxpool2x2(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int
) -> torch.Tensor:
    return _conv_relu_pool(x, weight, bias, padding)[0]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    return _linear(x, weight, bias, relu)


def mlp_cross_entropy(
    x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    loss, logits, _, _ = _mlp_cross_entropy(x, weights, biases, target)
    return loss, logits


def count_correct(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(logits.argmax(1) == target).sum() in one op (int64 scalar on logits' device)."""
    return _count_correct(logits, target)


def run_backward(loss: torch.Tensor) -> None:
    """loss.backward() for a scalar `loss`, started from C++ (see csrc/register.cpp)."""
    _run_backward(loss)


# --- fake (meta) implementations ----------------------------------------------------
def _conv_out(x: torch.Tensor, weight: torch.Tensor, padding: int):
    return x.shape[0], weight.shape[0], x.shape[2] + 2 * padding - 2, x.shape[3] + 2 * padding - 2


def _grads(x, weight, input_grad, weight_grad):
    gx = x.new_empty(x.shape) if input_grad else x.new_empty(0)
    gw = weight.new_empty(weight.shape) if weight_grad else x.new_empty(0)
    gb = weight.new_empty(weight.shape[0]) if weight_grad else x.new_empty(0)
    return gx, gw, gb


@torch.library.register_fake("lenet_fast::ext_conv3x3_relu")
def _(x, weight, bias, padding):
    return x.new_empty(_conv_out(x, weight, padding))


@torch.library.register_fake("lenet_fast::ext_conv3x3_relu_backward")
def _(grad_out, out, x, weight, padding, input_grad, weight_grad):
    return _grads(x, weight, input_grad, weight_grad)


@torch.library.register_fake("lenet_fast::ext_maxpool2x2")
def _(x):
    shape = (x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8)


@torch.library.register_fake("lenet_fast::ext_maxpool2x2_backward")
def _(grad_out, idx, x):
    return grad_out.new_empty(x.shape)


@torch.library.register_fake("lenet_fast::ext_conv3x3_relu_maxpool2x2")
def _(x, weight, bias, padding):
    n, c, h, w = _conv_out(x, weight, padding)
    shape = (n, c, h // 2, w // 2)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8)


@torch.library.register_fake("lenet_fast::ext_conv3x3_relu_maxpool2x2_backward")
def _(grad_out, idx, x, weight, padding, input_grad, weight_grad):
    return _grads(x, weight, input_grad, weight_grad)


@torch.library.register_fake("lenet_fast::ext_linear")
def _(x, weight, bias, relu):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("lenet_fast::ext_linear_backward")
def _(grad_out, out, x, weight, relu, input_grad, weight_grad):
    return _grads(x, weight, input_grad, weight_grad)


@torch.library.register_fake("lenet_fast::ext_mlp_cross_entropy")
def _(x, weights, biases, target):
    hidden = [x.new_empty((x.shape[0], w.shape[0])) for w in weights[:-1]]
    logits = x.new_empty((x.shape[0], weights[-1].shape[0]))
    return x.new_empty(()), logits, torch.empty_like(logits), hidden


@torch.library.register_fake("lenet_fast::ext_count_correct")
def _(logits, target):
    return logits.new_empty((), dtype=torch.int64)


@torch.library.register_fake("lenet_fast::ext_mlp_cross_entropy_backward")
def _(grad_loss, grad_logits, dlogits, logits, x, weights, hidden, input_grad, weight_grad):
    grad_x = x.new_empty(x.shape) if input_grad else x.new_empty(0)
    grad_w = [w.new_empty(w.shape) if weight_grad else x.new_empty(0) for w in weights]
    grad_b = [w.new_empty(w.shape[0]) if weight_grad else x.new_empty(0) for w in weights]
    return grad_x, grad_w, grad_b
