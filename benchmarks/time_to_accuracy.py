"""Seconds of training to reach a test accuracy: `python -m benchmarks.time_to_accuracy
[--device cpu|cuda] [--target 0.99] [--seeds 0-2] [--max-epochs 8] [--out DIR]`

What users of an MNIST speed run compare: how long each contender trains before its
test accuracy first reaches --target.  Every contender trains the same LeNet with the
default recipe of `python -m lenet_fast.train` (SGD with Nesterov momentum and weight
decay, batch 64, cosine schedule over --max-epochs, the same seed's initial weights
and batches):
stock eager, stock with the same whole-step CUDA graph as lenet_fast's (on CUDA),
torch.compile's best measured mode, and each lenet_fast backend on its default path.
They train interleaved, a slice each in turn, so a machine whose pace drifts moves
them alike.  The test set is evaluated after every slice (--evals-per-epoch, default
every quarter epoch), outside the clock: the clock is the training loop alone,
synchronised with the device, without warm-up (compilation, graph capture), which
is reported beside it.  A contender stops when it reaches the target.

Writes into --out (default benchmarks/results/<device>/): time_to_accuracy.json (a
list of rows {contender, seed, target, reached, seconds, epochs, test_accuracy, ...}),
time_to_accuracy.md (the table, with machine and command) and time_to_accuracy.png
(test accuracy against training seconds, one line per contender and seed).
Refuses to run without MNIST: an accuracy target on random data means nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from benchmarks import end_to_end
from benchmarks.accuracy import parse_seeds
from benchmarks.run import fast_backends, load_real_mnist, prepare
from lenet_fast import cli, data
from lenet_fast.train import DEFAULT_LR, DEFAULTS, evaluate

PROG = "benchmarks.time_to_accuracy"
# torch.compile's mode with the shortest measured epoch per device type (benchmarks/results/
# <device>/results.json; on the CPU the only mode that does not target GPUs).
BEST_COMPILE_MODE = {"cpu": "default", "cuda": "reduce-overhead"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--target", type=float, default=0.99, help="test accuracy to reach, as a fraction (default 0.99)")
    p.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0-2"), help="seeds, e.g. 0-2 or 0,3,7")
    p.add_argument("--max-epochs", type=int, default=DEFAULTS["epochs"],
                   help="the schedule's length and the most a contender trains (default %(default)s, "
                        "lenet_fast.train's)")
    p.add_argument("--evals-per-epoch", type=int, default=4, help="test-set evaluations per epoch (default 4)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the compiled contender (default: the best measured for the device, "
                        f"{BEST_COMPILE_MODE})")
    p.add_argument("--contenders", default=None,
                   help="comma-separated contender names to run (default: all of them)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--data-dir", default=None, help="torchvision root with MNIST (default $LENET_FAST_DATA)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    args = p.parse_args(argv)
    if not 0 < args.target <= 1:
        p.error(f"--target: expected a fraction in (0, 1], got {args.target}")
    for name in ("max_epochs", "evals_per_epoch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected at least 1, got {getattr(args, name)}")
    return args


def contenders(device: torch.device, names: list[str], compile_mode: str | None = None) -> list[end_to_end.Contender]:
    """Stock eager, stock + CUDA graph (CUDA), each lenet_fast backend's default path, and
    torch.compile in `compile_mode` (default: the best measured on this device type)."""
    mode = compile_mode or BEST_COMPILE_MODE[device.type]
    rows = [c for c in end_to_end.contenders(device, set(names))
            if c.name in ("stock eager", end_to_end.STOCK_GRAPH) or c.default_path]
    compiled = next((c for c in end_to_end.contenders(device, set()) if c.compile_mode == mode), None)
    if compiled is None:
        compiled = end_to_end.Contender(f"torch.compile {mode}", compile_mode=mode)
    return rows + [compiled]


def race(runs: list[end_to_end.Run], *, seed: int, target: float, epochs: int, evals_per_epoch: int,
         test_set: data.DeviceData) -> list[dict]:
    """Train `runs` interleaved until each reaches `target` or ends its epochs; one row each."""
    curves: dict[int, list[list[float]]] = {id(r): [] for r in runs}
    reached: dict[int, bool] = {id(r): False for r in runs}

    def evaluate_and_stop(r: end_to_end.Run) -> bool:
        _, accuracy, _ = evaluate(r.model, test_set)  # outside the clock: Run times only its slices
        r.model.train()
        curves[id(r)].append([r.train_seconds, r.steps_done / r.steps_per_epoch, accuracy])
        reached[id(r)] = accuracy >= target
        return reached[id(r)]

    for epoch in range(epochs):
        end_to_end.interleave([r for r in runs if not reached[id(r)]], epoch, evals_per_epoch, evaluate_and_stop)
    rows = []
    for r in runs:
        seconds, epochs_done, accuracy = curves[id(r)][-1]
        rows.append({"contender": r.contender.name, "seed": seed, "target": target, "reached": reached[id(r)],
                     "seconds": seconds, "epochs": epochs_done, "test_accuracy": accuracy,
                     "warmup_seconds": r.warmup_seconds, "curve": curves[id(r)]})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per contender over the seeds: how many reached the target, median seconds and epochs,
    and the time ratio to each stock reference per seed (reference seconds / contender seconds)."""
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        by_name.setdefault(row["contender"], []).append(row)
    summary = []
    for name, runs in by_name.items():
        hit = [r for r in runs if r["reached"]]
        entry = {"contender": name, "seeds": len(runs), "reached": len(hit),
                 "median_seconds": statistics.median(r["seconds"] for r in hit) if hit else None,
                 "median_epochs": statistics.median(r["epochs"] for r in hit) if hit else None,
                 "median_warmup_seconds": statistics.median(r["warmup_seconds"] for r in runs)}
        for key, reference in (("vs_stock_eager", "stock eager"), ("vs_stock_graph", end_to_end.STOCK_GRAPH)):
            ratios = [ref["seconds"] / r["seconds"] for r in hit for ref in by_name.get(reference, [])
                      if ref["seed"] == r["seed"] and ref["reached"]]
            if ratios and len(ratios) == len(runs):
                entry[key] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        summary.append(entry)
    return summary


def write_markdown(result: dict, rows: list[dict], path: Path) -> None:
    m = result["machine"]
    target = 100 * result["target"]
    lines = [
        f"# Training time to {target:g}% MNIST test accuracy: {m['device_name']}",
        "",
        f"Measured {result['date']} on {m['device_name']} ({m['device']}, {m['threads']} CPU threads), "
        f"torch {m['versions']['torch']}, triton {m['versions']['triton']}. Command: `{result['command']}`.",
        "",
        f"Seeds {result['seeds']}; lenet_fast.train's default recipe (batch {end_to_end.BATCH_SIZE}, SGD lr "
        f"{DEFAULT_LR['sgd']} with Nesterov momentum and weight decay {DEFAULTS['weight_decay']}, cosine schedule "
        f"over {result['max_epochs']} epochs); test set evaluated {result['evals_per_epoch']} times per "
        "epoch, outside the clock. Seconds = the training loop alone, until the first evaluation at or above the "
        "target; warm-up (compilation, graph capture) is not in them. Ratios are per seed (reference seconds / "
        "contender seconds), median (min-max), given when every seed of both reached the target.",
        "",
        "| contender | reached | median seconds | median epochs | vs stock eager | vs stock + CUDA graph "
        "| warm-up (s) | seconds per seed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def ratio(entry, key):
        r = entry.get(key)
        return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})" if r else "-"

    for entry in result["summary"]:
        per_seed = ", ".join(f"{r['seed']}: {r['seconds']:.2f}" + ("" if r["reached"] else " (not reached)")
                             for r in rows if r["contender"] == entry["contender"])
        seconds = f"{entry['median_seconds']:.2f}" if entry["median_seconds"] is not None else "-"
        epochs = f"{entry['median_epochs']:.2f}" if entry["median_epochs"] is not None else "-"
        lines.append(f"| {entry['contender']} | {entry['reached']}/{entry['seeds']} | {seconds} | {epochs} | "
                     f"{ratio(entry, 'vs_stock_eager')} | {ratio(entry, 'vs_stock_graph')} | "
                     f"{entry['median_warmup_seconds']:.1f} | {per_seed} |")
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {}
    for row in rows:
        colour = colours.setdefault(row["contender"], f"C{len(colours)}")
        seconds = [point[0] for point in row["curve"]]
        accuracy = [100 * point[2] for point in row["curve"]]
        first = row["seed"] == result["seeds"][0]
        ax.plot(seconds, accuracy, "o-" if first else "-", color=colour, ms=3, lw=1.5 if first else 0.7,
                alpha=1 if first else 0.5, label=row["contender"] if first else None)
    ax.axhline(100 * result["target"], color="black", ls="--", lw=0.8)
    ax.set_xscale("log")
    lowest = min((100 * p[2] for r in rows for p in r["curve"]), default=90.0)
    ax.set_ylim(max(90.0, lowest - 0.3), 100)
    ax.set(xlabel="training seconds (log scale; evaluation and warm-up excluded)", ylabel="test accuracy (%)",
           title=f"Time to {100 * result['target']:g}% on {result['machine']['device_name']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, out, header = prepare(PROG, args, argv)
    train_set, test_set = load_real_mnist(PROG, args.data_dir, device)
    chosen = contenders(device, fast_backends(device), args.compile_mode)
    if args.contenders is not None:
        wanted = [name.strip() for name in args.contenders.split(",")]
        unknown = sorted(set(wanted) - {c.name for c in chosen})
        if unknown:
            cli.fail(PROG, f"--contenders: unknown {unknown}; choose from {[c.name for c in chosen]}")
        chosen = [c for c in chosen if c.name in wanted]
    result = {**header, "target": args.target, "seeds": args.seeds, "max_epochs": args.max_epochs,
              "evals_per_epoch": args.evals_per_epoch, "contenders": [c.name for c in chosen]}
    print(f"{PROG}: {header['machine']['device_name']}, target {100 * args.target:g}%, seeds {args.seeds}, "
          f"contenders {result['contenders']}", flush=True)
    rows: list[dict] = []
    for seed in args.seeds:
        runs = [end_to_end.Run(c, train_set, test_set, epochs=args.max_epochs, device=device, seed=seed,
                               weight_decay=DEFAULTS["weight_decay"]) for c in chosen]
        for row in race(runs, seed=seed, target=args.target, epochs=args.max_epochs,
                        evals_per_epoch=args.evals_per_epoch, test_set=test_set):
            rows.append(row)
            print(f"seed {seed}  {row['contender']:36} {'reached' if row['reached'] else 'NOT reached'} "
                  f"{100 * row['test_accuracy']:.2f}% after {row['seconds']:7.2f} s ({row['epochs']:.2f} epochs; "
                  f"warm-up {row['warmup_seconds']:.1f} s)", flush=True)
        del runs
        result["summary"] = summarize(rows)  # saved after every seed: a run cut short keeps what it measured
        (out / "time_to_accuracy.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / "time_to_accuracy_summary.json").write_text(json.dumps(result, indent=2) + "\n")
        write_markdown(result, rows, out / "time_to_accuracy.md")
        plot(result, rows, out / "time_to_accuracy.png")
    print(f"{PROG}: wrote {out}/time_to_accuracy.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
