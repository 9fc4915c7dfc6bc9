"""Accuracy parity over many seeds: `python -m benchmarks.accuracy [--seeds 0-19] [--epochs 1]`

`benchmarks.run` reports test accuracy for one seed, and one seed cannot say whether
a gap between stock PyTorch and lenet_fast is systematic or rounding noise: two
float32 training runs whose kernels round differently drift apart step by step
and end a few test images apart.  This command trains the same main rows as
`benchmarks.run` (stock eager, stock eager with lenet_fast's optimizer, each
lenet_fast backend) from each of several seeds and reports, per pair of rows, the
accuracy differences over the seeds: mean, standard deviation, largest, and how
many seeds exceed --bar.  The stock-vs-stock pair (the same model and kernels,
only the optimizer's rounding apart) is the yardstick for what noise alone gives.

Writes accuracy.json, accuracy.md and accuracy.png into --out
(default benchmarks/results/<device>/).  No timing: the rows train one after another.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from benchmarks import end_to_end
from benchmarks.run import fast_backends, load_real_mnist, prepare

BAR_POINTS = 0.15  # the accuracy bar lenet_fast aims at: within this many points of stock, same seed


def parse_seeds(text: str) -> list[int]:
    """'0-19' -> 0..19; '0,3,7' -> [0, 3, 7]; ranges and lists mix: '0-3,9'."""
    seeds: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            seeds += list(range(int(first), int(last) + 1)) if dash else [int(first)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--seeds: expected numbers and ranges like 0-19 or 0,3,7, got {text!r}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds: expected distinct seeds >= 0, got {text!r}")
    return seeds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0-19"), help="seeds, e.g. 0-19 or 0,3,7")
    p.add_argument("--epochs", type=int, default=1, help="training epochs per run (default 1)")
    p.add_argument("--bar", type=float, default=BAR_POINTS, help="accuracy gap in points counted as a miss")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--data-dir", default=None, help="torchvision root with MNIST (default $LENET_FAST_DATA)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs: expected at least 1, got {args.epochs}")
    return args


def parity_contenders(device: torch.device, names: list[str]) -> list[end_to_end.Contender]:
    """benchmarks.run's main rows: those that differ in kernels or optimizer, not in feed, compiler
    or launch (a CUDA-graph row replays its eager twin's kernels on the same batches)."""
    return [c for c in end_to_end.contenders(device, set(names))
            if c.compile_mode is None and not c.seed_dataloader and not c.cuda_graph]


def summarize(accuracy: dict[str, list[float]], references: list[str], bar: float) -> list[dict]:
    """Per (row, reference) pair: the differences row - reference in points, over the seeds."""
    pairs = []
    for i, reference in enumerate(references):
        for name, values in accuracy.items():
            if name in references[:i + 1]:  # itself, or a stock row already paired with this one
                continue
            # Rounded: accuracies are counts over the test set, and a gap of exactly the bar
            # (0.9848 - 0.9833 = 0.15000000000000568 points in floats) must not count as over it.
            diffs = [round(100 * (a - b), 6) for a, b in zip(values, accuracy[reference])]
            mean = sum(diffs) / len(diffs)
            sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) if len(diffs) > 1 else 0.0
            pairs.append({"row": name, "reference": reference, "diff_points": diffs, "mean": mean, "sd": sd,
                          "standard_error": sd / math.sqrt(len(diffs)), "max_abs": max(abs(d) for d in diffs),
                          "seeds_over_bar": sum(abs(d) > bar for d in diffs)})
    return pairs


def write_markdown(result: dict, path: Path) -> None:
    m, seeds, bar = result["machine"], result["seeds"], result["bar_points"]
    names = list(result["accuracy"])
    lines = [
        f"# lenet_fast accuracy parity over seeds: {m['device_name']}",
        "",
        f"Measured {result['date']} on {m['device_name']} ({m['device']}, {m['threads']} CPU threads), "
        f"torch {m['versions']['torch']}. Command: `{result['command']}`. "
        f"MNIST test accuracy after {result['epochs']} epoch(s), batch {end_to_end.BATCH_SIZE}; "
        "every row of a seed starts from the same weights and sees the same batches.",
        "",
        "## Differences in points (row minus reference)",
        "",
        f"| row | reference | mean | sd | standard error | largest gap | seeds over {bar:.2f} |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in result["pairs"]:
        lines.append(f"| {p['row']} | {p['reference']} | {p['mean']:+.3f} | {p['sd']:.3f} | {p['standard_error']:.3f} "
                     f"| {p['max_abs']:.2f} | {p['seeds_over_bar']} of {len(seeds)} |")
    lines += ["", "## Test accuracy per seed (%)", "", "| seed | " + " | ".join(names) + " |",
              "| ---: | " + " | ".join("---:" for _ in names) + " |"]
    for i, seed in enumerate(seeds):
        lines.append(f"| {seed} | " + " | ".join(f"{100 * result['accuracy'][n][i]:.2f}" for n in names) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs, bar = result["pairs"], result["bar_points"]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(pairs) + 1.6))
    for i, p in enumerate(pairs):
        ax.scatter(p["diff_points"], [i] * len(p["diff_points"]), alpha=0.6, s=18)
        ax.plot([p["mean"]] * 2, [i - 0.3, i + 0.3], color="black", lw=1.5)
    ax.axvspan(-bar, bar, color="tab:green", alpha=0.12, label=f"within {bar:.2f} points")
    ax.axvline(0, color="black", lw=0.6)
    ax.set_yticks(range(len(pairs)), [f"{p['row']}\n- {p['reference']}" for p in pairs], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="test accuracy difference (points); one dot per seed, bar = mean",
           title=f"{len(result['seeds'])} seeds, {result['epochs']} epoch(s), {result['machine']['device_name']}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, out, header = prepare("benchmarks.accuracy", args, argv)
    train_set, test_set = load_real_mnist("benchmarks.accuracy", args.data_dir, device)
    contenders = parity_contenders(device, fast_backends(device))
    references = [c.name for c in contenders if c.backend is None]
    result = {
        **header,
        "epochs": args.epochs, "bar_points": args.bar, "seeds": [],
        "accuracy": {c.name: [] for c in contenders},
    }
    print(f"benchmarks.accuracy: {result['machine']['device_name']}, rows {[c.name for c in contenders]}", flush=True)
    for seed in args.seeds:
        for c in contenders:
            row = end_to_end.run(c, train_set, test_set, epochs=args.epochs, device=device, seed=seed)
            result["accuracy"][c.name].append(row["test_accuracy"])
        result["seeds"].append(seed)
        result["pairs"] = summarize(result["accuracy"], references, args.bar)
        # After every seed, so a run cut short keeps the seeds it finished.
        (out / "accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
        write_markdown(result, out / "accuracy.md")
        print(f"seed {seed:3}: " + "  ".join(f"{n} {100 * v[-1]:.2f}%" for n, v in result["accuracy"].items()),
              flush=True)
    plot(result, out / "accuracy.png")
    for p in result["pairs"]:
        print(f"{p['row']} - {p['reference']}: mean {p['mean']:+.3f} sd {p['sd']:.3f} points, largest "
              f"{p['max_abs']:.2f}, {p['seeds_over_bar']} of {len(result['seeds'])} seeds over {args.bar:.2f}")
    print(f"benchmarks.accuracy: wrote {out}/accuracy.json, accuracy.md, accuracy.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
