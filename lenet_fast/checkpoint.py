"""Checkpoints and result files: written atomically, read with weights_only=True.

A checkpoint is a plain dict of tensors and Python primitives, so
`torch.load(path, weights_only=True)` reads it and a checkpoint file can never
execute code.  Files are written to a temporary name in the same folder, synced,
then renamed over the target: an interrupted save leaves the old file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

FORMAT = "lenet_fast.checkpoint/1"


class CheckpointError(Exception):
    """The file is not a usable lenet_fast checkpoint; the message says why."""


def _write_atomic(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> None:
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
    _write_atomic(path, lambda f: torch.save({"format": FORMAT, **state}, f), "wb")


def write_json(obj: Any, path: str | os.PathLike) -> None:
    _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), "w")


def load(path: str | os.PathLike) -> dict:
    """Read a checkpoint safely (weights_only=True), with clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors, truncated zip archives, foreign objects
        raise CheckpointError(f"{path} is not a readable lenet_fast checkpoint: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"{path} is not a lenet_fast checkpoint (expected format {FORMAT!r})")
    return state


def load_model(path: str | os.PathLike, *, backend: str = "auto", device: torch.device | str = "cpu"):
    """(LeNet with the checkpoint's weights on `device`, the checkpoint dict)."""
    from .model import LeNet

    state = load(path)
    model = LeNet(backend=backend)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path} holds weights that do not fit the LeNet: {exc}") from None
    return model.to(device).eval(), state
