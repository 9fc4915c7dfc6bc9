"""What the command-line tools (train, evaluate, predict) share: options, device and
backend resolution, machine description, and the one-line exit-2 error."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import torch

from . import __version__, backends, checkpoint, data
from .data import DATASETS


class UsageError(Exception):
    """A problem the user can fix (bad option, missing GPU, missing data): exit 2, no traceback."""


# The problems the tools report as one line and exit 2.
ERRORS = (UsageError, data.DatasetError, checkpoint.CheckpointError, checkpoint.OutputError)


def fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def config_value(key: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type for the config entry `key`: `parse` the text, then check it against the
    rule a checkpoint's stored config is checked against (checkpoint.CONFIG_RULES)."""
    check, what = checkpoint.CONFIG_RULES[key]

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not check(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return convert


def path_value(text: str) -> str:
    """An argparse type for paths: an empty one would silently mean the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def add_runtime_options(parser: argparse.ArgumentParser, *, default_device: str | None = "auto",
                        default_backend: str | None = "auto") -> None:
    """--device and --backend; a default of None means "not given" (lenet_fast.train then takes
    them from a checkpoint it resumes, else auto)."""
    parser.add_argument("--device", choices=checkpoint.DEVICES, default=default_device,
                        help=f"where to run (auto: cuda when available, else cpu; default {default_device or 'auto'})")
    parser.add_argument("--backend", choices=backends.backend_names(), default=default_backend,
                        help="op implementation (auto: the best one available for the device; "
                             f"default {default_backend or 'auto'})")


def add_data_options(parser: argparse.ArgumentParser, *, with_dataset=True) -> None:
    if with_dataset:
        parser.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                            help="MNIST-format dataset (default: mnist)")
    parser.add_argument("--data-dir", type=path_value, default=None,
                        help="torchvision data root (default: $LENET_FAST_DATA, else ~/.cache/lenet_fast)")
    parser.add_argument("--no-download", action="store_true", default=None,
                        help="never download; fail with instructions when the files are missing")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    return torch.device(name)


def resolve_backend(name: str, device: torch.device) -> str:
    try:
        return backends.resolve(name, device, torch.float32)
    except backends.BackendUnavailableError as exc:
        raise UsageError(f"--backend {name}: {exc}") from None


def load_checkpoint_model(args: argparse.Namespace):
    """(model, checkpoint dict, device, backend) for the --checkpoint/--device/--backend options."""
    device = resolve_device(args.device)
    backend = resolve_backend(args.backend, device)
    model, state = checkpoint.load_model(args.checkpoint, backend=backend, device=device)
    return model, state, device, backend


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # The instruction set ATen's CPU kernels dispatch to: stock PyTorch's speed depends on it,
    # and one machine kind can come with or without AVX-512.
    return f"{model}, {torch.backends.cpu.get_cpu_capability()} ({torch.get_num_threads()} threads)"


def versions() -> dict[str, str | None]:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "lenet_fast": __version__,
        "torch": torch.__version__,
        "triton": version("triton"),
        "torchvision": version("torchvision"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }


def configure_determinism() -> None:
    """Same seed, same backend, same result: stock cuDNN must not pick algorithms by timing."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
