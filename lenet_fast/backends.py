"""Backend registry: which implementation of the fused ops runs.

A backend is a name plus a loader. The loader imports the backend's module and
returns an object (usually the module itself) with these functions::

    conv3x3_relu(x, weight, bias, padding) -> Tensor
    maxpool2x2(x) -> Tensor
    conv3x3_relu_maxpool2x2(x, weight, bias, padding) -> Tensor
    linear(x, weight, bias, relu) -> Tensor          # x is 2-D here
    mlp_cross_entropy(x, weights, biases, target) -> (loss, logits)

Inputs reaching these functions were already validated by `lenet_fast.ops`
(ranks, shapes, devices, dtypes), so implementations contain only the math.
`bias` may be None.  Gradients must flow through them (autograd).

Adding a backend is one call to `register_backend` in the module that owns it;
the model, the ops and the CLIs pick it up by name.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Iterable

import torch

OP_NAMES = ("conv3x3_relu", "maxpool2x2", "conv3x3_relu_maxpool2x2", "linear", "mlp_cross_entropy")


class BackendUnavailableError(RuntimeError):
    """The requested backend exists but cannot run here (the message says why)."""


@dataclasses.dataclass
class Backend:
    name: str
    description: str
    # Device types ("cpu", "cuda") this backend can run on, in principle.
    device_types: tuple[str, ...]
    # Imports the implementation; raises BackendUnavailableError (or ImportError) with a reason.
    loader: Callable[[], object]
    # dtypes the kernels accept.
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    # Returns None when `device_type` can be used now, else the reason it cannot.
    device_check: Callable[[str], str | None] = lambda device_type: None
    _impl: object | None = dataclasses.field(default=None, repr=False)
    _error: str | None = dataclasses.field(default=None, repr=False)

    def load(self) -> object:
        """The implementation module; raises BackendUnavailableError with the reason."""
        if self._impl is None and self._error is None:
            try:
                impl = self.loader()
                missing = [op for op in OP_NAMES if not callable(getattr(impl, op, None))]
                if missing:
                    raise BackendUnavailableError(f"it does not implement {', '.join(missing)}")
                self._impl = impl
            except (ImportError, OSError, BackendUnavailableError) as exc:
                self._error = str(exc) or type(exc).__name__
        if self._impl is None:
            raise BackendUnavailableError(f"backend {self.name!r} is unavailable: {self._error}")
        return self._impl

    def unavailable_reason(self, device_type: str | None = None) -> str | None:
        """None if usable (on `device_type`, or on any device when None), else why not."""
        try:
            self.load()
        except BackendUnavailableError as exc:
            return str(exc)
        types = self.device_types if device_type is None else (device_type,)
        reasons = []
        for dt in types:
            if dt not in self.device_types:
                reasons.append(f"backend {self.name!r} has no {dt} kernels")
                continue
            why = self.device_check(dt)
            if why is None:
                return None
            reasons.append(f"backend {self.name!r} cannot run on {dt}: {why}")
        return "; ".join(reasons)


_REGISTRY: dict[str, Backend] = {}
# What "auto" picks per device type: the fastest measured path first, for training and for
# inference alike (the same backend won both), then the fallbacks; the first backend usable
# for the tensors' dtype wins.  The runs that decided it: docs/auto-backend.md.
AUTO_ORDER = {"cpu": ["ext", "torch"], "cuda": ["ext", "triton", "torch"]}
# The same, with backends registered later (register_backend's auto_priority) placed in it.
_AUTO_ORDER: dict[str, list[str]] = {device_type: list(order) for device_type, order in AUTO_ORDER.items()}
# implementation()'s answers, per (name, device, dtype) as its callers pass them.
_IMPLEMENTATIONS: dict[tuple, object] = {}


def register_backend(backend: Backend, *, auto_priority: dict[str, int] | None = None) -> None:
    """Add a backend. `auto_priority` maps device type -> rank for "auto" (lower wins)."""
    _REGISTRY[backend.name] = backend
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
            if backend is None:
                continue
            if dtype is not None and dtype not in backend.dtypes:
                continue
            if backend.unavailable_reason(device_type) is None:
                return candidate
        raise BackendUnavailableError(f"no backend can run on {device_type} tensors of dtype {dtype}")
    backend = get_backend(name)
    why = backend.unavailable_reason(device_type)
    if why is not None:
        raise BackendUnavailableError(why)
    if dtype is not None and dtype not in backend.dtypes:
        supported = ", ".join(str(d).replace("torch.", "") for d in backend.dtypes)
        raise TypeError(f"the {name} backend supports {supported} tensors, got {str(dtype).replace('torch.', '')}; "
                        f"convert the tensors or use backend='auto'")
    return name


def implementation(name: str, device: torch.device | str, dtype: torch.dtype | None = None) -> object:
    """The implementation object of the resolved backend (see module docstring).

    Called on every op, so the answer is cached per (name, device, dtype): what
    runs where does not change within a process (registering a backend clears
    the cache).  The key is the caller's own device object, not its type: one
    dict lookup, where normalising the device first made this lookup a third of
    the Python time of a small op.  Failures are not cached, and re-raise each time.
    """
    key = (name, device, dtype)
    impl = _IMPLEMENTATIONS.get(key)
    if impl is None:
        impl = _REGISTRY[resolve(name, device, dtype)].load()
        _IMPLEMENTATIONS[key] = impl
    return impl


def available_backends(device_types: Iterable[str] = ("cpu", "cuda")) -> dict[str, dict[str, object]]:
    """For each registered backend: whether it can run, on which devices, and why not.

    Returns ``{name: {"available": bool, "devices": [...], "reason": str | None,
    "description": str}}``; "devices" lists the device types it can run on now.
    """
    report = {}
    for name, backend in _REGISTRY.items():
        devices, reasons = [], []
        for device_type in device_types:
            why = backend.unavailable_reason(device_type)
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


def _cuda_check(device_type: str) -> str | None:
    if device_type == "cuda" and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no NVIDIA GPU or driver)"
    return None


def _import(module: str) -> Callable[[], object]:
    return lambda: importlib.import_module(module)


# --- the built-in backends -------------------------------------------------
register_backend(
    Backend(
        name="torch",
        description="stock torch.nn.functional (the reference)",
        device_types=("cpu", "cuda"),
        loader=_import("lenet_fast.torch_backend"),
        dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        device_check=_cuda_check,
    ),
)


def _triton_check(device_type: str) -> str | None:
    if device_type == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (slow; for testing)"
        return None
    return _cuda_check(device_type)


register_backend(
    Backend(
        name="triton",
        description="fused Triton kernels (kernels/), registered with torch.library.triton_op",
        device_types=("cpu", "cuda"),
        loader=_import("lenet_fast.triton_backend"),
        dtypes=(torch.float32,),
        device_check=_triton_check,
    ),
)


def _ext_check(device_type: str) -> str | None:
    if device_type == "cuda":
        why = _cuda_check(device_type)
        if why is not None:
            return why
        if not importlib.import_module("lenet_fast.ext_backend").HAS_CUDA_KERNELS:
            return "the extension was built without CUDA kernels (no CUDA toolkit at build time)"
    return None


register_backend(
    Backend(
        name="ext",
        description="C++/CUDA extension lenet_fast._C (csrc/): multi-threaded CPU kernels and CUDA kernels",
        device_types=("cpu", "cuda"),
        loader=_import("lenet_fast.ext_backend"),
        dtypes=(torch.float32, torch.float64),
        device_check=_ext_check,
    ),
)

