"""The command-line tools end to end: train, resume, Ctrl-C, evaluate, predict, bad arguments."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import write_synthetic_mnist
from lenet_fast import checkpoint, cli, data, predict
from lenet_fast import train as train_module

EPOCH_FIELDS = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds", "images_per_second"}


def run_cli(module, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", f"lenet_fast.{module}", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    return write_synthetic_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained_run(dataset_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = run_cli("train", "--data-dir", dataset_root, "--no-download", "--epochs", 3, "--batch-size", 32,
                     "--backend", "torch", "--device", "cpu", "--out", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    return out, result


def test_train_writes_outputs_and_learns(trained_run):
    out, result = trained_run
    assert {"checkpoint.pt", "metrics.json", "curves.png"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"config", "versions", "device_name", "backend", "test_accuracy", "epochs"} <= set(metrics)
    assert metrics["backend"] == "torch" and metrics["cuda_graph"] is False  # eager on the CPU
    assert {"torch", "triton", "lenet_fast"} <= set(metrics["versions"])
    assert {"epochs", "batch_size", "lr", "optimizer", "seed", "dataset", "device", "backend"} <= set(metrics["config"])
    epochs = metrics["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert all(EPOCH_FIELDS <= set(e) and e["seconds"] > 0 for e in epochs)
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"], "loss did not fall"
    assert metrics["test_accuracy"] == epochs[-1]["test_accuracy"] > 0.5
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.stdout.count("epoch ") >= 3 and "final test accuracy" in result.stdout


def test_checkpoint_loads_with_weights_only(trained_run):
    out, _ = trained_run
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3 and set(state["model"]) >= {"conv1.weight", "fc3.bias"}


def _config(dataset_root, out, epochs=2):
    args = train_module.build_parser().parse_args([
        "--data-dir", str(dataset_root), "--no-download", "--epochs", str(epochs), "--batch-size", "32",
        "--backend", "torch", "--device", "cpu", "--out", str(out), "--no-progress", "--limit-train", "200", "--limit-test", "100",
    ])
    return train_module.make_config(args, None)


def _stop_after(steps):
    class StopAfter(train_module.StopRequest):
        """Behaves as if Ctrl-C came after `steps` training steps."""

        def __init__(self):
            self.checks = 0

        @property
        def requested(self):
            self.checks += 1
            return self.checks >= steps

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    return StopAfter


@pytest.mark.parametrize("stop_after_steps", [7, 3], ids=["between-epochs", "mid-epoch"])
def test_resume_equals_uninterrupted_run(dataset_root, tmp_path, monkeypatch, stop_after_steps):
    straight = train_module.train(_config(dataset_root, tmp_path / "straight"))
    # 200 images / 32 = 7 steps per epoch: stopping after 7 steps stops at the epoch boundary.
    monkeypatch.setattr(train_module, "StopRequest", _stop_after(stop_after_steps))
    with pytest.raises(KeyboardInterrupt):
        train_module.train(_config(dataset_root, tmp_path / "split"))
    monkeypatch.undo()
    saved = checkpoint.load(tmp_path / "split" / "checkpoint.pt")
    assert (saved["epoch"], saved["step"]) == ((1, 0) if stop_after_steps == 7 else (0, 3))
    resumed = train_module.train(saved["config"], saved)
    for a, b in zip(straight["epochs"], resumed["epochs"]):
        assert {k: v for k, v in a.items() if k not in ("seconds", "images_per_second")} == \
               {k: v for k, v in b.items() if k not in ("seconds", "images_per_second")}
    final_a = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")["model"]
    final_b = checkpoint.load(tmp_path / "split" / "checkpoint.pt")["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_ctrl_c_saves_a_resumable_checkpoint(dataset_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lenet_fast.train", "--data-dir", str(dataset_root), "--no-download",
         "--epochs", "200", "--batch-size", "8", "--backend", "torch", "--device", "cpu",
         "--out", str(out), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_line = proc.stdout.readline()  # printed once data and model are ready
    assert "lenet_fast.train" in first_line
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "resume with" in stderr
    state = checkpoint.load(out / "checkpoint.pt", resumable=True)
    assert state["epoch"] < 200
    # Resume (the run's 200 epochs: a resumed run keeps them) and stop again a few steps later.
    monkeypatch.setattr(train_module, "StopRequest", _stop_after(3))
    assert train_module.main(["--resume", str(out / "checkpoint.pt"), "--data-dir", str(dataset_root),
                              "--no-progress"]) == 130
    resumed = checkpoint.load(out / "checkpoint.pt", resumable=True)
    assert (resumed["epoch"], resumed["step"]) > (state["epoch"], state["step"])


def test_resume_refuses_changed_hyperparameters(trained_run):
    out, _ = trained_run
    result = run_cli("train", "--resume", out / "checkpoint.pt", "--lr", "0.5")
    assert result.returncode == 2
    assert "--lr 0.5 differs from the checkpoint's" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "must be a positive integer"),
        (["--batch-size", "-3"], "must be a positive integer"),
        (["--lr", "nan"], "must be a positive number"),
        (["--optimizer", "lbfgs"], "invalid choice"),
        (["--backend", "cudnn"], "invalid choice"),
        (["--dataset", "cifar10"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2(args, message):
    result = run_cli("train", *args)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_exits_2_with_one_line(dataset_root, tmp_path):
    result = run_cli("train", "--device", "cuda", "--data-dir", dataset_root, "--out", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "CUDA is not available" in result.stderr
    assert "Traceback" not in result.stderr


def test_unavailable_backend_exits_2(dataset_root, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("triton runs here")
    result = subprocess.run([sys.executable, "-m", "lenet_fast.train", "--device", "cpu", "--backend", "triton",
                             "--data-dir", str(dataset_root), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env={**__import__("os").environ})
    assert result.returncode == 2 and "--backend triton" in result.stderr and "Traceback" not in result.stderr


def test_missing_data_offline_exits_2_with_instructions(tmp_path):
    result = run_cli("train", "--data-dir", tmp_path / "empty", "--no-download", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "train-images-idx3-ubyte" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    result = run_cli("evaluate", "--checkpoint", bad)
    assert result.returncode == 2 and "not a readable lenet_fast checkpoint" in result.stderr


def test_checkpoint_with_code_is_refused(tmp_path):
    """weights_only=True: a pickle that would run code is rejected, and the code never runs."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"format": checkpoint.FORMAT, "model": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_evaluate_prints_per_class_and_saves_confusion_matrix(trained_run, dataset_root, tmp_path):
    out, _ = trained_run
    result = run_cli("evaluate", "--checkpoint", out / "checkpoint.pt", "--data-dir", dataset_root,
                     "--device", "cpu", "--confusion", tmp_path / "cm.png")
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and result.stdout.count("class ") == 10
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{100 * metrics['test_accuracy']:.2f}%" in result.stdout


def test_predict_classifies_pngs_and_reports_unreadable_files(trained_run, dataset_root, tmp_path):
    from PIL import Image

    out, _ = trained_run
    model, _ = checkpoint.load_model(out / "checkpoint.pt", backend="torch")
    images, _ = data.load_split("mnist", dataset_root, train=False, download=False)
    with torch.no_grad():
        probs = torch.softmax(model(data.to_device("mnist", images, torch.zeros(len(images)), "cpu").images), 1)
    index = int(probs.max(1).values.argmax())  # the test image the model is surest of
    label = int(probs[index].argmax())
    exact = tmp_path / "digit.png"
    Image.fromarray(images[index].numpy()).save(exact)
    # The same digit as dark ink on a light, larger RGB canvas: needs --invert and re-centring.
    drawn = tmp_path / "drawn.jpg"
    big = Image.fromarray(255 - images[index].numpy()).resize((112, 112), Image.Resampling.NEAREST).convert("RGB")
    big.save(drawn, quality=95)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")

    result = run_cli("predict", "--checkpoint", out / "checkpoint.pt", exact, broken)
    assert result.returncode == 1
    assert f"{exact}: {label} (p={probs[index, label].item():.4f})" in result.stdout
    assert "broken.png: cannot read image" in result.stderr
    result = run_cli("predict", "--checkpoint", out / "checkpoint.pt", "--invert", drawn)
    assert result.returncode == 0 and f"{drawn}: {label} " in result.stdout


def test_mnist_format_conversion_centres_the_ink():
    from PIL import Image

    canvas = np.zeros((100, 60), dtype=np.uint8)
    canvas[10:50, 5:25] = 255  # a bar in the top-left corner
    frame = predict.to_mnist_format(Image.fromarray(canvas))
    assert frame.shape == (28, 28) and frame.max() == pytest.approx(1.0)
    rows, cols = np.nonzero(frame > 0.5)
    assert abs(rows.mean() - 13.5) <= 1 and abs(cols.mean() - 13.5) <= 1
    assert rows.max() - rows.min() + 1 == 20  # longer side scaled to 20 pixels


def test_cuda_graph_needs_cuda(dataset_root, tmp_path):
    result = run_cli("train", "--device", "cpu", "--cuda-graph", "--data-dir", dataset_root, "--out", tmp_path)
    assert result.returncode == 2 and "--cuda-graph needs a CUDA device" in result.stderr


@pytest.mark.parametrize("argv, option", [([], None), (["--cuda-graph"], True), (["--no-cuda-graph"], False)])
def test_cuda_graph_is_the_default_on_cuda_only(argv, option):
    """Neither flag: graphs on CUDA, eager on the CPU; --no-cuda-graph: eager everywhere;
    --cuda-graph: says the default on CUDA, refused on the CPU (before any work is done)."""
    parser = train_module.build_parser()
    assert parser.parse_args(argv).cuda_graph is option
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert train_module.resolve_cuda_graph(option, cuda) is (option is not False)
    if option:
        with pytest.raises(cli.UsageError, match="--cuda-graph needs a CUDA device"):
            train_module.resolve_cuda_graph(option, cpu)
    else:
        assert train_module.resolve_cuda_graph(option, cpu) is False
    assert "--no-cuda-graph" in parser.format_help() and "on by default on CUDA" in " ".join(parser.format_help().split())
