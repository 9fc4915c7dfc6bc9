"""One training step, as lenet_fast trains: eager, one op on the CPU, or replayed CUDA graphs.

`TrainingStep` is what a training loop calls per batch (`lenet_fast.train`, the
benchmarks): `set_lr(value)` then `step(x, y)`.  On a CUDA device it replays the
step captured as CUDA graphs (`lenet_fast.cuda_graph`; a training step of this net
is bound by the host that launches its kernels), one graph per batch size of the
epoch; elsewhere, or with `cuda_graph=False`, it runs `train_step` eagerly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .backends import count_correct
from .cuda_graph import GraphedTrainStep
from .model import LeNet


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               fused: bool = True):
    """One training step; returns (loss, number of correct predictions), both on the device.

    A LeNet runs on its backend (`lenet_fast.backends.Backend`): with `fused` (the default)
    the backend's whole-step path where it has one (the ext backend on the CPU: one op,
    bitwise the same as the eager step; the triton backend: four Triton launches), else forward with the fused head + loss, the
    backend's backward and count, and the optimizer.
    """
    if isinstance(model, LeNet) and isinstance(x, torch.Tensor):
        backend = model.implementation()
        done = backend.train_step(model, optimizer, x, y) if fused else None
        if done is not None:
            return done
        loss, logits = model.forward_with_loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        backend.backward(loss)
        optimizer.step()
        return loss.detach(), backend.count_correct(logits, y)
    # The stock step (the benchmarks time stock models through here).
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), count_correct(logits, y)


def learning_rate(peak: float, step: int, total_steps: int) -> float:
    """Cosine annealing from the peak lr to 0, a function of the global step only."""
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def epoch_batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    """The batch sizes an epoch of `num_samples` in batches of `batch_size` takes: the full
    batch and, when batch_size does not divide num_samples, the smaller last one."""
    return sorted({min(batch_size, num_samples), num_samples % batch_size} - {0}, reverse=True)


def lr_holder(lr: float, device: torch.device | str, cuda_graph: bool) -> float | torch.Tensor:
    """The learning rate to build the optimizer with: a device tensor for CUDA graphs (the
    replayed kernels read it, and `TrainingStep.set_lr` refills it), else a float."""
    return torch.tensor(float(lr), device=device) if cuda_graph else lr


class TrainingStep:
    """`set_lr(value)`, then `step(x, y) -> (loss, correct)` (device tensors; the graphed
    step's are overwritten by its next replay, so use them before the next step).

    cuda_graph: capture the step as CUDA graphs for the given `batch_sizes` (on a CUDA
    device; on a CPU the same static-buffer logic runs eagerly, for tests).  The
    optimizer must then hold its learning rate in one tensor on the model's device
    (build it with `lr_holder`).  Capture happens here, so load any optimizer or model
    state before constructing this.
    fused: let `train_step` take the backend's whole-step path where it applies (the ext CPU
    one-op step, eager only; the triton four-launch step, eager or captured).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, cuda_graph: bool = False,
                 batch_sizes: Iterable[int] = (), fused: bool = True) -> None:
        self.model, self.optimizer, self.fused = model, optimizer, fused
        self.lr_tensor: torch.Tensor | None = None
        self.graphed: GraphedTrainStep | None = None
        if not cuda_graph:
            return
        lrs = {id(group["lr"]): group["lr"] for group in optimizer.param_groups}
        device = next(model.parameters()).device
        lr = next(iter(lrs.values()))
        if len(lrs) != 1 or not isinstance(lr, torch.Tensor) or lr.device != device:
            raise ValueError("a CUDA-graphed step reads the learning rate from one tensor on the model's device; "
                             "build the optimizer with lr=lenet_fast.training.lr_holder(lr, device, True)")
        self.lr_tensor = lr
        self.graphed = GraphedTrainStep(model, optimizer, batch_sizes,
                                        lambda x, y: train_step(model, optimizer, x, y, fused=fused))

    def set_lr(self, value: float) -> None:
        if self.lr_tensor is not None:
            self.lr_tensor.fill_(value)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = value

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graphed is not None:
            return self.graphed.step(x, y)
        return train_step(self.model, self.optimizer, x, y, fused=self.fused)
