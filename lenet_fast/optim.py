"""The optimizers lenet_fast trains with: SGD and Adam on PyTorch's fused kernels.

Fused kernels update every parameter in one call.  At LeNet's size this
matters: on a CPU the default per-tensor path costs many times the fused kernel
(docs/measurements-behind-the-code.md), and on a GPU it is several launches per
parameter instead of one.
A learning rate given as a device tensor is read by the kernels at run time,
which is what lets a CUDA graph replay the step while the schedule changes it.

SGD is `FusedSGD`: torch.optim.SGD(fused=True) with the same kernel, math,
state and state_dict, minus torch.optim's per-step Python bookkeeping, which
at LeNet's size costs more than the update itself (see its docstring).
"""

from __future__ import annotations

import torch
from torch.optim import optimizer as _torch_optimizer

MOMENTUM = 0.9


class FusedSGD(torch.optim.SGD):
    """torch.optim.SGD(fused=True) with a lean step() and zero_grad().

    Same update (PyTorch's own fused kernel, aten::_fused_sgd_, which
    torch.optim.SGD(fused=True) calls), same state (`momentum_buffer` per
    parameter) and param_groups, so checkpoints move freely between the two;
    step hooks, closures and a tensor learning rate work as in torch.optim.
    What goes is per-step Python: torch.optim wraps every step in a profiler
    range and hook dispatch, regroups the tensors by device and dtype and looks
    up each parameter's state, which in a LeNet training step costs several times
    the update itself (docs/measurements-behind-the-code.md).  Here, while no hooks are registered, a
    step is one call of the kernel on lists kept from the previous step.
    Sparse gradients and GradScaler's grad_scale/found_inf are not supported
    (use torch.optim.SGD).
    """

    def __init__(self, params, lr: float | torch.Tensor, **kwargs) -> None:
        super().__init__(params, lr=lr, fused=True, **kwargs)
        # Per param group: (its params list, the same params, their momentum
        # buffers), valid while the group's params list and the state are
        # (load_state_dict and add_param_group clear it; replacing a buffer in
        # `state` by hand is not supported).
        self._lists: dict[int, tuple[list, list, list]] = {}

    def step(self, closure=None):
        # torch.optim wraps a subclass's step() in its hook and profiler
        # dispatch unless marked `hooked` (below); that wrapper alone costs more
        # than the update, so it is used only when hooks are registered.
        if self._has_step_hooks():
            return torch.optim.Optimizer.profile_hook_step(FusedSGD._step)(self, closure)
        return self._step(closure)

    step.hooked = True

    @torch.no_grad()
    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._scales_grads():
            raise RuntimeError("FusedSGD does not unscale gradients (GradScaler); use torch.optim.SGD(fused=True)")
        for index, group in enumerate(self.param_groups):
            hyper = dict(weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                         dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"])
            kept = self._kept_lists(index, group)
            if kept is not None:
                grads = [p.grad for p in kept[1]]
                if not any(g is None for g in grads):
                    torch._fused_sgd_(kept[1], grads, kept[2], is_first_step=False, **hyper)
                    continue
            self._step_group(index, group, hyper)
        return loss

    def _has_step_hooks(self) -> bool:
        return bool(self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _global_step_hooks())

    def _scales_grads(self) -> bool:
        """Whether GradScaler set grad_scale/found_inf, which FusedSGD does not apply."""
        return getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None

    def _kept_lists(self, index: int, group: dict):
        """(params list, params, momentum buffers) of the group when its fast path is valid."""
        kept = self._lists.get(index)
        if kept is not None and kept[0] is group["params"] and group["momentum"] != 0:
            return kept
        return None

    def fast_step_arguments(self):
        """(params, momentum buffers, param group) that the next step() would pass to the
        fused kernel, given gradients for all params, or None when it would do more than that
        one call (hooks, several groups, no momentum, buffers not yet created: the first step
        creates them).  A fused training step calls the kernel itself (lenet_fast.fused_step)."""
        if len(self.param_groups) != 1 or self._has_step_hooks() or self._scales_grads():
            return None
        kept = self._kept_lists(0, self.param_groups[0])
        return None if kept is None else (kept[1], kept[2], self.param_groups[0])

    def _step_group(self, index: int, group: dict, hyper: dict) -> None:
        """The general path: parameters without grads skipped, buffers created on a first update."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("FusedSGD does not support sparse gradients; use torch.optim.SGD")
        if group["momentum"] == 0:
            _fused_sgd(params, grads, [], is_first_step=False, **hyper)
            return
        states = [self.state[p] for p in params]
        new = [i for i, state in enumerate(states) if state.get("momentum_buffer") is None]
        for i in new:
            states[i]["momentum_buffer"] = torch.empty_like(grads[i])
        new_set = set(new)
        old = [i for i in range(len(params)) if i not in new_set]
        for indices, first in ((new, True), (old, False)):
            if indices:
                _fused_sgd([params[i] for i in indices], [grads[i] for i in indices],
                           [states[i]["momentum_buffer"] for i in indices], is_first_step=first, **hyper)
        if len(params) == len(group["params"]) and len({(p.device, p.dtype) for p in params}) == 1:
            self._lists[index] = (group["params"], params, [state["momentum_buffer"] for state in states])

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            return super().zero_grad(set_to_none=False)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def load_state_dict(self, state_dict: dict) -> None:
        self._lists.clear()  # the state's buffers are replaced
        super().load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "_lists"):
            self._lists.clear()
        super().add_param_group(param_group)


def _global_step_hooks() -> bool:
    """Whether hooks were registered for every optimizer (torch.optim.optimizer.register_optimizer_step_*_hook)."""
    return bool(getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)) or bool(
        getattr(_torch_optimizer, "_global_optimizer_post_hooks", None))


def _fused_sgd(params, grads, buffers, **kwargs) -> None:
    """One aten::_fused_sgd_ call per (device, dtype): the kernel takes one of each."""
    key = (params[0].device, params[0].dtype)
    if all((p.device, p.dtype) == key for p in params):
        torch._fused_sgd_(params, grads, buffers, **kwargs)
        return
    groups: dict = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    for index in groups.values():
        torch._fused_sgd_([params[i] for i in index], [grads[i] for i in index],
                          [buffers[i] for i in index] if buffers else [], **kwargs)


def make_optimizer(params, name: str, lr: float | torch.Tensor, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum 0.9 (FusedSGD), or Adam; fused, so one kernel per step."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True,
                                capturable=isinstance(lr, torch.Tensor))
    if name == "sgd":
        return FusedSGD(params, lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adam'")
