"""`python -m lenet_fast.compile_check`: every Triton kernel compiles for sm_80 and sm_90 without spilling.

Runs the real tool in a subprocess (ahead-of-time compilation needs no GPU,
and must not run under TRITON_INTERPRET, which the subprocess leaves unset).
"""

import json
import os
import subprocess
import sys

import pytest

from lenet_fast import compile_check

TRITON_KERNELS = {
    "conv3x3_relu_fwd_kernel",
    "conv3x3_relu_bwd_weight_kernel",
    "conv3x3_relu_bwd_input_kernel",
    "maxpool2x2_fwd_kernel",
    "maxpool2x2_bwd_kernel",
    "conv3x3_relu_maxpool2x2_fwd_kernel",
    "conv3x3_relu_maxpool2x2_bwd_weight_kernel",
    "conv3x3_relu_maxpool2x2_bwd_input_kernel",
    "linear_fwd_kernel",
    "linear_bwd_input_kernel",
    "linear_bwd_weight_kernel",
    "softmax_cross_entropy_kernel",
    # the whole training step (kernels/lenet_step.py)
    "lenet_features_fwd_kernel",
    "lenet_head_step_kernel",
    "lenet_features_bwd_kernel",
    "lenet_sgd_kernel",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile_check") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "lenet_fast.compile_check", "--json", str(path)],
                          env=env, capture_output=True, text=True, timeout=900)
    return proc, (json.loads(path.read_text()) if path.exists() else None)


def test_compile_check_succeeds(report):
    proc, data = report
    assert proc.returncode == 0, f"compile_check failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert data is not None and data["failures"] == []
    assert "OK: everything compiled, no spills" in proc.stdout


def test_every_kernel_compiled_for_sm80_and_sm90_without_spills(report):
    _, data = report
    triton_rows = [r for r in data["rows"] if r["source"] == "triton"]
    for arch in ("sm_80", "sm_90"):
        compiled = {r["kernel"] for r in triton_rows if r["arch"] == arch}
        assert compiled == TRITON_KERNELS, f"{arch}: missing {TRITON_KERNELS - compiled}"
    for row in data["rows"]:  # the extension's rows too, when it reports any
        assert row["local"] == 0 and row["stack"] == 0, f"spills: {row}"
        assert 0 < row["registers"] <= 255, row


def test_lenet_batches_64_256_and_1024_are_covered(report):
    _, data = report
    used = {u for r in data["rows"] if r["source"] == "triton" for u in r["used_by"]}
    for batch in (64, 256, 1024):
        for layer in ("conv1 fwd", "conv1 bwd", "conv2 fwd", "conv2 bwd", "fc1 fwd", "fc1 bwd", "fc3 bwd", "loss",
                      "step: features fwd", "step: head", "step: features bwd", "step: sgd"):
            assert f"{layer} @{batch}" in used


def test_extension_rows_or_a_reason(report):
    _, data = report
    ext_rows = [r for r in data["rows"] if r["source"] == "ext"]
    assert data["ext"].startswith("included") == bool(ext_rows), data["ext"]


def test_spills_and_oversized_shared_memory_fail_the_check():
    clean = {"kernel": "k", "arch": "sm_90", "registers": 64, "shared": 1024, "local": 0, "stack": 0}
    assert compile_check.problems(clean) == []
    assert compile_check.problems({**clean, "local": 8})
    assert compile_check.problems({**clean, "stack": 16})
    assert compile_check.problems({**clean, "arch": "sm_80", "shared": 200 * 1024})
