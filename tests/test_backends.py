"""The backend registry: resolution, "auto", reporting, and how a new backend plugs in."""

import pytest
import torch

import lenet_fast
from lenet_fast import backends, ops


def test_available_backends_reports_every_backend_with_a_reason():
    report = lenet_fast.available_backends()
    assert {"torch", "triton", "ext"} <= set(report)
    assert report["torch"]["available"] and "cpu" in report["torch"]["devices"]
    for name, entry in report.items():
        assert entry["available"] == bool(entry["devices"])
        if not entry["available"]:
            assert entry["reason"], f"{name} is unavailable without a reason"


def test_cuda_is_reported_missing_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    report = lenet_fast.available_backends()
    assert "cuda" not in report["torch"]["devices"]
    with pytest.raises(lenet_fast.BackendUnavailableError, match="torch.cuda.is_available"):
        backends.resolve("torch", "cuda")


def test_auto_resolves_to_a_usable_backend():
    name = backends.resolve("auto", "cpu", torch.float32)
    assert backends.unavailable_reason(name, "cpu") is None


def test_auto_skips_backends_without_the_dtype():
    # float16 on CPU: only the torch reference takes it.
    assert backends.resolve("auto", "cpu", torch.float16) == "torch"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="valid backends"):
        backends.resolve("nope", "cpu")
    with pytest.raises(ValueError, match="valid backends"):
        lenet_fast.LeNet(backend="nope")


def test_a_new_backend_is_one_registration(monkeypatch):
    """A Backend subclass and one register_backend call are all it takes for the ops (and so
    LeNet) to use it."""
    calls = []

    class Counting(backends.TorchBackend):
        name, description = "counting", "test"
        device_types = ("cpu",)

        def run(self, op, *args):
            calls.append(op.name)
            return super().run(op, *args)

    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(backends, "_AUTO_ORDER", {k: list(v) for k, v in backends._AUTO_ORDER.items()})
    backends.register_backend(Counting())
    model = lenet_fast.LeNet(backend="counting")
    out = model(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert calls == ["conv3x3_relu_maxpool2x2"] * 2 + ["linear"] * 3
    assert ops.maxpool2x2(torch.zeros(1, 1, 2, 2), backend="counting").shape == (1, 1, 1, 1)
    assert calls[-1] == "maxpool2x2"


def test_kernel_backend_missing_an_op_is_unavailable_with_reason(monkeypatch):
    class Partial(backends.KernelBackend):
        name, description = "partial", "test"
        prefix, module = "nothing_registered", "lenet_fast.ops"

    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    backends.register_backend(Partial())
    with pytest.raises(lenet_fast.BackendUnavailableError, match="does not register nothing_registered_conv3x3_relu"):
        ops.maxpool2x2(torch.zeros(1, 1, 2, 2), backend="partial")


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_auto_order_follows_the_committed_benchmark_results(device_type):
    """`auto` picks the fastest measured lenet_fast backend, for training (shortest epoch of
    any lenet_fast row) and for inference (most test images/s), per the results that
    benchmarks.run committed for this device type (docs/auto-backend.md)."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / device_type / "results.json"
    rows = [r for r in json.loads(path.read_text())["end_to_end"]
            if r["backend"] != "stock" and "best_epoch_seconds" in r]
    fastest_training = min(rows, key=lambda r: r["best_epoch_seconds"])["backend"]
    fastest_inference = max(rows, key=lambda r: r["inference_images_per_second"])["backend"]
    assert backends.AUTO_ORDER[device_type][0] == fastest_training == fastest_inference
    assert backends.AUTO_ORDER[device_type][-1] == "torch"
