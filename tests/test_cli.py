"""The command-line tools end to end: train, resume, Ctrl-C, evaluate, predict, bad arguments."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import assert_one_error_line, run_main, train_args, write_synthetic_mnist
from lenet_fast import checkpoint, cli, data, predict
from lenet_fast import evaluate as evaluate_module
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


# ---------------------------------------------------------------- resume: options and the schedule


@pytest.fixture
def finished_run(dataset_root, tmp_path):
    """A short finished run trained with --backend torch and --no-cuda-graph (in this process)."""
    out = tmp_path / "run"
    assert train_module.main([str(a) for a in train_args(dataset_root, out, "--no-cuda-graph")]) == 0
    return out / "checkpoint.pt"


def test_resume_takes_options_not_given_from_the_checkpoint(finished_run, dataset_root, capsys):
    capsys.readouterr()
    code, out, err = run_main(train_module.main, ["--resume", finished_run, "--data-dir", dataset_root], capsys)
    assert code == 0, err
    assert "backend torch," in out  # not auto (ext here)
    saved = json.loads((finished_run.parent / "metrics.json").read_text())["config"]
    assert (saved["backend"], saved["device"], saved["cuda_graph"]) == ("torch", "cpu", False)
    assert "resuming with" not in err


def test_resume_announces_a_changed_backend_and_uses_it(finished_run, dataset_root, capsys):
    capsys.readouterr()
    code, out, err = run_main(train_module.main, ["--resume", finished_run, "--data-dir", dataset_root,
                                                  "--backend", "ext"], capsys)
    assert code == 0, err
    assert err.splitlines()[0] == "lenet_fast.train: resuming with --backend ext; the checkpoint's run had --backend torch"
    assert "backend ext," in out


def test_resume_config_merges_runtime_options(monkeypatch):
    """Not given: the checkpoint's; given and different: used, and said once per option."""
    stored = {**train_module.DEFAULTS, "lr": 0.05, "device": "cpu", "backend": "torch", "cuda_graph": False,
              "out": "/somewhere/else", "data_dir": "/somewhere/data"}
    parser = train_module.build_parser()
    config = train_module.make_config(parser.parse_args(["--resume", "r/checkpoint.pt"]), {"config": stored})
    assert (config["device"], config["backend"], config["cuda_graph"]) == ("cpu", "torch", False)
    assert config["out"] == "r" and config.get("data_dir") is None  # paths never come from the file
    lines = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    config = train_module.make_config(parser.parse_args(["--resume", "r/checkpoint.pt", "--cuda-graph", "--device",
                                                         "cuda", "--out", "elsewhere"]), {"config": stored})
    assert (config["device"], config["cuda_graph"], config["out"]) == ("cuda", True, "elsewhere")
    assert lines == ["lenet_fast.train: resuming with --device cuda; the checkpoint's run had --device cpu",
                     "lenet_fast.train: resuming with --cuda-graph; the checkpoint's run had --no-cuda-graph"]


def test_a_checkpoint_option_that_cannot_run_here_says_where_it_came_from():
    stored = {**train_module.DEFAULTS, "lr": 0.05, "device": "cpu", "cuda_graph": True}
    config = train_module.make_config(train_module.build_parser().parse_args(["--resume", "c.pt"]), {"config": stored})
    with pytest.raises(cli.UsageError, match="--cuda-graph needs a CUDA device.*took --cuda-graph from its "
                                             "checkpoint: give --no-cuda-graph to resume otherwise"):
        train_module.resolve_runtime(config, {"config": stored})


def test_resume_refuses_other_epochs_and_help_says_why(finished_run, dataset_root, capsys):
    code, _, err = run_main(train_module.main, ["--resume", finished_run, "--data-dir", dataset_root,
                                                "--epochs", 5], capsys)
    assert_one_error_line(code, err, "train", "--epochs 5 differs from the checkpoint's 2",
                          "cosine-annealed over its 2 epochs: for 5, start a new run")
    assert checkpoint.load(finished_run)["config"]["epochs"] == 2
    assert "a resumed run keeps its checkpoint's (the cosine learning-rate schedule spans them): another count is " \
           "refused" in " ".join(train_module.build_parser().format_help().split())


def test_resume_writes_beside_its_checkpoint_never_where_the_file_says(finished_run, dataset_root, tmp_path,
                                                                       capsys, monkeypatch):
    state = torch.load(finished_run, weights_only=True)
    elsewhere = tmp_path / "elsewhere"
    state["config"].update(out=str(elsewhere / "out"), data_dir=str(elsewhere / "data"), no_download=True)
    moved = tmp_path / "moved"
    moved.mkdir()
    torch.save(state, moved / "checkpoint.pt")
    monkeypatch.setenv("LENET_FAST_DATA", str(dataset_root))
    code, out, err = run_main(train_module.main, ["--resume", moved / "checkpoint.pt"], capsys)
    assert code == 0, err
    assert f"-> {moved}" in out and (moved / "metrics.json").exists()
    code, out, err = run_main(train_module.main, ["--resume", moved / "checkpoint.pt", "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "metrics.json").exists()
    assert not elsewhere.exists()


# ---------------------------------------------------------------- checked before any work


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a run gets as far as loading its data."""
    def load(*args, **kwargs):
        raise AssertionError("the run started its work before refusing")

    monkeypatch.setattr(train_module.data, "load", load)


@pytest.mark.parametrize("where", ["file", "under-a-file", "read-only"])
def test_unusable_out_is_refused_before_training(where, dataset_root, tmp_path, capsys, monkeypatch, no_training):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    if where == "file":
        out, message = blocker, f"--out {blocker} is a file, not a folder"
    elif where == "under-a-file":
        out, message = blocker / "run", f"--out {blocker / 'run'} is under {blocker}, which is a file, not a folder"
    else:
        out, message = tmp_path / "ro", f"--out {tmp_path / 'ro'}: cannot write in this folder (Permission denied)"
        out.mkdir()
        real_open = os.open

        def read_only_open(path, *args, **kwargs):  # as a read-only folder answers, also to root
            if os.path.dirname(os.fspath(path)) == str(out):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only_open)
    code, _, err = run_main(train_module.main, train_args(dataset_root, out), capsys)
    assert_one_error_line(code, err, "train", message)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_refused_before_training(dataset_root, tmp_path, capsys, no_training):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, _, err = run_main(train_module.main, train_args(dataset_root, out), capsys)
    finally:
        out.chmod(0o755)
    assert_one_error_line(code, err, "train", f"--out {out}: cannot write in this folder")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--weight-decay", "-5"], "argument --weight-decay: must be a number >= 0, got -5"),
        (["--weight-decay", "nan"], "argument --weight-decay: must be a number >= 0, got nan"),
        (["--weight-decay", "inf"], "argument --weight-decay: must be a number >= 0, got inf"),
        (["--seed", "100000000000000"], "argument --seed: must be an integer from 0 to 4294967295, got 100000000000000"),
        (["--seed", "-1"], "argument --seed: must be an integer from 0 to 4294967295, got -1"),
        (["--lr", "inf"], "argument --lr: must be a positive number, got inf"),
        (["--limit-test", "0"], "argument --limit-test: must be a positive integer, got 0"),
        (["--out", ""], "argument --out: must not be empty"),
        (["--resume", ""], "argument --resume: must not be empty"),
        (["--data-dir", ""], "argument --data-dir: must not be empty"),
    ],
)
def test_bad_values_exit_2_before_any_work(args, message, capsys):
    code, _, err = run_main(train_module.main, args, capsys)
    assert code == 2 and err.strip().splitlines()[-1] == f"lenet_fast.train: error: {message}"


def test_empty_paths_are_refused_by_evaluate_and_predict(capsys):
    code, _, err = run_main(evaluate_module.main, ["--checkpoint", ""], capsys)
    assert code == 2 and "argument --checkpoint: must not be empty" in err
    code, _, err = run_main(evaluate_module.main, ["--checkpoint", "c.pt", "--confusion", ""], capsys)
    assert code == 2 and "argument --confusion: must not be empty" in err
    code, _, err = run_main(predict.main, ["--checkpoint", "", "x.png"], capsys)
    assert code == 2 and "argument --checkpoint: must not be empty" in err


def test_python_m_lenet_fast_rejects_unknown_options():
    result = subprocess.run([sys.executable, "-m", "lenet_fast", "--bogus"], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr
    assert result.stdout == ""


# ---------------------------------------------------------------- a diverging run


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_diverging_run_stops_with_exit_2_and_strict_json(dataset_root, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(train_module.main, train_args(dataset_root, out, "--lr", 100, "--limit-train", 200), capsys)
    assert_one_error_line(code, err, "train", "the train loss became nan in epoch 1 (by step 7)",
                          "the learning rate (100.0) is probably too high", "no checkpoint was saved")
    metrics = _strict_json((out / "metrics.json").read_text())
    assert metrics["diverged"] == {"epoch": 1, "step": 7, "train_loss": None} and metrics["epochs"] == []
    assert not (out / "checkpoint.pt").exists()


def test_divergence_keeps_the_last_good_checkpoint(dataset_root, tmp_path, capsys, monkeypatch):
    """A learning rate that turns NaN in the second epoch: the first epoch's checkpoint stays."""
    schedule = train_module.learning_rate
    monkeypatch.setattr(train_module, "learning_rate",
                        lambda peak, step, total: float("nan") if step >= 2 else schedule(peak, step, total))
    out = tmp_path / "run"
    code, _, err = run_main(train_module.main, train_args(dataset_root, out), capsys)
    assert_one_error_line(code, err, "train", "became nan in epoch 2",
                          f"the last good checkpoint, {out / 'checkpoint.pt'}, is kept")
    state = checkpoint.load(out / "checkpoint.pt", resumable=True)  # finite weights, resumable
    assert (state["epoch"], state["step"]) == (1, 0)
    metrics = _strict_json((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1] and metrics["diverged"]["epoch"] == 2


def test_divergence_is_caught_at_the_progress_bar_not_only_at_the_epoch_end(dataset_root, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setattr(train_module, "learning_rate", lambda peak, step, total: float("nan"))
    args = [a for a in train_args(dataset_root, tmp_path / "run", "--batch-size", 1) if a != "--no-progress"]
    code, _, err = run_main(train_module.main, args, capsys)
    assert_one_error_line(code, err, "train", "became nan in epoch 1 (by step 50)")


# ---------------------------------------------------------------- evaluate and predict outputs


@pytest.mark.parametrize("where", ["under-a-file", "unknown-extension", "no-extension", "a-folder"])
def test_evaluate_checks_the_confusion_path_before_evaluating(where, trained_run, dataset_root, tmp_path, capsys,
                                                             monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    path, message = {
        "under-a-file": (blocker / "cm.png", f"--confusion {blocker / 'cm.png'} is under {blocker}, which is a file, not a folder"),
        "unknown-extension": (tmp_path / "cm.xyz", "format 'xyz'; name the image .png (or "),
        "no-extension": (tmp_path / "cm", "no extension; name the image .png"),
        "a-folder": (tmp_path, f"--confusion {tmp_path} is a folder; name a file"),
    }[where]

    def evaluate(*args, **kwargs):
        raise AssertionError("evaluated before refusing")

    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
    out, _ = trained_run
    code, _, err = run_main(evaluate_module.main, ["--checkpoint", out / "checkpoint.pt", "--data-dir", dataset_root,
                                                   "--device", "cpu", "--confusion", path], capsys)
    assert_one_error_line(code, err, "evaluate", message)


def test_predict_reports_a_decompression_bomb_by_name_and_goes_on(trained_run, tmp_path, capsys, monkeypatch):
    from PIL import Image

    out, _ = trained_run
    Image.new("L", (28, 28)).save(tmp_path / "digit.png")
    Image.new("L", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # so 100x100 is past twice the limit
    code, stdout, err = run_main(predict.main, ["--checkpoint", out / "checkpoint.pt", tmp_path / "bomb.png",
                                                tmp_path / "digit.png"], capsys)
    assert code == 1
    assert f"{tmp_path / 'bomb.png'}: image too large, skipped" in err and "Traceback" not in err
    assert f"{tmp_path / 'digit.png'}: " in stdout


def test_predict_decodes_a_large_image_at_reduced_size(tmp_path):
    """A 6000x4000 scan: the float working copies stay small (PIL's own buffers are not
    traced here, only numpy's), and the digit comes out as from a small image."""
    import tracemalloc

    from PIL import Image, ImageDraw

    def drawn(size, scale):
        image = Image.new("L", size, 255)
        ImageDraw.Draw(image).rectangle((1800 // scale, 800 // scale, 2600 // scale, 3200 // scale), fill=0)
        return image

    path = tmp_path / "scan.png"
    drawn((6000, 4000), 1).save(path, compress_level=1)  # mostly white: a small, quick file
    tracemalloc.start()
    try:
        with Image.open(path) as image:
            frame = predict.to_mnist_format(image, invert=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40e6, f"{peak / 1e6:.0f} MB of working arrays"
    small = predict.to_mnist_format(drawn((600, 400), 10), invert=True)
    assert frame.shape == (28, 28)
    # The same bar, up to a pixel of shift (centring rounds the centre of mass).
    assert min(np.abs(np.roll(frame, (dy, dx), axis=(0, 1)) - small).mean()
               for dy in (-1, 0, 1) for dx in (-1, 0, 1)) < 0.02
