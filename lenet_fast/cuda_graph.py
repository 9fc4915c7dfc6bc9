"""One training step (forward, backward, optimizer step) captured as a CUDA graph.

At LeNet's size a training step is a few dozen tiny kernels, so on a GPU the
time goes into launching them from Python, not into running them.  Capturing the
whole step once and replaying it turns ~60 launches into one.

The graph reads its batch from static buffers (`copy_` the next batch in, then
replay) and its learning rate from a device tensor, so the cosine schedule keeps
working without re-capture.  The optimizer is a fused one (`fused=True`), whose
kernels read that tensor (see lenet_fast.optim).  Shapes are static: only full batches are replayed; a
smaller last batch of an epoch is skipped, as with `drop_last=True`.

Warm-up steps run before capture (autotuning, lazy initialisation and optimizer
state allocation must not happen inside a capture); they would change the model,
so its parameters and optimizer state are restored afterwards: the first replayed
step starts from exactly the state the caller handed in.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


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
    """step(x, y) -> (loss, correct) with x, y of exactly `batch_size` rows.

    On CUDA the step is a replayed CUDA graph; on other devices (tests) the same
    code runs eagerly on the same static buffers, so the logic is checkable on CPU.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch_size: int,
                 image_shape=(1, 28, 28), warmup_steps: int = 3) -> None:
        self.model, self.optimizer = model, optimizer
        device = next(model.parameters()).device
        self.batch_size = batch_size
        self.static_x = torch.zeros(batch_size, *image_shape, device=device)
        self.static_y = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.graph = None
        self._warm_up(warmup_steps)
        if device.type == "cuda":
            self._capture()

    def _eager_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(self.static_x)
        loss = F.cross_entropy(logits, self.static_y)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), (logits.detach().argmax(1) == self.static_y).sum()

    def _warm_up(self, steps: int) -> None:
        snapshot = snapshot_training_state(self.model, self.optimizer)
        device = self.static_x.device
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for _ in range(steps):
                self.optimizer.zero_grad(set_to_none=True)
                self._eager_step()
        if stream is not None:
            torch.cuda.current_stream(device).wait_stream(stream)
        restore_training_state(self.model, self.optimizer, snapshot)

    def _capture(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # grads are then allocated inside the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss, self.static_correct = self._eager_step()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] != self.batch_size:
            raise ValueError(f"a graphed step takes batches of exactly {self.batch_size}, got {x.shape[0]}")
        self.static_x.copy_(x, non_blocking=True)
        self.static_y.copy_(y, non_blocking=True)
        if self.graph is None:
            self.optimizer.zero_grad(set_to_none=False)
            return self._eager_step()
        self.graph.replay()
        return self.static_loss, self.static_correct

