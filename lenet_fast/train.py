"""Train the seed's LeNet: `python -m lenet_fast.train [--device cuda] [--backend triton] ...`

Writes into --out: checkpoint.pt (after every epoch, and on Ctrl-C), metrics.json
and curves.png.  `--resume OUT/checkpoint.pt` continues a run, mid-epoch included,
and gives the same result as the uninterrupted run (same seed, same backend).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint, cli, data
from .model import LeNet
from .optim import make_optimizer
from .training import TrainingStep, epoch_batch_sizes, learning_rate, lr_holder

PROG = "lenet_fast.train"

# The defaults reach >= 99.0% MNIST test accuracy (see README for the measured runs).
DEFAULTS = {
    "dataset": "mnist",
    "epochs": 8,
    "batch_size": 64,
    "lr": None,  # per optimizer, below
    "optimizer": "sgd",
    "seed": 0,
    "limit_train": None,
    "limit_test": None,
    "weight_decay": 5e-4,
    "device": "auto",
    "backend": "auto",
    "cuda_graph": None,  # on for CUDA, off on the CPU (resolve_cuda_graph)
}
DEFAULT_LR = {"sgd": 0.05, "adam": 2e-3}
# Hyperparameters that a resumed run must keep, or it would not be the same run.  The epochs
# are among them: the learning rate is cosine-annealed over the run's steps, so another
# count would restart the schedule somewhere else.
FIXED_ON_RESUME = ("dataset", "epochs", "batch_size", "lr", "optimizer", "seed", "limit_train", "weight_decay")
# What the options that may change on resume are called on the command line, to say so.
RESUME_FLAGS = {"device": "--device", "backend": "--backend", "cuda_graph": "--no-cuda-graph"}


class TrainingDiverged(Exception):
    """The training loss became NaN or infinite; the message says where and what was kept."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Train the seed's LeNet on MNIST-format data.")
    cli.add_runtime_options(p, default_device=None, default_backend=None)
    cli.add_data_options(p)
    p.add_argument("--epochs", type=cli.config_value("epochs", int), default=None,
                   help=f"(default {DEFAULTS['epochs']}); a resumed run keeps its checkpoint's (the cosine "
                        f"learning-rate schedule spans them): another count is refused, start a new run instead")
    p.add_argument("--batch-size", type=cli.config_value("batch_size", int), default=None,
                   help=f"(default {DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=cli.config_value("lr", float), default=None,
                   help=f"peak learning rate, cosine-annealed to 0 (default sgd {DEFAULT_LR['sgd']}, adam {DEFAULT_LR['adam']})")
    p.add_argument("--optimizer", choices=sorted(checkpoint.OPTIMIZER_STATE), default=None,
                   help="(default sgd, Nesterov momentum 0.9); both fused")
    p.add_argument("--weight-decay", type=cli.config_value("weight_decay", float), default=None,
                   help=f"L2 penalty, >= 0 (default {DEFAULTS['weight_decay']})")
    p.add_argument("--seed", type=cli.config_value("seed", int), default=None,
                   help=f"0 to {checkpoint.SEED_LIMIT - 1} (default {DEFAULTS['seed']})")
    p.add_argument("--limit-train", type=cli.config_value("limit_train", int), default=None,
                   help="use only the first N training images")
    p.add_argument("--limit-test", type=cli.config_value("limit_test", int), default=None,
                   help="evaluate on the first N test images only (quick runs; the reported accuracy is then partial)")
    p.add_argument("--out", type=cli.path_value, default=None,
                   help="output folder (default runs/<dataset>-<date>-<time>; when resuming, the checkpoint's folder)")
    p.add_argument("--resume", type=cli.path_value, default=None, metavar="CHECKPOINT",
                   help="continue from this checkpoint, writing beside it unless --out is given; options not "
                        "given come from it (a changed --device, --backend or --cuda-graph is announced, changed "
                        "hyperparameters are refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (summary lines only)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the training step (forward, backward, optimizer step) as CUDA graphs, one per "
                        "batch size of the epoch; on by default on CUDA (--cuda-graph only says so), "
                        "--no-cuda-graph runs every step eagerly")
    return p


def _as_option(key: str, value) -> str:
    """A config entry as the command line spells it."""
    if key == "cuda_graph":
        return {None: "no --cuda-graph option", True: "--cuda-graph", False: "--no-cuda-graph"}[value]
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {value}"


def make_config(args: argparse.Namespace, resumed: dict | None) -> dict:
    """Options -> the run's config.

    A resumed run takes every option not given from its checkpoint and keeps its
    hyperparameters (FIXED_ON_RESUME); another --device, --backend or --cuda-graph is
    allowed and said on stderr.  Paths are never read from a checkpoint: a resumed run
    writes beside its checkpoint or to --out, and reads data from --data-dir or the default.
    """
    given = {k: v for k, v in vars(args).items() if v is not None}
    resume_path = given.pop("resume", None)
    config = dict(DEFAULTS)
    if resumed is not None:
        stored = {k: v for k, v in resumed["config"].items() if k in checkpoint.CONFIG_RULES}
        config.update(stored)
        for key, value in given.items():
            if key not in stored or value == stored[key]:
                continue
            if key in FIXED_ON_RESUME:
                why = (f" (its learning rate is cosine-annealed over its {stored[key]} epochs: for {value}, start a new run)"
                       if key == "epochs" else "")
                raise cli.UsageError(f"{_as_option(key, value)} differs from the checkpoint's {stored[key]}; "
                                     f"a resumed run keeps its hyperparameters{why}")
            print(f"{PROG}: resuming with {_as_option(key, value)}; the checkpoint's run had "
                  f"{_as_option(key, stored[key])}", file=sys.stderr)
    config.update(given)
    if config["lr"] is None:
        config["lr"] = DEFAULT_LR[config["optimizer"]]
    if config.get("out") is None:
        config["out"] = str(Path(resume_path).parent if resume_path
                            else Path("runs") / f"{config['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}")
    config["no_download"] = bool(config.get("no_download"))
    return config


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: data.DeviceData, batch_size: int = 1000) -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, predictions) of `model` on `split`."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=split.labels.device)
    predictions = []
    for x, y in split.batches(batch_size):
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        predictions.append(logits.argmax(1))
    predictions = torch.cat(predictions) if predictions else split.labels.new_empty(0)
    n = max(len(split), 1)
    accuracy = (predictions == split.labels).sum().item() / n
    return loss_sum.item() / n, accuracy, predictions


class StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step (the model is then in
    a consistent state for a resumable checkpoint); a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "o-"), ("test", "s--")):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], style, label=split)
        ax_acc.plot(epochs, [100 * h[f"{split}_accuracy"] for h in history], style, label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    checkpoint.write_figure(fig, path, dpi=110)
    plt.close(fig)


def resolve_cuda_graph(option: bool | None, device: torch.device) -> bool:
    """--cuda-graph / --no-cuda-graph / neither (None) -> whether steps replay CUDA graphs.

    On by default on CUDA, where an eager step of this net is bound by the host that
    launches its kernels; off on the CPU, where there are no graphs."""
    if option is None:
        return device.type == "cuda"
    if option and device.type != "cuda":
        raise cli.UsageError("--cuda-graph needs a CUDA device (--device cuda); on the CPU every step runs eagerly")
    return option


def resolve_runtime(config: dict, resumed: dict | None = None) -> tuple[torch.device, str, bool]:
    """(device, backend, whether steps replay CUDA graphs) for the config, "auto" resolved.

    An option a resumed run took from its checkpoint that cannot run here says so."""
    key = "device"
    try:
        device = cli.resolve_device(config["device"])
        key = "backend"
        backend = cli.resolve_backend(config["backend"], device)
        key = "cuda_graph"
        return device, backend, resolve_cuda_graph(config.get("cuda_graph"), device)
    except cli.UsageError as exc:
        if resumed is not None and resumed["config"].get(key) == config.get(key):
            raise cli.UsageError(f"{exc}; the resumed run took {_as_option(key, config.get(key))} from its "
                                 f"checkpoint: give {RESUME_FLAGS[key]} to resume otherwise") from None
        raise


def train(config: dict, resumed: dict | None = None) -> dict:
    """Run (or continue) training as configured; returns the metrics dict.

    Everything that can be checked is checked before any training: options, device,
    backend, output folder (created, writable, not used by another trainer), data."""
    cli.configure_determinism()
    device, backend, cuda_graph = resolve_runtime(config, resumed)
    if resumed is not None and config["backend"] == resumed["config"].get("backend"):
        trained_with = resumed.get("backend")
        if trained_with is not None and trained_with != backend:  # "auto" picks per machine
            print(f"{PROG}: backend {config['backend']} is {backend} here; the checkpoint was trained with "
                  f"{trained_with}", file=sys.stderr)
    with checkpoint.RunFolder(config["out"]) as out:
        return _train(config, resumed, device, backend, cuda_graph, out)


def _train(config: dict, resumed: dict | None, device: torch.device, backend: str, cuda_graph: bool, out: Path) -> dict:
    data_dir = config.get("data_dir") or data.default_data_dir()
    train_set, test_set = data.load(config["dataset"], data_dir, device=device,
                                    download=not config["no_download"], limit_train=config["limit_train"],
                                    limit_test=config.get("limit_test"))
    batch_size, epochs = config["batch_size"], config["epochs"]
    steps_per_epoch = train_set.num_batches(batch_size)
    if resumed is not None:
        checkpoint.check_resume_position(resumed, steps_per_epoch)

    torch.manual_seed(config["seed"])
    model = LeNet(backend=backend).to(device)
    optimizer = make_optimizer(model.parameters(), config["optimizer"], lr_holder(config["lr"], device, cuda_graph),
                               config["weight_decay"])
    history, start_epoch, start_step, partial = [], 0, 0, None
    if resumed is not None:
        # How the step runs, not what it computes, comes from this run, not the checkpoint:
        # the schedule sets lr every step (a graph reads this very tensor), and a graph
        # needs a capturable Adam.
        kept = [{k: group[k] for k in ("lr", "capturable") if k in group} for group in optimizer.param_groups]
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        for group, own in zip(optimizer.param_groups, kept):
            group.update(own)
        history = list(resumed["history"])
        start_epoch, start_step, partial = resumed["epoch"], resumed["step"], resumed["partial"]
        torch.set_rng_state(resumed["rng_cpu"])

    metrics = {
        "config": config,
        "versions": cli.versions(),
        "device_name": cli.device_name(device),
        "backend": backend,
        "cuda_graph": cuda_graph,
        "train_size": len(train_set),
        "test_size": len(test_set),
        "test_accuracy": history[-1]["test_accuracy"] if history else None,
        "epochs": history,
    }
    trainer = TrainingStep(model, optimizer, cuda_graph=cuda_graph,
                           batch_sizes=epoch_batch_sizes(len(train_set), batch_size))

    total_steps = steps_per_epoch * epochs
    print(f"{PROG}: {config['dataset']} ({len(train_set)} train / {len(test_set)} test) on {device} "
          f"[{metrics['device_name']}], backend {backend}{' + CUDA graphs' if cuda_graph else ''}, {epochs} epochs of {steps_per_epoch} steps -> {out}",
          flush=True)

    def save_checkpoint(epoch: int, step: int, part: dict | None) -> None:
        checkpoint.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config,
            "backend": backend, "epoch": epoch, "step": step, "partial": part, "history": history,
            "rng_cpu": torch.get_rng_state(),
        }, out / "checkpoint.pt")

    def diverged(epoch: int, step: int, what: str, value: float) -> TrainingDiverged:
        """Record where the run diverged in metrics.json; the checkpoint on disk (if any) is the
        last one saved with finite numbers, and stays."""
        metrics["diverged"] = {"epoch": epoch + 1, "step": step, what: value}
        checkpoint.write_json(metrics, out / "metrics.json")
        kept = out / "checkpoint.pt"
        kept = f"the last good checkpoint, {kept}, is kept" if kept.exists() else "no checkpoint was saved"
        return TrainingDiverged(f"the {what.replace('_', ' ')} became {value} in epoch {epoch + 1} (by step {step}); "
                                f"the learning rate ({config['lr']}) is probably too high. Training stopped; {kept}")

    from tqdm import tqdm

    with StopRequest() as stop:
        for epoch in range(start_epoch, epochs):
            model.train()
            part = partial or {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
            partial = None
            loss_sum = torch.tensor(part["loss_sum"], dtype=torch.float64, device=device)
            correct = torch.tensor(part["correct"], dtype=torch.int64, device=device)
            seen = part["seen"]
            order = data.shuffle_order(len(train_set), config["seed"], epoch)
            bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{epochs}",
                       disable=config.get("no_progress", False), leave=False, dynamic_ncols=True)
            started = time.perf_counter()
            step = start_step
            for x, y in train_set.batches(batch_size, order=order, start=start_step):
                trainer.set_lr(learning_rate(config["lr"], epoch * steps_per_epoch + step, total_steps))
                step += 1
                loss, batch_correct = trainer.step(x, y)
                loss_sum += loss.double() * y.shape[0]
                correct += batch_correct
                seen += y.shape[0]
                bar.update(1)
                # The loss is checked where the loop reads it back anyway (here and at the end of
                # the epoch): a check per step would wait for the device at every step.
                if not bar.disable and (step % 50 == 0 or step == steps_per_epoch):
                    running_loss = loss_sum.item() / seen
                    if not math.isfinite(running_loss):
                        break
                    bar.set_postfix(loss=f"{running_loss:.4f}", acc=f"{100 * correct.item() / seen:.2f}%")
                if stop.requested and step < steps_per_epoch:
                    break
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = part["seconds"] + time.perf_counter() - started
            bar.close()
            train_loss = loss_sum.item() / seen
            if not math.isfinite(train_loss):
                raise diverged(epoch, step, "train_loss", train_loss)
            if stop.requested and step < steps_per_epoch:
                save_checkpoint(epoch, step, {"loss_sum": loss_sum.item(), "correct": int(correct.item()),
                                              "seen": seen, "seconds": seconds})
                print(f"{PROG}: interrupted at epoch {epoch + 1}, step {step}/{steps_per_epoch}; "
                      f"resume with: python -m {PROG} --resume {out / 'checkpoint.pt'}", file=sys.stderr)
                raise KeyboardInterrupt
            start_step = 0
            test_loss, test_accuracy, _ = evaluate(model, test_set)
            if not math.isfinite(test_loss):  # the last step's update can break the weights
                raise diverged(epoch, step, "test_loss", test_loss)
            history.append({
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "train_accuracy": correct.item() / seen,
                "test_loss": test_loss,
                "test_accuracy": test_accuracy,
                "seconds": seconds,
                "images_per_second": seen / seconds,
            })
            metrics["test_accuracy"] = test_accuracy
            save_checkpoint(epoch + 1, 0, None)
            checkpoint.write_json(metrics, out / "metrics.json")
            plot_curves(history, out / "curves.png")
            h = history[-1]
            print(f"epoch {h['epoch']}/{epochs}  train loss {h['train_loss']:.4f} acc {100 * h['train_accuracy']:.2f}%  "
                  f"test loss {h['test_loss']:.4f} acc {100 * h['test_accuracy']:.2f}%  "
                  f"{h['seconds']:.2f} s  {h['images_per_second']:,.0f} img/s", flush=True)
            if stop.requested:
                print(f"{PROG}: interrupted after epoch {epoch + 1}; resume with: "
                      f"python -m {PROG} --resume {out / 'checkpoint.pt'}", file=sys.stderr)
                raise KeyboardInterrupt
    checkpoint.write_json(metrics, out / "metrics.json")
    if history:
        plot_curves(history, out / "curves.png")
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        resumed = checkpoint.load(args.resume, resumable=True) if args.resume else None
        config = make_config(args, resumed)
        metrics = train(config, resumed)
    except (*cli.ERRORS, TrainingDiverged) as exc:
        cli.fail(PROG, str(exc))
    except KeyboardInterrupt:
        return 130
    accuracy = metrics["test_accuracy"]
    print(f"{PROG}: final test accuracy {100 * accuracy:.2f}%" if accuracy is not None else f"{PROG}: nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
