"""A training step (forward, backward, optimizer step) captured as CUDA graphs.

At LeNet's size a training step is a few dozen tiny kernels, so on a GPU the
time goes into launching them from Python, not into running them.  Capturing the
whole step once and replaying it turns ~60 launches into one.

A graph has static shapes, so there is one graph per batch size the epoch uses:
the full batch and, when the batch size does not divide the dataset, the smaller
last batch.  Every sample of an epoch is trained, exactly as in eager mode.  The
graphs read their batch from one static buffer (the smaller batch from its first
rows: `copy_` the batch in, then replay) and their learning rate from a device
tensor, so the cosine schedule keeps working without re-capture.  The optimizer
is a fused one, whose kernels read that tensor (see lenet_fast.optim).

Warm-up steps run before capture (autotuning, lazy initialisation and optimizer
state allocation must not happen inside a capture); they would change the model,
so its parameters and optimizer state are restored afterwards: the first replayed
step starts from exactly the state the caller handed in.  Capturing runs no
kernel, so it changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch

StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def snapshot_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Copies of the parameters and optimizer state, for undoing warm-up steps."""
    params = [p.detach().clone() for p in model.parameters()]
    state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in optimizer.state.items()}
    return params, state


@torch.no_grad()
def restore_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, snapshot) -> None:
    """Undo the steps since `snapshot`, in place (a captured graph holds these very tensors).

    Optimizer state that only the warm-up created returns to its initial value (zero
    buffers, step 0), which gives the same next step as no state at all for SGD with
    momentum (buffer = gradient on the first step) and for Adam.
    """
    params, state = snapshot
    for p, saved in zip(model.parameters(), params):
        p.copy_(saved)
    for p, current in optimizer.state.items():
        for key, value in current.items():
            if not torch.is_tensor(value):
                continue
            if p in state and key in state[p]:
                value.copy_(state[p][key])
            else:
                value.zero_()


class GraphedTrainStep:
    """step(x, y) -> (loss, correct) for batches of one of `batch_sizes` rows.

    `step_fn(x, y)` is the eager training step to capture (it must read the learning
    rate from a tensor and update `model`'s parameters with `optimizer`); see
    `lenet_fast.training.TrainingStep`, which builds one.  On CUDA each batch size is
    a replayed CUDA graph; on other devices (tests) the same code runs eagerly on the
    same static buffers, so the logic is checkable on a CPU.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch_sizes: Iterable[int],
                 step_fn: StepFn, *, image_shape=(1, 28, 28), warmup_steps: int = 3) -> None:
        sizes = sorted(set(batch_sizes), reverse=True)
        if not sizes or any(not isinstance(n, int) or n <= 0 for n in sizes):
            raise ValueError(f"batch_sizes must be positive integers, got {list(batch_sizes)}")
        self.model, self.optimizer, self.step_fn = model, optimizer, step_fn
        device = next(model.parameters()).device
        self.batch_sizes = sizes
        self.static_x = torch.zeros(sizes[0], *image_shape, device=device)
        self.static_y = torch.zeros(sizes[0], dtype=torch.long, device=device)
        # batch size -> (graph, its loss, its correct count); graphs only on CUDA
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._warm_up(warmup_steps)
        if device.type == "cuda":
            for n in sizes:
                self._capture(n)

    def _inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.static_x[:n], self.static_y[:n]

    def _warm_up(self, steps: int) -> None:
        snapshot = snapshot_training_state(self.model, self.optimizer)
        device = self.static_x.device
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for n in self.batch_sizes:
                for _ in range(steps):
                    self.step_fn(*self._inputs(n))
        if stream is not None:
            torch.cuda.current_stream(device).wait_stream(stream)
        restore_training_state(self.model, self.optimizer, snapshot)

    def _capture(self, n: int) -> None:
        # Gradients set to None: each graph's backward then allocates its own, inside its
        # own memory pool, instead of accumulating into another graph's.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, correct = self.step_fn(*self._inputs(n))
        self.graphs[n] = (graph, loss, correct)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        if n not in self.batch_sizes:
            raise ValueError(f"this graphed step was captured for batches of {self.batch_sizes} rows, got {n}")
        static_x, static_y = self._inputs(n)
        static_x.copy_(x, non_blocking=True)
        static_y.copy_(y, non_blocking=True)
        if n not in self.graphs:
            return self.step_fn(static_x, static_y)
        graph, loss, correct = self.graphs[n]
        graph.replay()
        return loss, correct
