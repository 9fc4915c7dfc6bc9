"""lenet_fast.checkpoint: the checkpoint schema (checked once, on load), strict JSON,
atomic writes with unique temporary names, and the run-folder lock."""

import json
import os

import pytest
import torch

from helpers import assert_one_error_line, run_main, train_args, write_synthetic_mnist
from lenet_fast import checkpoint, evaluate, predict
from lenet_fast import train as train_module


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    return write_synthetic_mnist(tmp_path_factory.mktemp("data"), n_train=64, n_test=32)


@pytest.fixture(scope="module")
def good_checkpoint(dataset_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train_module.main([str(a) for a in train_args(dataset_root, out)]) == 0
    return out / "checkpoint.pt"


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _set(path, value):
    """A mutation that sets state[path[0]][path[1]]... to value (None: deletes it)."""
    def mutate(state):
        *parents, last = path
        for key in parents:
            state = state[key]
        if value is None:
            del state[last]
        else:
            state[last] = value(state[last]) if callable(value) else value

    return mutate


# (mutation, what the message says); the first group is refused by every tool, the second
# (what only continuing the training needs) by `train --resume`.
MALFORMED_FOR_ALL = {
    "wrong-shape": (_set(["model", "conv1.weight"], torch.zeros(6, 1, 5, 5)),
                    "model conv1.weight has shape (6, 1, 5, 5), expected (6, 1, 3, 3)"),
    "missing-key": (_set(["model", "fc3.bias"], None), "its model is not this LeNet (missing fc3.bias)"),
    "other-architecture": (_set(["model"], torch.nn.Linear(3, 2).state_dict()),
                           "its model is not this LeNet (missing conv1.weight"),
    "no-config": (_set(["config"], None), "its config (the run's options) is NoneType, expected a dict"),
    "model-is-a-list": (_set(["model"], lambda m: list(m.values())), "its model is a list"),
    "batch-size-0": (_set(["config", "batch_size"], 0), "config batch_size is 0, expected a positive integer"),
    "nan-weights": (_set(["model", "fc1.bias"], torch.full((120,), float("nan"))), "model fc1.bias holds non-finite"),
    "config-is-a-list": (_set(["config"], ["mnist"]), "its config (the run's options) is list"),
    "unknown-dataset": (_set(["config", "dataset"], "cifar10"), "config dataset is 'cifar10'"),
}
MALFORMED_FOR_RESUME = {
    "no-lr": (_set(["config", "lr"], None), "its config has no lr"),
    "seed-too-large": (_set(["config", "seed"], 100000000000000), "config seed is 100000000000000"),
    "optimizer-buffer-shape": (_set(["optimizer", "state", 0, "momentum_buffer"], torch.zeros(3)),
                               "optimizer momentum_buffer of conv1.weight has shape (3,)"),
    "adam-state-for-sgd": (_set(["optimizer", "state", 0], {"step": torch.tensor(1.0), "exp_avg": torch.zeros(6, 1, 3, 3),
                                                            "exp_avg_sq": torch.zeros(6, 1, 3, 3)}),
                           "optimizer state for conv1.weight is not sgd's"),
    "optimizer-weight-decay": (_set(["optimizer", "param_groups", 0, "weight_decay"], 0.5),
                               "its optimizer's weight_decay is 0.5"),
    "optimizer-is-a-list": (_set(["optimizer"], []), "its optimizer entry is not an optimizer state_dict"),
    "no-history": (_set(["history"], None), "its history does not list the 2 epochs"),
    "epoch-past-the-end": (_set(["epoch"], 7), "its epoch is 7, expected 0 to 2"),
    "step-without-partial": (_set(["step"], 3), "its step is 3 but it holds no partial epoch"),
    "rng-state": (_set(["rng_cpu"], torch.zeros(3, dtype=torch.uint8)), "its rng_cpu is not"),
}


def _malformed(good_checkpoint, tmp_path, mutate):
    state = torch.load(good_checkpoint, weights_only=True)
    mutate(state)
    path = tmp_path / "malformed.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("case", list(MALFORMED_FOR_ALL) + list(MALFORMED_FOR_RESUME))
def test_train_resume_refuses_a_malformed_checkpoint_with_one_line(case, good_checkpoint, dataset_root, tmp_path, capsys):
    mutate, message = {**MALFORMED_FOR_ALL, **MALFORMED_FOR_RESUME}[case]
    path = _malformed(good_checkpoint, tmp_path, mutate)
    code, _, err = run_main(train_module.main, ["--resume", path, "--data-dir", dataset_root, "--no-progress"], capsys)
    assert_one_error_line(code, err, "train", f"{path} is not a usable lenet_fast checkpoint: ", message)


@pytest.mark.parametrize("case", list(MALFORMED_FOR_ALL))
def test_evaluate_and_predict_refuse_a_malformed_checkpoint_with_one_line(case, good_checkpoint, dataset_root,
                                                                          tmp_path, capsys):
    from PIL import Image

    path = _malformed(good_checkpoint, tmp_path, MALFORMED_FOR_ALL[case][0])
    message = MALFORMED_FOR_ALL[case][1]
    code, _, err = run_main(evaluate.main, ["--checkpoint", path, "--data-dir", dataset_root, "--device", "cpu"], capsys)
    assert_one_error_line(code, err, "evaluate", message)
    Image.new("L", (28, 28)).save(tmp_path / "digit.png")
    code, _, err = run_main(predict.main, ["--checkpoint", path, tmp_path / "digit.png"], capsys)
    assert_one_error_line(code, err, "predict", message)


def test_a_good_checkpoint_passes_the_schema(good_checkpoint):
    state = checkpoint.load(good_checkpoint, resumable=True)
    assert (state["epoch"], state["step"], state["partial"]) == (2, 0, None)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_optimizer_state_of_a_cuda_graph_run_passes_the_schema(optimizer, good_checkpoint, dataset_root, tmp_path,
                                                                   capsys):
    """A graphed run holds its learning rate in a tensor (and its Adam is capturable); the
    schema leaves both to the run that resumes, which sets them itself."""
    from lenet_fast.model import LeNet
    from lenet_fast.optim import make_optimizer
    from lenet_fast.training import lr_holder, train_step

    state = torch.load(good_checkpoint, weights_only=True)
    model = LeNet(backend="torch")
    model.load_state_dict(state["model"])
    lr = train_module.DEFAULT_LR[optimizer]
    graphed = make_optimizer(model.parameters(), optimizer, lr_holder(lr, "cpu", True), state["config"]["weight_decay"])
    train_step(model, graphed, torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]))
    state["config"].update(optimizer=optimizer, lr=lr)
    state["optimizer"] = graphed.state_dict()
    torch.save(state, tmp_path / "graphed.pt")
    assert checkpoint.load(tmp_path / "graphed.pt", resumable=True)["config"]["optimizer"] == optimizer
    code, _, err = run_main(train_module.main, ["--resume", tmp_path / "graphed.pt", "--data-dir", dataset_root,
                                                "--no-progress"], capsys)
    assert code == 0, err


def test_a_folder_given_as_checkpoint_says_so(good_checkpoint, tmp_path, capsys):
    code, _, err = run_main(evaluate.main, ["--checkpoint", good_checkpoint.parent], capsys)
    assert_one_error_line(code, err, "evaluate", f"checkpoint {good_checkpoint.parent} is a folder",
                          f"did you mean {good_checkpoint}?")
    code, _, err = run_main(evaluate.main, ["--checkpoint", tmp_path], capsys)
    assert_one_error_line(code, err, "evaluate", f"checkpoint {tmp_path} is a folder, not a checkpoint file")
    assert "does not exist" not in err


def test_json_is_strict_with_null_for_non_finite_numbers(tmp_path):
    path = tmp_path / "metrics.json"
    checkpoint.write_json({"loss": float("nan"), "history": [{"a": float("inf"), "b": 1.5}], "n": -float("inf")}, path)
    assert _strict_json(path.read_text()) == {"loss": None, "history": [{"a": None, "b": 1.5}], "n": None}


def test_two_trainers_on_one_folder_the_second_says_who_holds_it(dataset_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    loaded = []
    monkeypatch.setattr(train_module.data, "load", lambda *a, **k: loaded.append(1))
    with checkpoint.RunFolder(out):  # the first trainer
        code, _, err = run_main(train_module.main, train_args(dataset_root, out), capsys)
    assert_one_error_line(code, err, "train", f"--out {out} is in use by lenet_fast.train (pid {os.getpid()} on ")
    assert not loaded, "the second trainer loaded data"


def test_the_lock_is_released_and_a_new_empty_folder_removed(tmp_path):
    with pytest.raises(RuntimeError), checkpoint.RunFolder(tmp_path / "a" / "b"):
        raise RuntimeError("the run failed before writing anything")
    assert not (tmp_path / "a").exists()
    with checkpoint.RunFolder(tmp_path / "c") as out:
        (out / "metrics.json").write_text("{}")
    with checkpoint.RunFolder(tmp_path / "c"):  # free again
        pass
    assert (tmp_path / "c" / "metrics.json").exists()


def test_concurrent_writes_of_one_file_use_unique_temporary_names(tmp_path, monkeypatch):
    """Another trainer's save of the same file, interleaved in the middle of this one's:
    with a shared temporary name, one of them renames the other's file away."""
    import matplotlib.figure

    savefig = matplotlib.figure.Figure.savefig
    depth = []

    def interleaved(self, *args, **kwargs):
        savefig(self, *args, **kwargs)
        if not depth:
            depth.append(1)
            train_module.plot_curves(history, tmp_path / "curves.png")  # the other writer, in between

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interleaved)
    history = [{"epoch": 1, "train_loss": 1.0, "test_loss": 1.0, "train_accuracy": 0.5, "test_accuracy": 0.5}]
    train_module.plot_curves(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_temporaries_left_by_a_killed_run_are_removed(dataset_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".checkpoint.pt.k9x2ab.tmp", out / ".metrics.json.zz81qq.tmp", out / ".curves.png.tmp.png"]
    for path in stale:
        path.write_bytes(b"half a file")
    keep = out / "notes.txt"
    keep.write_text("mine")
    code, _, err = run_main(train_module.main, train_args(dataset_root, out, "--epochs", 1), capsys)
    assert code == 0, err
    assert not any(path.exists() for path in stale) and keep.exists()
