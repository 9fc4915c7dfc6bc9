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

SEED = 0
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

    def __post_init__(self):
        self.fused_optimizer = self.fused_optimizer or self.backend is not None

    def make_optimizer(self, model: torch.nn.Module, lr: float | torch.Tensor) -> torch.optim.Optimizer:
        if self.fused_optimizer:
            return make_optimizer(model.parameters(), "sgd", lr)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, nesterov=True)

    def make_model(self, device: torch.device) -> torch.nn.Module:
        torch.manual_seed(SEED)
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


def _seed_dataloader(root, limit: int | None):
    """The lab report's feed: per-image PIL -> ToTensor -> Normalize in a DataLoader."""
    import torchvision
    from torchvision import transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    dataset = torchvision.datasets.MNIST(str(root), train=True, download=False, transform=transform)
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(limit))
    generator = torch.Generator().manual_seed(SEED)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, generator=generator)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(contender: Contender, train_set: data.DeviceData, test_set: data.DeviceData, *, epochs: int,
        device: torch.device, data_root=None, limit: int | None = None) -> dict:
    """Train `epochs` epochs; time each epoch's training loop, the warm-up, and inference.

    Warm-up (torch.compile's compilation, CUDA-graph capture, autotuning) runs
    before the timed epochs and is reported on its own; its steps are undone, so
    every contender trains from the same initial state.
    """
    model = contender.make_model(device)
    lr_tensor = torch.tensor(DEFAULT_LR["sgd"], device=device) if contender.cuda_graph else None
    optimizer = contender.make_optimizer(model, DEFAULT_LR["sgd"] if lr_tensor is None else lr_tensor)

    if contender.seed_dataloader:
        loader = _seed_dataloader(data_root, limit)
        batches_of: Callable[[int], object] = lambda epoch: ((x.to(device), y.to(device)) for x, y in loader)
        steps_per_epoch = len(loader)
    else:
        batches_of = lambda epoch: train_set.batches(BATCH_SIZE, order=data.shuffle_order(len(train_set), SEED, epoch))
        steps_per_epoch = train_set.num_batches(BATCH_SIZE)
    total_steps = steps_per_epoch * epochs

    _sync(device)
    started = time.perf_counter()
    graphed = None
    if contender.cuda_graph:
        graphed = GraphedTrainStep(model, optimizer, BATCH_SIZE)
    elif contender.compile_mode is not None:
        snapshot = snapshot_training_state(model, optimizer)
        x, y = train_set.images[:BATCH_SIZE], train_set.labels[:BATCH_SIZE]
        for _ in range(3):  # reduce-overhead records its CUDA graphs after a couple of runs
            train_step(model, optimizer, x, y)
        restore_training_state(model, optimizer, snapshot)
    _sync(device)
    warmup_seconds = time.perf_counter() - started

    epoch_seconds, images = [], 0
    for epoch in range(epochs):
        model.train()
        images = 0
        _sync(device)
        started = time.perf_counter()
        for step, (x, y) in enumerate(batches_of(epoch)):
            lr = learning_rate({"lr": DEFAULT_LR["sgd"]}, epoch * steps_per_epoch + step, total_steps)
            if graphed is not None:
                if y.shape[0] != BATCH_SIZE:  # static shapes: the smaller last batch is dropped
                    continue
                lr_tensor.fill_(lr)
                graphed.step(x, y)
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                train_step(model, optimizer, x, y)
            images += y.shape[0]
        _sync(device)
        epoch_seconds.append(time.perf_counter() - started)

    _, test_accuracy, _ = evaluate(model, test_set)  # the first call also compiles the eval graph
    _sync(device)
    started = time.perf_counter()
    evaluate(model, test_set)
    _sync(device)
    inference_seconds = time.perf_counter() - started
    best = min(epoch_seconds)
    return {
        "name": contender.name,
        "backend": contender.backend or "stock",
        "epochs": epochs,
        "epoch_seconds": epoch_seconds,
        "best_epoch_seconds": best,
        "images_per_second": images / best,
        "step_us": 1e6 * best / steps_per_epoch,
        "warmup_seconds": warmup_seconds,
        "inference_images_per_second": len(test_set) / inference_seconds,
        "test_accuracy": test_accuracy,
    }
