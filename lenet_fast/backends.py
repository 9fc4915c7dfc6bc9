"""The backends: which implementation of the fused ops runs, as classes a reader can follow.

    Backend              the interface: run(op, *args), backward(loss), count_correct(...),
                         train_step(model, optimizer, x, y)
    ├─ TorchBackend      stock torch.nn.functional: each op's `reference` (lenet_fast.ops)
    └─ KernelBackend     the ops registered as lenet_fast::<prefix>_<name> (and _backward)
       ├─ TritonBackend  Triton kernels (kernels/<name>.py), registered by lenet_fast.triton_backend
       └─ ExtBackend     the C++/CUDA extension (csrc/<name>.cpp), registered by lenet_fast.ext_backend

Every op is one `lenet_fast.ops.OpDef`: a backend runs any op of `lenet_fast.ops.OPS`
with `run(op, *args)` on arguments that `lenet_fast.ops` already validated (ranks,
shapes, devices, dtypes), and returns the op's public outputs.  Gradients flow
through (autograd).

`resolve` / `implementation` turn a name ("auto", "torch", "triton", "ext") into a
backend for a device and dtype; "auto" takes the first usable one of `AUTO_ORDER`.
A backend of your own: subclass `Backend`, then `register_backend(YourBackend())`.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

import torch

if TYPE_CHECKING:
    from .ops import OpDef


class BackendUnavailableError(RuntimeError):
    """The requested backend exists but cannot run here (the message says why)."""


def count_correct(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(logits.argmax(1) == target).sum(), on the device: torch's count of correct predictions."""
    return (logits.argmax(1) == target).sum()  # argmax records no graph


def _cuda_reason(device_type: str) -> str | None:
    if device_type == "cuda" and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no NVIDIA GPU or driver)"
    return None


class Backend:
    """An implementation of every op of lenet_fast.ops.OPS, and the training-step helpers."""

    name: ClassVar[str]
    description: ClassVar[str]
    device_types: ClassVar[tuple[str, ...]] = ("cpu", "cuda")   # where it can run, in principle
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32,)  # what its kernels take

    def load(self) -> None:
        """Import what the backend needs; raise ImportError / BackendUnavailableError with the reason."""

    def device_reason(self, device_type: str) -> str | None:
        """None when `device_type` can be used now, else why not."""
        return _cuda_reason(device_type)

    def run(self, op: OpDef, *args: Any) -> Any:
        """The public outputs of `op` on validated arguments (see lenet_fast.ops)."""
        raise NotImplementedError

    # -- the training step: torch's own helpers unless a backend has faster ones ----------
    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def count_correct(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return count_correct(logits, target)

    def train_step(self, model, optimizer, x: torch.Tensor, y: torch.Tensor):
        """A whole training step in fewer launches, as (loss, correct), or None when this
        backend has none for these arguments (then nothing was done and the caller runs
        the step op by op)."""
        return None


class TorchBackend(Backend):
    name = "torch"
    description = "stock torch.nn.functional (the reference)"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def run(self, op: OpDef, *args: Any) -> Any:
        return op.reference(*args)


class KernelBackend(Backend):
    """A backend whose ops are the custom ops lenet_fast::<prefix>_<name>, registered by
    importing `module`, with the backward contract of lenet_fast.ops."""

    prefix: ClassVar[str]
    module: ClassVar[str]

    def load(self) -> None:
        from .ops import OPS

        importlib.import_module(self.module)  # registers the ops
        names = {op.name: f"{self.prefix}_{op.name}" for op in OPS}
        missing = [name for name in names.values() if not hasattr(torch.ops.lenet_fast, name)]
        if missing:
            raise BackendUnavailableError(f"{self.module} does not register {', '.join(missing)}")
        self._ops = {op: getattr(torch.ops.lenet_fast, name).default for op, name in names.items()}

    def run(self, op: OpDef, *args: Any) -> Any:
        return op.public(self._ops[op.name](*args))


class TritonBackend(KernelBackend):
    name = "triton"
    description = "fused Triton kernels (kernels/), registered with torch.library.triton_op"
    prefix, module = "triton", "lenet_fast.triton_backend"

    def train_step(self, model, optimizer, x: torch.Tensor, y: torch.Tensor):
        from .fused_step import triton_sgd_step

        return triton_sgd_step(model, optimizer, x, y)  # four launches (kernels/lenet_step.py)

    def device_reason(self, device_type: str) -> str | None:
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (slow; for testing)"
        return _cuda_reason(device_type)


class ExtBackend(KernelBackend):
    name = "ext"
    description = "C++/CUDA extension lenet_fast._C (csrc/): multi-threaded CPU kernels and CUDA kernels"
    dtypes = (torch.float32, torch.float64)
    prefix, module = "ext", "lenet_fast.ext_backend"

    def load(self) -> None:
        super().load()
        ext = torch.ops.lenet_fast
        self._backward, self._count_correct = ext.run_backward.default, ext.ext_count_correct.default
        self._has_cuda = importlib.import_module(self.module).HAS_CUDA_KERNELS

    def device_reason(self, device_type: str) -> str | None:
        why = _cuda_reason(device_type)
        if why is None and device_type == "cuda" and not self._has_cuda:
            why = "the extension was built without CUDA kernels (no CUDA toolkit at build time)"
        return why

    def backward(self, loss: torch.Tensor) -> None:
        self._backward(loss)  # the same engine run, started from C++ without torch.autograd.backward's Python

    def count_correct(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._count_correct(logits, target)  # one op instead of three

    def train_step(self, model, optimizer, x: torch.Tensor, y: torch.Tensor):
        from .fused_step import ext_sgd_step

        return ext_sgd_step(model, optimizer, x, y)


# --------------------------------------------------------------------------- the registry

_REGISTRY: dict[str, Backend] = {}
_LOADED: dict[str, str | None] = {}  # name -> None when loaded, else why it failed
# What "auto" picks per device type: the fastest measured path first, for training and for
# inference alike (the same backend won both), then the fallbacks; the first backend usable
# for the tensors' dtype wins.  The runs that decided it: docs/auto-backend.md.
AUTO_ORDER = {"cpu": ["ext", "torch"], "cuda": ["ext", "triton", "torch"]}
# The same, with backends registered later (register_backend's auto_priority) placed in it.
_AUTO_ORDER: dict[str, list[str]] = {device_type: list(order) for device_type, order in AUTO_ORDER.items()}
# implementation()'s answers, per (name, device, dtype) as its callers pass them.
_IMPLEMENTATIONS: dict[tuple, Backend] = {}


def register_backend(backend: Backend, *, auto_priority: dict[str, int] | None = None) -> None:
    """Add a backend. `auto_priority` maps device type -> rank for "auto" (lower wins)."""
    _REGISTRY[backend.name] = backend
    _LOADED.pop(backend.name, None)
    _IMPLEMENTATIONS.clear()
    for device_type, rank in (auto_priority or {}).items():
        order = _AUTO_ORDER.setdefault(device_type, [])
        if backend.name in order:
            order.remove(backend.name)
        order.insert(min(rank, len(order)), backend.name)


def backend_names() -> list[str]:
    return ["auto", *_REGISTRY]


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; valid backends are {backend_names()}")
    return _REGISTRY[name]


def unavailable_reason(name: str, device_type: str | None = None) -> str | None:
    """None if backend `name` can run (on `device_type`, or on any device when None), else why not."""
    backend = get_backend(name)
    if name not in _LOADED:
        try:
            backend.load()
            _LOADED[name] = None
        except (ImportError, OSError, BackendUnavailableError) as exc:
            _LOADED[name] = str(exc) or type(exc).__name__
    if _LOADED[name] is not None:
        return f"backend {name!r} is unavailable: {_LOADED[name]}"
    reasons = []
    for dt in backend.device_types if device_type is None else (device_type,):
        if dt not in backend.device_types:
            reasons.append(f"backend {name!r} has no {dt} kernels")
            continue
        why = backend.device_reason(dt)
        if why is None:
            return None
        reasons.append(f"backend {name!r} cannot run on {dt}: {why}")
    return "; ".join(reasons)


def resolve(name: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The concrete backend name that `name` means for tensors on `device` of `dtype`.

    Raises ValueError for an unknown name, BackendUnavailableError when the backend
    cannot run on that device here (the message says why), and TypeError when a backend
    named explicitly does not take `dtype` (the message names the dtypes it takes).
    """
    device_type = torch.device(device).type
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device_type, []):
            backend = _REGISTRY.get(candidate)
            if backend is None or (dtype is not None and dtype not in backend.dtypes):
                continue
            if unavailable_reason(candidate, device_type) is None:
                return candidate
        raise BackendUnavailableError(f"no backend can run on {device_type} tensors of dtype {dtype}")
    backend = get_backend(name)
    why = unavailable_reason(name, device_type)
    if why is not None:
        raise BackendUnavailableError(why)
    if dtype is not None and dtype not in backend.dtypes:
        supported = ", ".join(str(d).replace("torch.", "") for d in backend.dtypes)
        raise TypeError(f"the {name} backend supports {supported} tensors, got {str(dtype).replace('torch.', '')}; "
                        f"convert the tensors or use backend='auto'")
    return name


def implementation(name: str, device: torch.device | str, dtype: torch.dtype | None = None) -> Backend:
    """The backend that `name` means for tensors on `device` of `dtype`, loaded.

    Called on every op, so the answer is cached per (name, device, dtype): what
    runs where does not change within a process (registering a backend clears
    the cache).  The key is the caller's own device object, not its type: one
    dict lookup, where normalising the device first made this lookup a third of
    the Python time of a small op.  Failures are not cached, and re-raise each time.
    """
    key = (name, device, dtype)
    backend = _IMPLEMENTATIONS.get(key)
    if backend is None:
        backend = _REGISTRY[resolve(name, device, dtype)]
        _IMPLEMENTATIONS[key] = backend
    return backend


def available_backends(device_types: Iterable[str] = ("cpu", "cuda")) -> dict[str, dict[str, object]]:
    """For each registered backend: whether it can run, on which devices, and why not.

    Returns ``{name: {"available": bool, "devices": [...], "reason": str | None,
    "description": str}}``; "devices" lists the device types it can run on now.
    """
    report = {}
    for name, backend in _REGISTRY.items():
        devices, reasons = [], []
        for device_type in device_types:
            why = unavailable_reason(name, device_type)
            if why is None:
                devices.append(device_type)
            else:
                reasons.append(why)
        report[name] = {
            "available": bool(devices),
            "devices": devices,
            "reason": None if devices else "; ".join(dict.fromkeys(reasons)),
            "description": backend.description,
        }
    return report


for _backend in (TorchBackend(), TritonBackend(), ExtBackend()):
    register_backend(_backend)
