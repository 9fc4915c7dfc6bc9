"""LeNet's SGD training step as one op on the CPU: the CPU's counterpart of --cuda-graph.

An eager training step pays for autograd and Python around every kernel: recording
three autograd nodes, the engine's run of them and of ten AccumulateGrad nodes, the
op wrappers and the optimizer's call: at LeNet's size on a CPU, a sixth of an ext step
(docs/measurements-behind-the-code.md).  `ext_sgd_step` runs the same step as one call of
the extension's `ext_lenet_sgd_step` (csrc/lenet_sgd_step.cpp): the same forward and
backward kernels in the order the autograd engine runs them, then the fused SGD kernel
FusedSGD calls.  Loss, gradients (left in each parameter's .grad) and updated
parameters are bitwise those of the eager step (tests/test_lenet_sgd_step.py).

It runs only where it cannot change the result: an ext LeNet on the CPU, trained by a
FusedSGD whose next step would be its one-kernel fast path, and nothing that the eager
step would run besides (tensor hooks on the parameters, optimizer hooks, anomaly mode,
an input that wants a gradient).  Otherwise `ext_sgd_step` returns None and the caller runs
the eager step.
"""

from __future__ import annotations

import torch

from .model import LeNet
from .optim import FusedSGD


def _has_hooks(p: torch.Tensor) -> bool:
    """Whether a backward of p would run code of the user's (torch keeps tensor hooks in these)."""
    return bool(p._backward_hooks or p._post_accumulate_grad_hooks)


def ext_sgd_step(model: LeNet, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    """One training step of an ext LeNet as one op: (loss, number of correct predictions),
    or None when the fused step does not apply (then nothing was done).  Called by
    lenet_fast.backends.ExtBackend.train_step, so the model already runs on ext."""
    if type(model) is not LeNet or type(optimizer) is not FusedSGD or not isinstance(x, torch.Tensor):
        return None
    if x.device.type != "cpu" or x.requires_grad or not torch.is_grad_enabled() or torch.is_anomaly_enabled():
        return None
    fast = optimizer.fast_step_arguments()
    if fast is None:
        return None
    params, buffers, hyper = fast
    layers = model.stage_parameters()
    if len(params) != len(layers) or any(p is not q for p, q in zip(params, layers)):
        return None
    if any(_has_hooks(p) or not p.requires_grad for p in params) or not isinstance(hyper["lr"], float):
        return None
    try:  # the model's own checks: on bad input the eager step raises them
        model.check_batch(x, y)
    except (TypeError, ValueError):
        return None
    return torch.ops.lenet_fast.ext_lenet_sgd_step(x, y, params, buffers, hyper["lr"], hyper["momentum"],
                                                   hyper["weight_decay"], hyper["dampening"], hyper["nesterov"],
                                                   hyper["maximize"])
