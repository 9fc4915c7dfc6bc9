"""End-to-end contenders: the same LeNet trained the same way, fed and executed differently.

Every contender starts from the same seed (same initial weights: LeNet and the
stock TorchLeNet initialise identically), sees the same shuffled batches, and
uses the same optimizer and learning-rate schedule as `lenet_fast.train`, so
test accuracy after the same epochs is comparable and speed is never bought
with accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from lenet_fast import cli, data
from lenet_fast.cuda_graph import restore_training_state, snapshot_training_state
from lenet_fast.model import LeNet, TorchLeNet
from lenet_fast.optim import MOMENTUM, make_optimizer
from lenet_fast.train import DEFAULT_LR, evaluate
from lenet_fast.training import TrainingStep, epoch_batch_sizes, learning_rate, lr_holder

SEED = 0  # the default; `benchmarks.run --seed` picks another (the same for every contender)
BATCH_SIZE = 64
STOCK_GRAPH = "stock + CUDA graph"  # the reference for what CUDA graphs alone are worth


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
    # lenet_fast's train_step takes a backend's whole-step path (lenet_fast.fused_step: an ext
    # LeNet's CPU step as one op, a triton LeNet's step as four launches); False keeps the
    # op-by-op autograd step, so the table shows what the whole step is worth.
    fused_step: bool = True
    # The path `python -m lenet_fast.train` takes on this device with this backend.
    default_path: bool = False

    def __post_init__(self):
        # CUDA graphs need a fused optimizer (its kernels read the learning rate from a tensor).
        self.fused_optimizer = self.fused_optimizer or self.backend is not None or self.cuda_graph

    def make_optimizer(self, model: torch.nn.Module, lr: float | torch.Tensor,
                       weight_decay: float = 0.0) -> torch.optim.Optimizer:
        if self.fused_optimizer:
            return make_optimizer(model.parameters(), "sgd", lr, weight_decay)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=weight_decay)

    def make_model(self, device: torch.device, seed: int = SEED) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = (TorchLeNet() if self.backend is None else LeNet(backend=self.backend)).to(device)
        if self.compile_mode is not None:
            # From scratch, as a user's first run compiles: otherwise a second model in the same
            # process reuses the first one's compiled code and its warm-up looks free.
            torch._dynamo.reset()
            mode = None if self.compile_mode == "default" else self.compile_mode
            model = torch.compile(model, mode=mode)
        return model


def contenders(device: torch.device, available: set[str]) -> list[Contender]:
    """Stock eager first (the reference of every speedup), stock with the same whole-step
    CUDA graph as lenet_fast's (on CUDA), then lenet_fast, then the slow or slow-to-compile
    baselines: a run cut short by a time limit keeps the main rows."""
    cuda = device.type == "cuda"
    rows = [Contender("stock eager"), Contender("stock eager + fused SGD", fused_optimizer=True)]
    if cuda:
        rows.append(Contender(STOCK_GRAPH, cuda_graph=True))
    for backend in ("ext", "triton"):
        if backend not in available:
            continue
        if cuda:  # lenet_fast.train's default on CUDA replays graphs; the eager row says what they are worth
            rows.append(Contender(f"lenet_fast {backend} + CUDA graph", backend=backend, cuda_graph=True,
                                  default_path=True))
            rows.append(Contender(f"lenet_fast {backend}, eager", backend=backend))
            if backend == "triton":
                rows.append(Contender("lenet_fast triton op by op + CUDA graph", backend=backend, cuda_graph=True,
                                      fused_step=False))
        else:
            rows.append(Contender(f"lenet_fast {backend}", backend=backend, default_path=True))
            if backend == "ext":
                rows.append(Contender("lenet_fast ext, autograd step", backend=backend, fused_step=False))
    rows += [
        Contender("stock eager, seed DataLoader", seed_dataloader=True),
        Contender("torch.compile", compile_mode="default"),
    ]
    if cuda:
        rows += [
            Contender("torch.compile reduce-overhead", compile_mode="reduce-overhead"),
            Contender("torch.compile max-autotune-no-cudagraphs", compile_mode="max-autotune-no-cudagraphs"),
        ]
    return rows


def load_data(device: torch.device, data_root) -> tuple[data.DeviceData, data.DeviceData, str, object]:
    """(train, test, source, data_root): MNIST from `data_root`, else random data of
    MNIST's size (timing still means something on it; accuracy does not), data_root None."""
    try:
        train_set, test_set = data.load("mnist", data_root, device=device, download=False)
        return train_set, test_set, "real MNIST", data_root
    except data.DatasetError as exc:
        print(f"benchmarks: no MNIST ({exc.__class__.__name__}); timing on random data, accuracy meaningless",
              file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    make = lambda n: data.DeviceData(torch.randn(n, 1, 28, 28, generator=g).to(device),  # noqa: E731
                                     torch.randint(0, 10, (n,), generator=g).to(device))
    return make(60000), make(10000), "random data (MNIST not found)", None


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
                 device: torch.device, data_root=None, limit: int | None = None, seed: int = SEED,
                 weight_decay: float = 0.0):
        self.contender, self.train_set, self.test_set, self.device = contender, train_set, test_set, device
        self.epochs = epochs
        self.model = contender.make_model(device, seed)
        self.optimizer = contender.make_optimizer(
            self.model, lr_holder(DEFAULT_LR["sgd"], device, contender.cuda_graph), weight_decay)
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
        self.train_seconds = 0.0  # every slice of every epoch so far
        self.steps_done = 0

        _sync(device)
        started = time.perf_counter()
        # Every batch shape the epoch will see (MNIST's last batch has 32 images): graphs are
        # captured and torch.compile compiles for each before the clock starts.
        batch_sizes = epoch_batch_sizes(len(train_set), BATCH_SIZE)
        self.step = TrainingStep(self.model, self.optimizer, cuda_graph=contender.cuda_graph,
                                 batch_sizes=batch_sizes, fused=contender.fused_step)
        if contender.compile_mode is not None:
            snapshot = snapshot_training_state(self.model, self.optimizer)
            for n in batch_sizes:
                x, y = train_set.images[:n], train_set.labels[:n]
                for _ in range(3):  # reduce-overhead records its CUDA graphs after a couple of runs
                    self.step.step(x, y)
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
                done = step + 1 == self.steps_per_epoch
                if done:
                    break
            _sync(self.device)
            seconds = time.perf_counter() - started
            elapsed += seconds
            self.train_seconds += seconds
            if not done:
                yield
        self.epoch_seconds.append(elapsed)

    def _train_step(self, global_step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.step.set_lr(learning_rate(DEFAULT_LR["sgd"], global_step, self.total_steps))
        self.step.step(x, y)
        self.images += y.shape[0]
        self.steps_done += 1

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
            "cuda_graph": self.contender.cuda_graph,
            "default_path": self.contender.default_path,
            "epochs": self.epochs,
            "epoch_seconds": self.epoch_seconds,
            "best_epoch_seconds": best,
            "images_per_second": self.images / best,
            "step_us": 1e6 * best / self.steps_per_epoch,
            "warmup_seconds": self.warmup_seconds,
            "inference_images_per_second": len(self.test_set) / inference_seconds,
            "test_accuracy": test_accuracy,
        }


def interleave(runs: list[Run], epoch: int, segments: int,
               after_slice: Callable[[Run], bool] | None = None) -> None:
    """Epoch `epoch` of every run, their slices taken in turn.

    Each round starts one run later than the round before, so that no run always follows
    the same neighbour (a slice right after a slow baseline's may start with cold caches).
    `after_slice(run)`, if given, runs after each of that run's slices, outside its clock;
    True ends the run's epoch there."""
    pending = [(run, run.epoch(epoch, segments)) for run in runs]
    turn = 0
    while pending:
        start = turn % len(pending)
        finished = set()
        for run, slices in pending[start:] + pending[:start]:
            more = next(slices, StopIteration) is not StopIteration
            if after_slice is not None and after_slice(run) and more:
                slices.close()
                more = False
            if not more:
                finished.add(id(slices))
        pending = [(run, slices) for run, slices in pending if id(slices) not in finished]
        turn += 1


def run(contender: Contender, train_set: data.DeviceData, test_set: data.DeviceData, *, epochs: int,
        device: torch.device, data_root=None, limit: int | None = None, seed: int = SEED) -> dict:
    """Train one contender alone for `epochs` epochs; its results row."""
    r = Run(contender, train_set, test_set, epochs=epochs, device=device, data_root=data_root, limit=limit, seed=seed)
    for epoch in range(epochs):
        for _ in r.epoch(epoch):
            pass
    return r.result()


def run_capped(contender: Contender, *, epochs: int, device: torch.device, data_root, seed: int,
               limit_seconds: float) -> dict:
    """`run` in a child process that is killed after `limit_seconds` (compilation included):
    a torch.compile mode that autotunes for minutes then costs its own row, not the others'.
    A row cut short says so in `cut_after_seconds` and has no timings."""
    command = [sys.executable, "-m", "benchmarks.end_to_end", "--contender", contender.name,
               "--device", device.type, "--epochs", str(epochs), "--seed", str(seed),
               "--threads", str(torch.get_num_threads())]
    if data_root is not None:
        command += ["--data-dir", str(data_root)]
    # A session of its own, so that inductor's compile workers die with it.
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=limit_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return {"name": contender.name, "backend": "stock", "epochs": epochs, "cut_after_seconds": limit_seconds}
    if child.returncode != 0:
        raise RuntimeError(f"{contender.name}: the child run failed (exit {child.returncode}):\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    """One contender's row as JSON on the last line of stdout (what `run_capped` runs)."""
    p = argparse.ArgumentParser(prog="benchmarks.end_to_end", description="Train one end-to-end contender.")
    p.add_argument("--contender", required=True, help="a row name of benchmarks.run's end-to-end table")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cli.configure_determinism()
    from benchmarks.run import fast_backends

    by_name = {c.name: c for c in contenders(device, set(fast_backends(device)))}
    if args.contender not in by_name:
        p.error(f"--contender: unknown {args.contender!r}; choose one of {sorted(by_name)}")
    train_set, test_set, _, data_root = load_data(device, args.data_dir)
    row = run(by_name[args.contender], train_set, test_set, epochs=args.epochs, device=device, data_root=data_root,
              seed=args.seed)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
