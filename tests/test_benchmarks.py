"""The benchmark suite's machinery on tiny data (its numbers are measured by
`python -m benchmarks.run`, never by tests), and the GPU check's refusal without a GPU."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import accuracy, end_to_end, op_cases, run, time_to_accuracy
from helpers import write_synthetic_mnist
from lenet_fast import data, ops

ROOT = Path(__file__).resolve().parents[1]


def test_end_to_end_rows_and_reports(tmp_path):
    write_synthetic_mnist(tmp_path, n_train=256, n_test=64)
    train_set, test_set = data.load("mnist", tmp_path, download=False)
    device = torch.device("cpu")
    rows = [end_to_end.run(c, train_set, test_set, epochs=1, device=device, data_root=tmp_path)
            for c in end_to_end.contenders(device, {"ext"} & set(run.fast_backends(device)))
            if c.compile_mode is None]
    names = [r["name"] for r in rows]
    assert names[:2] == ["stock eager", "stock eager + fused SGD"] and "stock eager, seed DataLoader" in names
    for r in rows:
        assert r["best_epoch_seconds"] > 0 and r["images_per_second"] > 0 and 0 <= r["test_accuracy"] <= 1
        r["speedup_vs_stock_eager"] = rows[0]["best_epoch_seconds"] / r["best_epoch_seconds"]
    result = {"date": "today", "command": "test", "fast_backends": [], "end_to_end": rows, "end_to_end_data": "synthetic",
              "machine": {"device": "cpu", "device_name": "test cpu", "threads": 1, "versions": {"torch": "x", "triton": "y"}}}
    run.write_markdown(result, tmp_path / "results.md")
    run.plot(result, tmp_path / "speedup.png")
    assert "| stock eager |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "speedup.png").read_bytes()[:4] == b"\x89PNG"
    json.dumps(result)


def test_same_seed_gives_stock_and_lenet_fast_torch_the_same_training():
    """The benchmark's fairness rests on this: equal init and batches -> equal accuracy."""
    g = torch.Generator().manual_seed(0)
    split = data.DeviceData(torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g))
    stock = end_to_end.run(end_to_end.Contender("stock eager"), split, split, epochs=1, device=torch.device("cpu"))
    ours = end_to_end.run(end_to_end.Contender("lenet_fast torch", backend="torch"), split, split, epochs=1,
                          device=torch.device("cpu"))
    fused = end_to_end.run(end_to_end.Contender("stock eager + fused SGD", fused_optimizer=True), split, split,
                           epochs=1, device=torch.device("cpu"))
    assert stock["test_accuracy"] == ours["test_accuracy"] == fused["test_accuracy"]


def test_seed_moves_every_contender_alike():
    """`benchmarks.run --seed`: another seed gives other initial weights and batch order,
    and stock and lenet_fast still start and train identically under it."""
    g = torch.Generator().manual_seed(3)
    split = data.DeviceData(torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g))
    device = torch.device("cpu")
    stock, ours = end_to_end.Contender("stock eager"), end_to_end.Contender("lenet_fast torch", backend="torch")
    w5 = stock.make_model(device, 5).conv1.weight
    assert torch.equal(w5, ours.make_model(device, 5).conv1.weight)
    assert not torch.equal(w5, stock.make_model(device).conv1.weight)
    runs = [end_to_end.Run(c, split, split, epochs=1, device=device, seed=5) for c in (stock, ours)]
    orders = [next(iter(r.batches_of(0)))[1] for r in runs]
    assert torch.equal(orders[0], orders[1])
    assert not torch.equal(orders[0], next(iter(end_to_end.Run(stock, split, split, epochs=1, device=device)
                                               .batches_of(0)))[1])
    for r in runs:
        for _ in r.epoch(0):
            pass
    assert all(torch.equal(p, q) for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()))
    assert run.parse_args(["--seed", "5"]).seed == 5 and run.parse_args([]).seed == end_to_end.SEED


def test_interleaved_runs_train_exactly_as_runs_alone():
    """Slicing epochs and taking turns must change the timing only, never the training."""
    g = torch.Generator().manual_seed(1)
    split = data.DeviceData(torch.randn(200, 1, 28, 28, generator=g), torch.randint(0, 10, (200,), generator=g))
    contenders = [end_to_end.Contender("stock eager"), end_to_end.Contender("lenet_fast torch", backend="torch")]
    device = torch.device("cpu")
    runs = [end_to_end.Run(c, split, split, epochs=2, device=device) for c in contenders]
    for epoch in range(2):
        end_to_end.interleave(runs, epoch, segments=3)  # 4 batches per epoch: slices of 2 and 2
    for r, c in zip(runs, contenders):
        alone = end_to_end.Run(c, split, split, epochs=2, device=device)
        for epoch in range(2):
            for _ in alone.epoch(epoch):
                pass
        assert len(r.epoch_seconds) == 2 and r.images == alone.images == 200
        assert all(torch.equal(p, q) for p, q in zip(r.model.parameters(), alone.model.parameters()))


def test_cuda_rows_compare_graphs_with_graphs():
    """On CUDA the table holds stock PyTorch with the same whole-step CUDA graph as lenet_fast's
    default, each lenet_fast backend graphed (its default) and eager, triton's op-by-op step
    graphed, and every torch.compile mode; on the CPU, no graph rows."""
    cuda = {c.name: c for c in end_to_end.contenders(torch.device("cuda"), {"ext", "triton"})}
    stock_graph = cuda[end_to_end.STOCK_GRAPH]
    assert stock_graph.cuda_graph and stock_graph.backend is None and stock_graph.fused_optimizer
    assert list(cuda)[:3] == ["stock eager", "stock eager + fused SGD", end_to_end.STOCK_GRAPH]
    assert [n for n, c in cuda.items() if c.default_path] == ["lenet_fast ext + CUDA graph",
                                                               "lenet_fast triton + CUDA graph"]
    assert {"lenet_fast ext, eager", "lenet_fast triton, eager", "torch.compile reduce-overhead",
            "torch.compile max-autotune-no-cudagraphs"} <= set(cuda)
    # What the triton four-launch step is worth: the op-by-op step under the same graph.
    op_by_op = cuda["lenet_fast triton op by op + CUDA graph"]
    assert op_by_op.cuda_graph and not op_by_op.fused_step and cuda["lenet_fast triton + CUDA graph"].fused_step
    cpu = end_to_end.contenders(torch.device("cpu"), {"ext"})
    assert not any(c.cuda_graph for c in cpu) and [c.name for c in cpu if c.default_path] == ["lenet_fast ext"]


def test_graphed_rows_train_every_batch_like_their_eager_twins():
    """A graph row's logic (run eagerly on the CPU's static buffers) trains every batch,
    the smaller last one included, to the eager row's parameters."""
    g = torch.Generator().manual_seed(4)
    split = data.DeviceData(torch.randn(150, 1, 28, 28, generator=g), torch.randint(0, 10, (150,), generator=g))
    device = torch.device("cpu")
    graphed = end_to_end.Run(end_to_end.Contender(end_to_end.STOCK_GRAPH, cuda_graph=True), split, split, epochs=1,
                             device=device)
    eager = end_to_end.Run(end_to_end.Contender("stock eager + fused SGD", fused_optimizer=True), split, split,
                           epochs=1, device=device)
    for r in (graphed, eager):
        for _ in r.epoch(0):
            pass
    assert graphed.step.graphed is not None and graphed.step.graphed.batch_sizes == [64, 22]
    assert graphed.images == eager.images == 150 and graphed.steps_done == 3
    assert all(torch.equal(p, q) for p, q in zip(graphed.model.parameters(), eager.model.parameters()))


def test_benchmark_command_end_to_end_on_tiny_mnist(tmp_path, monkeypatch):
    """`python -m benchmarks.run --skip ops` on a tiny MNIST: every row lands in results.json
    and results.md as it finishes (the files are rewritten after each row), with its ratios."""
    write_synthetic_mnist(tmp_path / "data", n_train=130, n_test=64)
    monkeypatch.setattr(end_to_end, "contenders", lambda device, available: [
        end_to_end.Contender("stock eager"), end_to_end.Contender("lenet_fast torch", backend="torch"),
        end_to_end.Contender("torch.compile", compile_mode="default")])
    monkeypatch.setattr(end_to_end, "run_capped", lambda contender, **kw: {
        "name": contender.name, "backend": "stock", "epochs": 1, "cut_after_seconds": kw["limit_seconds"]})
    out = tmp_path / "out"
    assert run.main(["--device", "cpu", "--skip", "ops", "--threads", str(torch.get_num_threads()),
                     "--data-dir", str(tmp_path / "data"), "--out", str(out), "--compile-timeout", "5"]) == 0
    rows = json.loads((out / "results.json").read_text())["end_to_end"]
    assert [r["name"] for r in rows] == ["stock eager", "lenet_fast torch", "torch.compile"]
    assert rows[0]["speedup_vs_stock_eager"] == 1.0 and rows[1]["speedup_vs_stock_eager"] > 0
    assert rows[2]["cut_after_seconds"] == 5
    text = (out / "results.md").read_text()
    assert "| lenet_fast torch |" in text and "| torch.compile | cut after 5 s |" in text


def test_capped_row_runs_in_a_child_and_is_cut_at_its_limit(tmp_path):
    write_synthetic_mnist(tmp_path, n_train=128, n_test=64)
    device = torch.device("cpu")
    stock = end_to_end.Contender("stock eager")
    row = end_to_end.run_capped(stock, epochs=1, device=device, data_root=tmp_path, seed=0, limit_seconds=300)
    assert row["name"] == "stock eager" and row["images_per_second"] > 0 and 0 <= row["test_accuracy"] <= 1
    started = time.perf_counter()
    cut = end_to_end.run_capped(stock, epochs=1, device=device, data_root=tmp_path, seed=0, limit_seconds=0.2)
    assert cut == {"name": "stock eager", "backend": "stock", "epochs": 1, "cut_after_seconds": 0.2}
    assert time.perf_counter() - started < 30
    result = {"date": "today", "command": "test", "fast_backends": [], "end_to_end_data": "synthetic",
              "end_to_end": [{**row, "speedup_vs_stock_eager": 1.0}, cut],
              "machine": {"device": "cpu", "device_name": "test cpu", "threads": 1,
                          "versions": {"torch": "x", "triton": "y"}}}
    run.write_markdown(result, tmp_path / "results.md")
    text = (tmp_path / "results.md").read_text()
    assert "| stock eager | cut after 0.2 s |" in text and "vs stock + CUDA graph" in text
    run.plot(result, tmp_path / "speedup.png")


def test_op_cases_cover_every_op_and_run():
    assert {c.op for c in op_cases.CASES} <= set(ops.OPS)
    for case in op_cases.CASES:
        inputs = case.make_inputs(2, torch.device("cpu"))
        for runner in op_cases.runners(case.fused("torch"), inputs).values():
            runner()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_check_refuses_clearly_without_a_gpu(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 2
    assert "no usable CUDA GPU" in result.stdout
    assert "no usable CUDA GPU" in (tmp_path / "out" / "summary.txt").read_text()


def test_compiled_contender_compiles_every_batch_shape_before_the_timed_epoch():
    """torch.compile's (re)compilation belongs in the warm-up column, never in the epoch:
    the smaller last batch must be compiled during warm-up too."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(2)
    split = data.DeviceData(torch.randn(200, 1, 28, 28, generator=g), torch.randint(0, 10, (200,), generator=g))
    assert len(split) % end_to_end.BATCH_SIZE != 0  # a smaller last batch, as in MNIST
    torch._dynamo.reset()
    counters.clear()
    r = end_to_end.Run(end_to_end.Contender("torch.compile", compile_mode="default"), split, split, epochs=1,
                       device=torch.device("cpu"))
    compiled = counters["stats"]["unique_graphs"]
    for _ in r.epoch(0):
        pass
    assert compiled > 0 and counters["stats"]["unique_graphs"] == compiled
    torch._dynamo.reset()


def test_accuracy_parity_seeds_parse_and_refuse_clearly():
    assert accuracy.parse_seeds("0-3,9") == [0, 1, 2, 3, 9] and accuracy.parse_seeds("7") == [7]
    for bad in ("x", "3-1", "1,1", "-1", ""):
        with pytest.raises(Exception, match="--seeds"):
            accuracy.parse_seeds(bad)
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--epochs", "0"])


def test_accuracy_parity_summary_pairs_each_row_with_each_stock_reference():
    acc = {"stock": [0.9800, 0.9900, 0.9850], "stock fused": [0.9810, 0.9900, 0.9845],
           "ext": [0.9780, 0.9916, 0.9850]}
    pairs = {(p["row"], p["reference"]): p for p in accuracy.summarize(acc, ["stock", "stock fused"], bar=0.15)}
    assert set(pairs) == {("stock fused", "stock"), ("ext", "stock"), ("ext", "stock fused")}
    ext = pairs[("ext", "stock")]
    assert ext["diff_points"] == pytest.approx([-0.20, 0.16, 0.0], abs=1e-9)
    assert ext["mean"] == pytest.approx(-0.04 / 3) and ext["max_abs"] == pytest.approx(0.20)
    assert ext["seeds_over_bar"] == 2 and ext["sd"] == pytest.approx(0.18036999011291582)
    assert pairs[("ext", "stock fused")]["seeds_over_bar"] == 2  # -0.30, +0.16, +0.05
    assert pairs[("stock fused", "stock")]["seeds_over_bar"] == 0
    exactly_the_bar = accuracy.summarize({"stock": [0.9833], "ext": [0.9848]}, ["stock"], bar=0.15)[0]
    assert exactly_the_bar["diff_points"] == [0.15] and exactly_the_bar["seeds_over_bar"] == 0


def test_accuracy_parity_command_on_tiny_mnist(tmp_path, capsys):
    write_synthetic_mnist(tmp_path / "data", n_train=128, n_test=64)
    out = tmp_path / "out"
    threads = str(torch.get_num_threads())  # the command sets the process's thread count: leave it as it was
    assert accuracy.main(["--device", "cpu", "--seeds", "3,5", "--threads", threads, "--data-dir",
                          str(tmp_path / "data"), "--out", str(out)]) == 0
    result = json.loads((out / "accuracy.json").read_text())
    assert result["seeds"] == [3, 5] and list(result["accuracy"])[:2] == ["stock eager", "stock eager + fused SGD"]
    assert all(len(v) == 2 and all(0 <= a <= 1 for a in v) for v in result["accuracy"].values())
    assert "| stock eager + fused SGD | stock eager |" in (out / "accuracy.md").read_text()
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as exc:  # no MNIST: an error, never accuracy on random data
        accuracy.main(["--device", "cpu", "--seeds", "0", "--threads", threads, "--data-dir", str(tmp_path / "nothing"),
                       "--out", str(out)])
    assert exc.value.code == 2 and "--data-dir" in capsys.readouterr().err


def test_time_to_accuracy_contenders_per_device():
    cuda = [c.name for c in time_to_accuracy.contenders(torch.device("cuda"), ["ext", "triton"])]
    assert cuda == ["stock eager", end_to_end.STOCK_GRAPH, "lenet_fast ext + CUDA graph",
                    "lenet_fast triton + CUDA graph", "torch.compile reduce-overhead"]
    cpu = time_to_accuracy.contenders(torch.device("cpu"), ["ext"])
    assert [c.name for c in cpu] == ["stock eager", "lenet_fast ext", "torch.compile"]
    assert cpu[-1].compile_mode == "default"
    other = time_to_accuracy.contenders(torch.device("cpu"), [], compile_mode="max-autotune")
    assert other[-1].name == "torch.compile max-autotune" and other[-1].compile_mode == "max-autotune"


def test_time_to_accuracy_on_tiny_mnist(tmp_path, capsys):
    write_synthetic_mnist(tmp_path / "data", n_train=512, n_test=64)
    out = tmp_path / "out"
    ours = "lenet_fast ext" if "ext" in run.fast_backends(torch.device("cpu")) else None
    names = ",".join(["stock eager"] + ([ours] if ours else []))
    common = ["--device", "cpu", "--threads", str(torch.get_num_threads()), "--data-dir", str(tmp_path / "data"),
              "--contenders", names, "--max-epochs", "4", "--out", str(out)]
    assert time_to_accuracy.main([*common, "--seeds", "0,1", "--target", "0.5"]) == 0
    rows = json.loads((out / "time_to_accuracy.json").read_text())
    assert len(rows) == 2 * len(names.split(","))
    for row in rows:
        assert {"contender", "seed", "target", "reached", "seconds", "epochs", "test_accuracy"} <= set(row)
        assert row["reached"] and row["test_accuracy"] >= 0.5 and row["seconds"] > 0 and 0 < row["epochs"] <= 4
        # evaluated every quarter epoch (8 batches of 64: slices of 2), and stopped at the first hit
        assert [p[1] for p in row["curve"]] == pytest.approx([i / 4 for i in range(1, len(row["curve"]) + 1)])
        assert all(p[2] < 0.5 for p in row["curve"][:-1]) and row["curve"][-1][2] == row["test_accuracy"]
        assert all(a[0] < b[0] for a, b in zip(row["curve"], row["curve"][1:]))  # the clock only moves on
    text = (out / "time_to_accuracy.md").read_text()
    assert "| stock eager | 2/2 |" in text and "Command: `python -m benchmarks.time_to_accuracy" in text
    if ours:
        assert f"| {ours} | 2/2 |" in text
    assert (out / "time_to_accuracy.png").read_bytes()[:4] == b"\x89PNG"

    # A target not reached in time (one epoch here): the contender trains all its epochs and says so.
    assert time_to_accuracy.main([*common, "--seeds", "0", "--target", "0.99", "--contenders", "stock eager",
                                  "--max-epochs", "1"]) == 0
    (row,) = json.loads((out / "time_to_accuracy.json").read_text())
    assert not row["reached"] and row["epochs"] == 1 and len(row["curve"]) == 4
    assert "(not reached)" in (out / "time_to_accuracy.md").read_text()

    # No MNIST: a clear error and exit 2, never a target "reached" on random data.
    with pytest.raises(SystemExit) as exc:
        time_to_accuracy.main([*common[:5], str(tmp_path / "nothing"), "--out", str(out)])
    assert exc.value.code == 2 and "means nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        time_to_accuracy.main([*common, "--contenders", "stock eager,nope"])
    assert exc.value.code == 2 and "--contenders: unknown ['nope']" in capsys.readouterr().err
    for bad in (["--target", "1.5"], ["--max-epochs", "0"], ["--evals-per-epoch", "0"]):
        with pytest.raises(SystemExit):
            time_to_accuracy.parse_args(bad)
