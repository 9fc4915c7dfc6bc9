"""End-to-end contenders: the same LeNet trained the same way, fed and executed differently.

Every contender starts from the same seed (same initial weights: LeNet and the
stock TorchLeNet initialise identically), sees the same shuffled batches, and
uses the same optimizer and learning-rate schedule as `lenet_fast.train`, so
test accuracy after the same epochs is comparable and speed is never bought
with accuracy.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from lenet_fast import data
from lenet_fast.cuda_graph import GraphedTrainStep, restore_training_state, snapshot_training_state
from lenet_fast.model import LeNet, TorchLeNet
from lenet_fast.optim import MOMENTUM, make_optimizer
from lenet_fast.train import DEFAULT_LR, evaluate, learning_rate, train_step

SEED = 0  # the default; `benchmarks.run --seed` picks another (the same for every contender)
BATCH_SIZE = 64


@dataclasses.dataclass
class Contender:
    name: str
    backend: str | None = None        # a lenet_fast backend; None = the stock torch.nn model
    compile_mode: str | None = None   # torch.compile mode ("default" = no mode argument)
    cuda_graph: bool = False
    seed_dataloader: bool = False     # the seed's torchvision Dataset + DataLoader + ToTensor feed
    # lenet_fast trains with lenet_fast.optim.FusedSGD (PyTorch's fused SGD kernel with
    # less Python per step); the stock rows use torch.optim.SGD's default, as a user
    # would, and one stock row uses FusedSGD too, so the table shows what the optimizer
    # alone is worth.
    fused_optimizer: bool = False
    # lenet_fast's train_step runs an ext LeNet's CPU step as one op (lenet_fast.fused_step);
    # False keeps the eager autograd step, so the table shows what that op is worth.
    fused_step: bool = True

    def __post_init__(self):
        self.fused_optimizer = self.fused_optimizer or self.backend is not None

    def make_optimizer(self, model: torch.nn.Module, lr: float | torch.Tensor) -> torch.optim.Optimizer:
        if self.fused_optimizer:
            return make_optimizer(model.parameters(), "sgd", lr)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, nesterov=True)

    def make_model(self, device: torch.device, seed: int = SEED) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = (TorchLeNet() if self.backend is None else LeNet(backend=self.backend)).to(device)
        if self.compile_mode is not None:
            mode = None if self.compile_mode == "default" else self.compile_mode
            model = torch.compile(model, mode=mode)
        return model


def contenders(device: torch.device, available: set[str]) -> list[Contender]:
    """Stock eager first (the reference of every speedup), then lenet_fast, then the slow
    or slow-to-compile baselines: a run cut short by a time limit keeps the main rows."""
    rows = [Contender("stock eager"), Contender("stock eager + fused SGD", fused_optimizer=True)]
    for backend in ("ext", "triton"):
        if backend in available:
            rows.append(Contender(f"lenet_fast {backend}", backend=backend))
            if backend == "ext" and device.type == "cpu":
                rows.append(Contender("lenet_fast ext, autograd step", backend=backend, fused_step=False))
            if device.type == "cuda":
                rows.append(Contender(f"lenet_fast {backend} + CUDA graph", backend=backend, cuda_graph=True))
    rows += [
        Contender("stock eager, seed DataLoader", seed_dataloader=True),
        Contender("torch.compile", compile_mode="default"),
    ]
    if device.type == "cuda":
        rows += [
            Contender("torch.compile reduce-overhead", compile_mode="reduce-overhead"),
            Contender("torch.compile max-autotune-no-cudagraphs", compile_mode="max-autotune-no-cudagraphs"),
        ]
    return rows


def _seed_dataloader(root, limit: int | None, seed: int):
    """The lab report's feed: per-image PIL -> ToTensor -> Normalize in a DataLoader."""
    import torchvision
    from torchvision import transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    dataset = torchvision.datasets.MNIST(str(root), train=True, download=False, transform=transform)
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(limit))
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, generator=generator)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Run:
    """One contender's training run, advanced in segments so runs can be interleaved.

    Construction builds the model and optimizer and does the warm-up
    (torch.compile's compilation, CUDA-graph capture), timed on its own; its
    steps are undone, so every contender trains from the same initial state.
    `epoch(e, segments)` is a generator that trains epoch e in `segments`
    slices of steps, yielding between slices: `interleave` runs several
    contenders' slices in turn, so a machine that speeds up or slows down during
    the benchmark (a shared or throttled CPU) moves every row alike.  The epoch
    time is the sum of its own slices.
    """

    def __init__(self, contender: Contender, train_set: data.DeviceData, test_set: data.DeviceData, *, epochs: int,
                 device: torch.device, data_root=None, limit: int | None = None, seed: int = SEED):
        self.contender, self.train_set, self.test_set, self.device = contender, train_set, test_set, device
        self.epochs = epochs
        self.model = contender.make_model(device, seed)
        self.lr_tensor = torch.tensor(DEFAULT_LR["sgd"], device=device) if contender.cuda_graph else None
        self.optimizer = contender.make_optimizer(
            self.model, DEFAULT_LR["sgd"] if self.lr_tensor is None else self.lr_tensor)
        if contender.seed_dataloader:
            loader = _seed_dataloader(data_root, limit, seed)
            self.batches_of: Callable[[int], object] = lambda epoch: (
                (x.to(device), y.to(device)) for x, y in loader)
            self.steps_per_epoch = len(loader)
        else:
            self.batches_of = lambda epoch: train_set.batches(
                BATCH_SIZE, order=data.shuffle_order(len(train_set), seed, epoch))
            self.steps_per_epoch = train_set.num_batches(BATCH_SIZE)
        self.total_steps = self.steps_per_epoch * epochs
        self.epoch_seconds: list[float] = []
        self.images = 0

        _sync(device)
        started = time.perf_counter()
        self.graphed = None
        if contender.cuda_graph:
            self.graphed = GraphedTrainStep(self.model, self.optimizer, BATCH_SIZE)
        elif contender.compile_mode is not None:
            # Every batch shape the epoch will see, so that no compilation lands in the timed
            # epoch: MNIST's smaller last batch (32 images) recompiles (0.5 s on the 2-core
            # CPU; on a GPU, seconds: see README, "Benchmarks, GPU").
            snapshot = snapshot_training_state(self.model, self.optimizer)
            shapes = {BATCH_SIZE, len(train_set) % BATCH_SIZE} - {0}
            for n in sorted(shapes, reverse=True):
                x, y = train_set.images[:n], train_set.labels[:n]
                for _ in range(3):  # reduce-overhead records its CUDA graphs after a couple of runs
                    train_step(self.model, self.optimizer, x, y)
            restore_training_state(self.model, self.optimizer, snapshot)
        _sync(device)
        self.warmup_seconds = time.perf_counter() - started

    def epoch(self, epoch: int, segments: int = 1):
        """Train epoch `epoch`, yielding after each of `segments` slices; records its time."""
        self.model.train()
        self.images, elapsed = 0, 0.0
        slice_steps = -(-self.steps_per_epoch // segments)
        batches = iter(enumerate(self.batches_of(epoch)))
        done = False
        while not done:
            _sync(self.device)
            started = time.perf_counter()
            for _ in range(slice_steps):
                item = next(batches, None)
                if item is None:
                    done = True
                    break
                step, (x, y) = item
                self._train_step(epoch * self.steps_per_epoch + step, x, y)
            _sync(self.device)
            elapsed += time.perf_counter() - started
            if not done:
                yield
        self.epoch_seconds.append(elapsed)

    def _train_step(self, global_step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        lr = learning_rate({"lr": DEFAULT_LR["sgd"]}, global_step, self.total_steps)
        if self.graphed is not None:
            if y.shape[0] != BATCH_SIZE:  # static shapes: the smaller last batch is dropped
                return
            self.lr_tensor.fill_(lr)
            self.graphed.step(x, y)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            train_step(self.model, self.optimizer, x, y, fused=self.contender.fused_step)
        self.images += y.shape[0]

    def result(self) -> dict:
        """Test accuracy and inference speed after training; the row of the results table."""
        _, test_accuracy, _ = evaluate(self.model, self.test_set)  # the first call also compiles the eval graph
        _sync(self.device)
        started = time.perf_counter()
        evaluate(self.model, self.test_set)
        _sync(self.device)
        inference_seconds = time.perf_counter() - started
        best = min(self.epoch_seconds)
        return {
            "name": self.contender.name,
            "backend": self.contender.backend or "stock",
            "epochs": self.epochs,
            "epoch_seconds": self.epoch_seconds,
            "best_epoch_seconds": best,
            "images_per_second": self.images / best,
            "step_us": 1e6 * best / self.steps_per_epoch,
            "warmup_seconds": self.warmup_seconds,
            "inference_images_per_second": len(self.test_set) / inference_seconds,
            "test_accuracy": test_accuracy,
        }


def interleave(runs: list[Run], epoch: int, segments: int) -> None:
    """Epoch `epoch` of every run, their slices taken in turn.

    Each round starts one run later than the round before, so that no run always follows
    the same neighbour (a slice right after a slow baseline's may start with cold caches)."""
    pending = [run.epoch(epoch, segments) for run in runs]
    turn = 0
    while pending:
        start = turn % len(pending)
        finished = {id(g) for g in pending[start:] + pending[:start] if next(g, StopIteration) is StopIteration}
        pending = [g for g in pending if id(g) not in finished]
        turn += 1


def run(contender: Contender, train_set: data.DeviceData, test_set: data.DeviceData, *, epochs: int,
        device: torch.device, data_root=None, limit: int | None = None, seed: int = SEED) -> dict:
    """Train one contender alone for `epochs` epochs; its results row."""
    r = Run(contender, train_set, test_set, epochs=epochs, device=device, data_root=data_root, limit=limit, seed=seed)
    for epoch in range(epochs):
        for _ in r.epoch(epoch):
            pass
    return r.result()
