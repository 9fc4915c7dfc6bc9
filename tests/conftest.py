"""Shared test setup: which (backend, device) pairs to test, and exact-arithmetic inputs.

Triton kernels run on CPU tensors only under TRITON_INTERPRET=1, which must be
set before triton is imported, so it is decided here, first: interpreted when
there is no GPU, compiled when there is one (then the CPU rows skip triton).

LENET_FAST_REQUIRE_BACKENDS=torch,triton,ext (set by .ci/run and gpu_check.sh) turns
a backend that runs on no device here from a skip into a failure, so a broken
build cannot pass by skipping.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

import pytest  # noqa: E402

from lenet_fast import backends  # noqa: E402

BACKENDS = [name for name in backends.backend_names() if name != "auto"]
DEVICES = ["cpu", "cuda"]
REQUIRED = [b for b in os.environ.get("LENET_FAST_REQUIRE_BACKENDS", "").split(",") if b]


def _backend_device_params():
    for backend in BACKENDS:
        for device in DEVICES:
            yield pytest.param((backend, device), id=f"{backend}-{device}")


@pytest.fixture(params=list(_backend_device_params()))
def backend_device(request):
    """(backend, device) for every registered backend that can run on the device here."""
    backend, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    why = backends.unavailable_reason(backend, device)
    if why is not None:
        # A required backend may be missing on one device (Triton on CPU needs the
        # interpreter, which a GPU run turns off) but not on every device.
        if backend in REQUIRED and backends.unavailable_reason(backend) is not None:
            pytest.fail(f"required backend {backend!r} is unavailable here: {why}")
        pytest.skip(why)
    return backend, device
