"""Checkpoints, result files and run folders: written atomically, read with weights_only=True.

A checkpoint is a plain dict of tensors and Python primitives, so
`torch.load(path, weights_only=True)` reads it and a checkpoint file can never
execute code.  Its schema is checked here, once, when it is read (`load`): a file
that loads but does not hold what the tools need is refused with one message
naming the first problem, instead of failing later inside training.

Files are written to a unique temporary name in the same folder, synced, then
renamed over the target: an interrupted save leaves the old file intact.  A
training run holds its output folder (`RunFolder`) so that two trainers never
write into the same one.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import backends
from .data import DATASETS

try:
    import fcntl
except ImportError:  # not POSIX: run folders are not locked
    fcntl = None

FORMAT = "lenet_fast.checkpoint/1"
DEVICES = ("auto", "cpu", "cuda")
# Optimizer name -> the per-parameter state its state_dict holds.
OPTIMIZER_STATE = {"sgd": {"momentum_buffer"}, "adam": {"step", "exp_avg", "exp_avg_sq"}}
SEED_LIMIT = 2**32
# Per-epoch entries of a run's history (checkpoint and metrics.json).
HISTORY_FIELDS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds", "images_per_second")
# The files a training run writes into its folder, and the lock that marks the folder as in use.
RUN_FILES = ("checkpoint.pt", "metrics.json", "curves.png")
LOCK_NAME = ".lock"


class CheckpointError(Exception):
    """The file is not a usable lenet_fast checkpoint; the message says why."""


class OutputError(Exception):
    """An output file or folder cannot be written; the message says why."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


# What a run's config may hold: (check, what it must be).  The command line (lenet_fast.cli's
# option types) and a checkpoint's stored config are checked against these same rules.
CONFIG_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dataset": (lambda v: v in DATASETS, f"one of {', '.join(sorted(DATASETS))}"),
    "epochs": (_positive_int, "a positive integer"),
    "batch_size": (_positive_int, "a positive integer"),
    "lr": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "optimizer": (lambda v: v in OPTIMIZER_STATE, " or ".join(OPTIMIZER_STATE)),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "seed": (lambda v: _is_int(v) and 0 <= v < SEED_LIMIT, f"an integer from 0 to {SEED_LIMIT - 1}"),
    "limit_train": (lambda v: v is None or _positive_int(v), "a positive integer"),
    "limit_test": (lambda v: v is None or _positive_int(v), "a positive integer"),
    "device": (lambda v: v in DEVICES, ", ".join(DEVICES)),
    "backend": (lambda v: v in backends.backend_names(), ", ".join(backends.backend_names())),
    "cuda_graph": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "no_download": (lambda v: isinstance(v, bool), "true or false"),
}
# What a checkpoint must hold for training to continue from it.
RESUME_CONFIG_KEYS = ("dataset", "epochs", "batch_size", "lr", "optimizer", "seed", "weight_decay")


# ---------------------------------------------------------------------------- writing


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> None:
    """Write `path` through write(file): to a unique temporary name beside it, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results unreadable to others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(state: dict, path: str | os.PathLike) -> None:
    write_atomic(path, lambda f: torch.save({"format": FORMAT, **state}, f), "wb")


def strict_json_value(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, inf) replaced by None: strict JSON has no NaN,
    and parsers other than Python's (JavaScript's JSON.parse among them) reject it."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json_value(v) for v in obj]
    return obj


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write strict JSON (non-finite numbers as null)."""
    text = json.dumps(strict_json_value(obj), indent=2, allow_nan=False) + "\n"
    write_atomic(path, lambda f: f.write(text), "w")


def write_figure(figure, path: str | os.PathLike, **savefig_kwargs) -> None:
    """Save a matplotlib figure atomically, in the format its file name's extension names."""
    fmt = Path(path).suffix.lstrip(".").lower()
    write_atomic(path, lambda f: figure.savefig(f, format=fmt, **savefig_kwargs), "wb")


def _check_not_under_a_file(path: Path, option: str) -> Path:
    """The nearest existing folder above `path`; an error if that is a file."""
    existing = next(p for p in path.parents if p.exists())  # the last parent, "." or "/", exists
    if not existing.is_dir():
        raise OutputError(f"{option} {path} is under {existing}, which is a file, not a folder")
    return existing


def make_folder(path: Path, option: str) -> list[Path]:
    """Create `path` (parents too) for output; returns the folders created, deepest first."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file, not a folder")
    _check_not_under_a_file(path, option)
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{option} {path}: cannot create this folder ({exc.strerror or exc})") from None
    return created


def check_output_file(path: Path, option: str) -> None:
    """Fail now, not after the work, if `path` cannot be written; creates nothing (a
    temporary file in the nearest existing folder shows that writing works)."""
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; name a file")
    existing = _check_not_under_a_file(path, option)
    try:
        with tempfile.TemporaryFile(prefix=f".{path.name}.", suffix=".tmp", dir=existing):
            pass
    except OSError as exc:
        raise OutputError(f"{option} {path}: cannot write in {existing} ({exc.strerror or exc})") from None


class RunFolder:
    """The output folder of one training run, held while the run lasts.

    Entering creates the folder (parents too), checks that the run's files can be
    written there, locks it so that a second trainer on the same folder stops at once
    (saying who holds it) instead of racing this one, and removes temporary files a
    killed run left behind (none can be in use: this process holds the lock).  Leaving
    releases the lock; a folder this run created and left empty is removed again.
    """

    def __init__(self, path: str | os.PathLike, option: str = "--out") -> None:
        self.path, self.option = Path(path), option
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> Path:
        path = self.path
        self._created = make_folder(path, self.option)
        try:
            for name in RUN_FILES:
                if (path / name).exists() and not (path / name).is_file():
                    raise OutputError(f"{self.option} {path}: {path / name} is not a file, so the run cannot write it")
            try:
                self._fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise OutputError(f"{self.option} {path}: cannot write in this folder ({exc.strerror or exc})") from None
            self._lock()
            for name in RUN_FILES:
                for stale in path.glob(f".{name}.*.tmp"):
                    stale.unlink(missing_ok=True)
            (path / ".curves.png.tmp.png").unlink(missing_ok=True)  # the fixed name older versions used
        except BaseException:
            self._release()
            raise
        return path

    def _lock(self) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise OutputError(f"{self.option} {self.path} is in use by {holder}; wait for it to finish "
                              f"or choose another {self.option}") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"lenet_fast.train (pid {os.getpid()} on {socket.gethostname()})\n".encode(), 0)

    def _release(self) -> None:
        if self._fd is not None:
            if self._created and not any(p.name != LOCK_NAME for p in self.path.iterdir()):
                (self.path / LOCK_NAME).unlink(missing_ok=True)  # before unlocking: the lock guards it
            os.close(self._fd)
            self._fd = None
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote into it (or someone else did)
                break

    def __exit__(self, *exc) -> None:
        self._release()


# ---------------------------------------------------------------------------- reading


class _Invalid(Exception):
    pass


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise _Invalid(problem)


def lenet_shapes() -> dict[str, tuple[int, ...]]:
    """The LeNet's state_dict: parameter name -> shape (built on the meta device: no memory, no RNG)."""
    from .model import TorchLeNet

    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in TorchLeNet().state_dict().items()}


def _names(keys) -> str:
    keys = list(keys)
    return ", ".join(map(str, keys[:4])) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def _check_tensor(value: Any, shape: tuple[int, ...], what: str) -> None:
    _require(isinstance(value, torch.Tensor) and value.is_floating_point(),
             f"{what} is {type(value).__name__}, expected a floating-point tensor")
    _require(tuple(value.shape) == shape, f"{what} has shape {tuple(value.shape)}, expected {shape}")
    _require(bool(torch.isfinite(value).all()), f"{what} holds non-finite values")


def _check_model(model: Any, shapes: dict[str, tuple[int, ...]]) -> None:
    _require(isinstance(model, dict), f"its model is a {type(model).__name__}, expected a state_dict (a dict of tensors)")
    missing, unexpected = [k for k in shapes if k not in model], [k for k in model if k not in shapes]
    _require(not missing and not unexpected,
             "its model is not this LeNet (" + "; ".join(
                 ([f"missing {_names(missing)}"] if missing else []) + ([f"unexpected {_names(unexpected)}"] if unexpected else [])
             ) + ")")
    for name, shape in shapes.items():
        _check_tensor(model[name], shape, f"model {name}")


def _check_config(config: Any, resumable: bool) -> None:
    _require(isinstance(config, dict), f"its config (the run's options) is {type(config).__name__}, expected a dict")
    for key, (check, what) in CONFIG_RULES.items():
        if key in config:
            _require(check(config[key]), f"config {key} is {config[key]!r}, expected {what}")
        elif resumable and key in RESUME_CONFIG_KEYS:
            _require(False, f"its config has no {key}")


def _check_optimizer(optimizer: Any, config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    from .optim import make_optimizer

    _require(isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
             and isinstance(optimizer.get("param_groups"), list), "its optimizer entry is not an optimizer state_dict")
    groups, state = optimizer["param_groups"], optimizer["state"]
    _require(len(groups) == 1 and isinstance(groups[0], dict) and groups[0].get("params") == list(range(len(shapes))),
             f"its optimizer does not hold one parameter group of the LeNet's {len(shapes)} parameters")
    # The group's hyperparameters are restored with it: they must be those this run's optimizer
    # has (the learning rate and `capturable` are the run's own: it sets them itself).
    fresh = make_optimizer([torch.zeros(1, requires_grad=True)], config["optimizer"], 0.1,
                           config["weight_decay"]).param_groups[0]
    for key, value in groups[0].items():
        if key in fresh and key not in ("params", "lr", "capturable"):
            mine = fresh[key]
            same = tuple(value) == tuple(mine) if isinstance(mine, (tuple, list)) and isinstance(value, (tuple, list)) \
                else value == mine and type(value) is type(mine)
            _require(same, f"its optimizer's {key} is {value!r}; a {config['optimizer']} run with config "
                           f"weight_decay {config['weight_decay']} has {mine!r}")
    expected = OPTIMIZER_STATE[config["optimizer"]]
    for index, entry in state.items():
        _require(_is_int(index) and 0 <= index < len(shapes), f"its optimizer state has an entry for parameter {index!r}")
        name, shape = list(shapes.items())[index]
        _require(isinstance(entry, dict) and set(entry) == expected,
                 f"its optimizer state for {name} is not {config['optimizer']}'s ({', '.join(sorted(expected))})")
        for key, value in entry.items():
            _check_tensor(value, () if key == "step" else shape, f"optimizer {key} of {name}")


def _check_training_state(state: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    config = state["config"]
    epochs, epoch, step, partial = config["epochs"], state.get("epoch"), state.get("step"), state.get("partial")
    _require(_is_int(epoch) and 0 <= epoch <= epochs, f"its epoch is {epoch!r}, expected 0 to {epochs}")
    _require(_is_int(step) and step >= 0, f"its step is {step!r}, expected an integer >= 0")
    if partial is None:
        _require(step == 0, f"its step is {step} but it holds no partial epoch")
    else:
        _require(isinstance(partial, dict) and step > 0 and epoch < epochs
                 and _is_number(partial.get("loss_sum")) and _is_number(partial.get("seconds"))
                 and _is_int(partial.get("correct")) and _positive_int(partial.get("seen"))
                 and 0 <= partial["correct"] <= partial["seen"],
                 "its partial epoch is not {loss_sum, correct, seen, seconds} of a started epoch")
    history = state.get("history")
    _require(isinstance(history, list) and len(history) == epoch,
             f"its history does not list the {epoch} epochs trained")
    for entry in history:
        _require(isinstance(entry, dict) and all(_is_number(entry.get(k)) for k in HISTORY_FIELDS),
                 f"its history entries are not dicts of numbers ({', '.join(HISTORY_FIELDS)})")
    rng = state.get("rng_cpu")
    _require(isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape,
             "its rng_cpu is not a CPU random-generator state")
    _check_optimizer(state.get("optimizer"), config, shapes)


def validate(state: Any, *, resumable: bool = False) -> None:
    """Raise _Invalid naming the first way `state` is not a checkpoint the tools can use:
    weights and config for evaluating and predicting; with `resumable`, everything
    training needs to continue (position, history, RNG, optimizer state)."""
    _require(isinstance(state, dict) and state.get("format") == FORMAT, f"expected format {FORMAT!r}")
    _require(state.get("backend") is None or state["backend"] in backends.backend_names(),
             f"its backend is {state.get('backend')!r}, expected one of {', '.join(backends.backend_names())}")
    shapes = lenet_shapes()
    _check_model(state.get("model"), shapes)
    _check_config(state.get("config"), resumable)
    if resumable:
        _check_training_state(state, shapes)


def load(path: str | os.PathLike, *, resumable: bool = False) -> dict:
    """Read a checkpoint safely (weights_only=True) and check its schema (see `validate`);
    every problem is a CheckpointError with one message."""
    path = Path(path)
    if str(path) == "":
        raise CheckpointError("the checkpoint path is empty")
    if path.is_dir():
        inside = path / "checkpoint.pt"
        hint = f"; did you mean {inside}?" if inside.is_file() else ""
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors, truncated zip archives, foreign objects
        raise CheckpointError(f"{path} is not a readable lenet_fast checkpoint: {type(exc).__name__}: {exc}") from None
    try:
        validate(state, resumable=resumable)
    except _Invalid as exc:
        raise CheckpointError(f"{path} is not a usable lenet_fast checkpoint: {exc}") from None
    return state


def check_resume_position(state: dict, steps_per_epoch: int) -> None:
    """The checkpoint's step must lie inside an epoch of the data this run loaded."""
    if state["partial"] is not None and state["step"] >= steps_per_epoch:
        raise CheckpointError(f"the checkpoint stopped at step {state['step']} of an epoch, but an epoch of this "
                              f"data has {steps_per_epoch} steps")


def load_model(path: str | os.PathLike, *, backend: str = "auto", device: torch.device | str = "cpu"):
    """(LeNet with the checkpoint's weights on `device`, the checkpoint dict)."""
    from .model import LeNet

    state = load(path)
    model = LeNet(backend=backend)
    model.load_state_dict(state["model"])  # load() checked every name and shape
    return model.to(device).eval(), state
