"""The "triton" backend: the Triton kernels of `lenet_fast.kernels` as PyTorch custom ops.

Every forward and backward launch is a `torch.library.triton_op` in the
`lenet_fast` namespace, so the ops show up in torch.compile / torch.export
graphs with their kernels visible (wrap_triton), and autograd is attached with
`register_autograd`:

    lenet_fast::triton_conv3x3_relu                    (x, weight, bias?, padding) -> out
    lenet_fast::triton_conv3x3_relu_backward_input     (grad, out, weight, padding) -> grad_x
    lenet_fast::triton_conv3x3_relu_backward_params    (grad, out, x, padding) -> (grad_w, grad_b)
    lenet_fast::triton_maxpool2x2                      (x) -> (out, winner int8)
    lenet_fast::triton_maxpool2x2_backward             (grad, winner, H, W) -> grad_x
    lenet_fast::triton_conv3x3_relu_maxpool2x2         (x, weight, bias?, padding) -> (out, winner int8)
    lenet_fast::triton_conv3x3_relu_maxpool2x2_backward_input   (grad, out, winner, weight, H, W, padding)
    lenet_fast::triton_conv3x3_relu_maxpool2x2_backward_params  (grad, out, winner, x, padding)
    lenet_fast::triton_linear                          (x, weight, bias?, relu) -> out
    lenet_fast::triton_linear_backward_input           (grad, out, weight, relu) -> grad_x
    lenet_fast::triton_linear_backward_params          (grad, out, x, relu) -> (grad_w, grad_b)
    lenet_fast::triton_softmax_cross_entropy           (logits, target) -> (mean loss, d loss / d logits)

The backward of each op saves only its inputs and its (pooled) output: ReLU's
mask is recomputed from the output and the pooling winner travels as int8.
The input gradient is a separate op so that it is skipped entirely when the
input needs no gradient (LeNet's first layer).

On CPU tensors the kernels run only under TRITON_INTERPRET=1 (see
lenet_fast.backends).  Only float32 is supported.
"""

from typing import Optional

import torch
from torch.library import register_autograd, triton_op
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .kernels.conv3x3_relu import (
    conv3x3_relu_backward_input,
    conv3x3_relu_backward_params,
    conv3x3_relu_forward,
)
from .kernels.conv3x3_relu_maxpool2x2 import (
    conv3x3_relu_maxpool2x2_backward_input,
    conv3x3_relu_maxpool2x2_backward_params,
    conv3x3_relu_maxpool2x2_forward,
)
from .kernels.linear import linear_backward_input, linear_backward_params, linear_forward
from .kernels.maxpool2x2 import maxpool2x2_backward, maxpool2x2_forward
from .kernels.mlp_cross_entropy import softmax_cross_entropy


# The op bodies below stay one line each: a triton_op body is also run on fake
# tensors to infer output shapes, so all of its logic lives in the launch
# wrappers, which only allocate, launch and reduce with torch ops.


def _backward(op, launch_wrapper, grad: torch.Tensor, *args):
    """A backward launch: `launch_wrapper(grad, *args)` directly in plain eager autograd,
    the registered `op` otherwise.

    Calling a registered op from Python passes through the custom-op dispatcher, its
    autograd wrapper and a dynamo-disable wrapper before it reaches the launch wrapper.
    An eager LeNet training step makes nine such calls, and host time is what bounds a
    small net's eager step on a GPU (docs/measurements-behind-the-code.md).  Under tracing (a dispatch mode is active: torch.compile, export,
    make_fx, opcheck; or tensor subclasses) or a torch.func transform the op is called,
    so graphs and transforms see it as before.
    """
    eager = (type(grad) is torch.Tensor and _get_current_dispatch_mode() is None
             and not torch._C._are_functorch_transforms_active())
    if eager:
        _refuse_double_backward(op)
    return (launch_wrapper if eager else op)(grad, *args)


def _refuse_double_backward(op) -> None:
    """NotImplementedError in a backward run with create_graph=True (grad mode is on inside
    it): the backward kernels record no graph, so a second derivative would be wrong."""
    if torch.is_grad_enabled():
        op = op if isinstance(op, str) else f"lenet_fast::{op._name}"
        raise NotImplementedError(
            f"lenet_fast: double backward (a backward with create_graph=True, e.g. for a gradient penalty or a "
            f"Hessian) is not supported by {op}; use backend=\"torch\" for that computation")


# --------------------------------------------------------------------------- conv3x3 + bias + ReLU


@triton_op("lenet_fast::triton_conv3x3_relu", mutates_args=())
def _conv3x3_relu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: int) -> torch.Tensor:
    return conv3x3_relu_forward(x, weight, bias, padding)


@triton_op("lenet_fast::triton_conv3x3_relu_backward_input", mutates_args=())
def _conv3x3_relu_backward_input(grad: torch.Tensor, out: torch.Tensor, weight: torch.Tensor,
                                 padding: int) -> torch.Tensor:
    return conv3x3_relu_backward_input(grad, out, weight, padding)


@triton_op("lenet_fast::triton_conv3x3_relu_backward_params", mutates_args=())
def _conv3x3_relu_backward_params(grad: torch.Tensor, out: torch.Tensor, x: torch.Tensor,
                                  padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    return conv3x3_relu_backward_params(grad, out, x, padding)


def _conv3x3_relu_setup(ctx, inputs, output):
    x, weight, bias, padding = inputs
    ctx.padding = padding
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, output)


def _conv3x3_relu_bwd(ctx, grad):
    x, weight, out = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _backward(_conv3x3_relu_backward_input, conv3x3_relu_backward_input, grad, out, weight, ctx.padding)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_w, grad_b = _backward(_conv3x3_relu_backward_params, conv3x3_relu_backward_params, grad, out, x,
                                   ctx.padding)
    return grad_x, grad_w, grad_b if ctx.has_bias else None, None


register_autograd("lenet_fast::triton_conv3x3_relu", _conv3x3_relu_bwd, setup_context=_conv3x3_relu_setup)


# --------------------------------------------------------------------------- max-pool 2x2


@triton_op("lenet_fast::triton_maxpool2x2", mutates_args=())
def _maxpool2x2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return maxpool2x2_forward(x)


@triton_op("lenet_fast::triton_maxpool2x2_backward", mutates_args=())
def _maxpool2x2_backward(grad: torch.Tensor, winner: torch.Tensor, H: int, W: int) -> torch.Tensor:
    return maxpool2x2_backward(grad, winner, H, W)


def _maxpool2x2_setup(ctx, inputs, output):
    (x,) = inputs
    ctx.input_hw = x.shape[-2:]
    ctx.save_for_backward(output[1])
    # The winner output is int8 bookkeeping: no gradient, and no zero-filled
    # int8 "gradient" allocated for it at every backward.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _maxpool2x2_bwd(ctx, grad, _grad_winner):
    (winner,) = ctx.saved_tensors
    return _backward(_maxpool2x2_backward, maxpool2x2_backward, grad, winner, *ctx.input_hw)


register_autograd("lenet_fast::triton_maxpool2x2", _maxpool2x2_bwd, setup_context=_maxpool2x2_setup)


# --------------------------------------------------------------------------- conv3x3 + bias + ReLU + max-pool 2x2


@triton_op("lenet_fast::triton_conv3x3_relu_maxpool2x2", mutates_args=())
def _conv3x3_relu_maxpool2x2(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    return conv3x3_relu_maxpool2x2_forward(x, weight, bias, padding)


@triton_op("lenet_fast::triton_conv3x3_relu_maxpool2x2_backward_input", mutates_args=())
def _conv3x3_relu_maxpool2x2_backward_input(grad: torch.Tensor, out: torch.Tensor, winner: torch.Tensor,
                                            weight: torch.Tensor, H: int, W: int, padding: int) -> torch.Tensor:
    return conv3x3_relu_maxpool2x2_backward_input(grad, out, winner, weight, H, W, padding)


@triton_op("lenet_fast::triton_conv3x3_relu_maxpool2x2_backward_params", mutates_args=())
def _conv3x3_relu_maxpool2x2_backward_params(grad: torch.Tensor, out: torch.Tensor, winner: torch.Tensor,
                                             x: torch.Tensor, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    return conv3x3_relu_maxpool2x2_backward_params(grad, out, winner, x, padding)


def _conv3x3_relu_maxpool2x2_setup(ctx, inputs, output):
    x, weight, bias, padding = inputs
    out, winner = output
    ctx.padding = padding
    ctx.has_bias = bias is not None
    ctx.input_hw = x.shape[-2:]
    ctx.save_for_backward(x, weight, out, winner)
    ctx.mark_non_differentiable(winner)
    ctx.set_materialize_grads(False)


def _conv3x3_relu_maxpool2x2_bwd(ctx, grad, _grad_winner):
    x, weight, out, winner = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _backward(_conv3x3_relu_maxpool2x2_backward_input, conv3x3_relu_maxpool2x2_backward_input, grad, out,
                           winner, weight, *ctx.input_hw, ctx.padding)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_w, grad_b = _backward(_conv3x3_relu_maxpool2x2_backward_params, conv3x3_relu_maxpool2x2_backward_params,
                                   grad, out, winner, x, ctx.padding)
    return grad_x, grad_w, grad_b if ctx.has_bias else None, None


register_autograd("lenet_fast::triton_conv3x3_relu_maxpool2x2", _conv3x3_relu_maxpool2x2_bwd,
                  setup_context=_conv3x3_relu_maxpool2x2_setup)


# --------------------------------------------------------------------------- linear (+ ReLU)


@triton_op("lenet_fast::triton_linear", mutates_args=())
def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    return linear_forward(x, weight, bias, relu)


@triton_op("lenet_fast::triton_linear_backward_input", mutates_args=())
def _linear_backward_input(grad: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, relu: bool) -> torch.Tensor:
    return linear_backward_input(grad, out, weight, relu)


@triton_op("lenet_fast::triton_linear_backward_params", mutates_args=())
def _linear_backward_params(grad: torch.Tensor, out: torch.Tensor, x: torch.Tensor,
                            relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_backward_params(grad, out, x, relu)


def _linear_setup(ctx, inputs, output):
    x, weight, bias, relu = inputs
    ctx.relu = relu
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, output)


def _linear_bwd(ctx, grad):
    x, weight, out = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _backward(_linear_backward_input, linear_backward_input, grad, out, weight, ctx.relu)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_w, grad_b = _backward(_linear_backward_params, linear_backward_params, grad, out, x, ctx.relu)
    return grad_x, grad_w, grad_b if ctx.has_bias else None, None


register_autograd("lenet_fast::triton_linear", _linear_bwd, setup_context=_linear_setup)


# --------------------------------------------------------------------------- softmax + cross-entropy (the head's loss)


@triton_op("lenet_fast::triton_softmax_cross_entropy", mutates_args=())
def _softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return softmax_cross_entropy(logits, target)


def _softmax_cross_entropy_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled "gradient" of dlogits every step


def _softmax_cross_entropy_bwd(ctx, grad_loss, _grad_dlogits):
    _refuse_double_backward("lenet_fast::triton_softmax_cross_entropy")
    (dlogits,) = ctx.saved_tensors
    return (None if grad_loss is None else dlogits * grad_loss), None


register_autograd("lenet_fast::triton_softmax_cross_entropy", _softmax_cross_entropy_bwd,
                  setup_context=_softmax_cross_entropy_setup)


# --------------------------------------------------------------------------- the backend API (see lenet_fast.backends)


def conv3x3_relu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: int) -> torch.Tensor:
    return _conv3x3_relu(x, weight, bias, padding)


def maxpool2x2(x: torch.Tensor) -> torch.Tensor:
    return _maxpool2x2(x)[0]


def conv3x3_relu_maxpool2x2(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            padding: int) -> torch.Tensor:
    return _conv3x3_relu_maxpool2x2(x, weight, bias, padding)[0]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    return _linear(x, weight, bias, relu)


def mlp_cross_entropy(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                      target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The linear kernels layer by layer, then the one-pass loss kernel.
    x = torch.flatten(x, 1)  # (N, *) -> (N, features); x itself when already 2-D
    for weight, bias in zip(weights[:-1], biases[:-1]):
        x = _linear(x, weight, bias, True)
    logits = _linear(x, weights[-1], biases[-1], False)
    loss, _ = _softmax_cross_entropy(logits, target)
    return loss, logits
