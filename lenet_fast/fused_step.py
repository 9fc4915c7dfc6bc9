"""LeNet's SGD training step in as few launches as a backend can: the whole-step paths.

An eager training step pays for autograd and Python around every kernel, and on a GPU
for every launch: at LeNet's size that is most of a step.  Two backends replace the
whole step (their `Backend.train_step` calls these):

* `ext_sgd_step`, on the CPU: one call of the extension's `ext_lenet_sgd_step`
  (csrc/lenet_sgd_step.cpp): the same forward and backward kernels in the order the
  autograd engine runs them, then the fused SGD kernel FusedSGD calls; loss, gradients
  and parameters are bitwise those of the eager step (tests/test_lenet_sgd_step.py).
* `triton_sgd_step`: four Triton launches (kernels/lenet_step.py), eager or inside a
  CUDA graph; equal to the eager step up to summation order
  (tests/test_triton_train_step.py).

Both run only where they cannot change the result (`step_arguments`): a LeNet trained
by a FusedSGD whose next step would be its one-kernel fast path, and nothing that the
eager step would run besides (tensor hooks on the parameters, optimizer hooks, anomaly
mode, an input that wants a gradient).  Otherwise they return None and the caller runs
the eager step.
"""

from __future__ import annotations

import torch

from .model import CONV_STAGES, LeNet
from .optim import FusedSGD


def _has_hooks(p: torch.Tensor) -> bool:
    """Whether a backward of p would run code of the user's (torch keeps tensor hooks in these)."""
    return bool(p._backward_hooks or p._post_accumulate_grad_hooks)


def step_arguments(model: LeNet, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    """(params, momentum buffers, param group) when a whole-step path may replace the eager
    step of `model` on (x, y): exactly a LeNet trained by a FusedSGD whose next step would
    be its one-kernel fast path, and nothing that the eager step would run besides (tensor
    hooks on the parameters, optimizer hooks, anomaly mode, frozen parameters, an input
    that wants a gradient, input the model's checks refuse); else None."""
    if type(model) is not LeNet or type(optimizer) is not FusedSGD or not isinstance(x, torch.Tensor):
        return None
    if any(stage.padding for stage in CONV_STAGES):  # both whole-step paths run unpadded conv stages
        return None
    if x.requires_grad or not torch.is_grad_enabled() or torch.is_anomaly_enabled():
        return None
    fast = optimizer.fast_step_arguments()
    if fast is None:
        return None
    params = fast[0]
    layers = model.stage_parameters()
    if len(params) != len(layers) or any(p is not q for p, q in zip(params, layers)):
        return None
    if any(_has_hooks(p) or not p.requires_grad for p in params):
        return None
    try:  # the model's own checks: on bad input the eager step raises them
        model.check_batch(x, y)
    except (TypeError, ValueError):
        return None
    return fast


def ext_sgd_step(model: LeNet, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    """One training step of an ext LeNet on the CPU as one op: (loss, number of correct
    predictions), or None when the fused step does not apply (then nothing was done).
    Called by lenet_fast.backends.ExtBackend.train_step, so the model runs on ext."""
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu":
        return None
    fast = step_arguments(model, optimizer, x, y)
    if fast is None or not isinstance(fast[2]["lr"], float):
        return None
    params, buffers, hyper = fast
    return torch.ops.lenet_fast.ext_lenet_sgd_step(x, y, params, buffers, hyper["lr"], hyper["momentum"],
                                                   hyper["weight_decay"], hyper["dampening"], hyper["nesterov"],
                                                   hyper["maximize"])


def triton_sgd_step(model: LeNet, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    """One training step of a triton LeNet in four Triton launches (kernels/lenet_step.py):
    (loss, number of correct predictions), or None when it does not apply (then nothing was
    done).  Called by lenet_fast.backends.TritonBackend.train_step, so the model runs on
    triton; the gradients are left in each parameter's .grad, as the eager step leaves them.
    Unlike the ext step it also runs with the learning rate in a device tensor, so a CUDA
    graph captures it."""
    fast = step_arguments(model, optimizer, x, y)
    if fast is None or x.dtype != torch.float32:
        return None
    from .kernels.lenet_step import sgd_train_step, supports

    if not supports(fast[0]):
        return None

    params, buffers, hyper = fast
    loss, correct, grads = sgd_train_step(x.contiguous(), y.contiguous(), params, buffers, hyper["lr"],
                                          hyper["momentum"], hyper["dampening"], hyper["weight_decay"],
                                          hyper["nesterov"], hyper["maximize"])
    for p, g in zip(params, grads):
        p.grad = g
    return loss, correct
