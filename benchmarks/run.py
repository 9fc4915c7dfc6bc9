"""The benchmark suite: `python -m benchmarks.run [--device cpu|cuda] [--quick] [--out DIR]`

Side by side, in one run on one machine:
  * per op, at LeNet's shapes for batch 64, 256 and 1024: forward and forward+backward of
    each lenet_fast backend against the stock composite it replaces;
  * end to end: MNIST training epochs of the same LeNet (same seed, same batches, same
    optimizer) as stock eager, stock eager fed by the seed's DataLoader, torch.compile
    (and its CUDA modes), and the lenet_fast backends (with CUDA-graph capture on CUDA):
    seconds per epoch, images/s, a training step, warm-up (compile) time, inference
    images/s and test accuracy.
Writes results.json, results.md and speedup.png into --out
(default benchmarks/results/<device>/).  Triton under the CPU interpreter is not a
speed figure and is left out on CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

from benchmarks import end_to_end, op_cases
from benchmarks.timing import time_side_by_side
from lenet_fast import backends, cli, data


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer repeats, batch 64 and 1024 only, 1 epoch")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per contender (default 1 quick, 2 full)")
    p.add_argument("--data-dir", default=None, help="torchvision root with MNIST (default $LENET_FAST_DATA)")
    p.add_argument("--seed", type=int, default=end_to_end.SEED,
                   help="end-to-end seed: initial weights and batch order, the same for every contender")
    p.add_argument("--skip", nargs="*", default=[], choices=["ops", "end-to-end"], help="sections to leave out")
    p.add_argument("--compile-timeout", type=float, default=600,
                   help="seconds each torch.compile row may take, compilation included (default 600)")
    return p.parse_args(argv)


def fast_backends(device: torch.device) -> list[str]:
    """lenet_fast backends that give speed figures on `device`."""
    names = []
    for name in ("ext", "triton"):
        if device.type == "cpu" and name == "triton":
            continue  # the interpreter is for correctness only
        if backends.unavailable_reason(name, device.type) is None:
            names.append(name)
    return names


def bench_ops(device: torch.device, names: list[str], *, threads: int, quick: bool) -> list[dict]:
    rows = []
    batches = (64, 1024) if quick else op_cases.BATCHES
    for case in op_cases.CASES:
        for batch in batches:
            inputs = case.make_inputs(batch, device)
            contenders = {"stock": case.stock, **{name: case.fused(name) for name in names}}
            runners = {(contender, mode): runner for contender, fn in contenders.items()
                       for mode, runner in op_cases.runners(fn, inputs).items()}
            timings = time_side_by_side(runners, device, threads=threads, quick=quick)
            for (contender, mode), t in timings.items():
                stock = timings[("stock", mode)]["median"]
                rows.append({"case": case.name, "batch": batch, "mode": mode, "contender": contender,
                             **{f"{k}_us": v for k, v in t.items() if k != "runs"},
                             "speedup_vs_stock": stock / t["median"]})
            line = "  ".join(f"{c}/{m.replace('forward+backward', 'fwd+bwd').replace('forward', 'fwd')} "
                             f"{t['median']:.0f}us" for (c, m), t in timings.items())
            print(f"{case.name:32} b={batch:<5} {line}", flush=True)
    return rows


INTERLEAVE_SLICES = 10  # slices per epoch in which the main end-to-end rows take turns


def bench_end_to_end(device: torch.device, names: list[str], *, epochs: int, data_root, seed: int = end_to_end.SEED,
                     compile_timeout: float = 600, on_row=lambda rows, source: None) -> tuple[list[dict], str]:
    train_set, test_set, source, data_root = end_to_end.load_data(device, data_root)
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        if "cut_after_seconds" in row:
            on_row(rows, source)
            print(f"{row['name']:44} cut after {row['cut_after_seconds']:g} s (compilation included)", flush=True)
            return
        for key, reference in (("speedup_vs_stock_eager", "stock eager"),
                               ("speedup_vs_stock_graph", end_to_end.STOCK_GRAPH)):
            ref = next((r for r in rows if r["name"] == reference), None)
            if ref is not None:
                row[key] = ref["best_epoch_seconds"] / row["best_epoch_seconds"]
        on_row(rows, source)
        vs_graph = f"  {row['speedup_vs_stock_graph']:5.2f}x stock graph" if "speedup_vs_stock_graph" in row else ""
        print(f"{row['name']:44} epoch {row['best_epoch_seconds']:7.2f} s  {row['images_per_second']:9,.0f} img/s  "
              f"step {row['step_us']:8.0f} us  {row['speedup_vs_stock_eager']:5.2f}x stock eager{vs_graph}  "
              f"warm-up {row['warmup_seconds']:6.1f} s  inference {row['inference_images_per_second']:9,.0f} img/s  "
              f"acc {100 * row['test_accuracy']:.2f}%", flush=True)

    # The main rows (stock eager, stock + CUDA graph and the lenet_fast backends) train
    # interleaved, a slice of an epoch each in turn, so that drift in the machine's speed
    # cannot favour one of them; the slow baselines then run one after another, each
    # saved as it finishes, so a run cut short by a time limit keeps the main rows.  The
    # torch.compile rows each run in a child process with a time limit of their own.
    contenders = [c for c in end_to_end.contenders(device, set(names))
                  if not (c.seed_dataloader and data_root is None)]
    main = [c for c in contenders if c.compile_mode is None and not c.seed_dataloader]
    runs = [end_to_end.Run(c, train_set, test_set, epochs=epochs, device=device, seed=seed) for c in main]
    for epoch in range(epochs):
        end_to_end.interleave(runs, epoch, INTERLEAVE_SLICES)
    for r in runs:
        add(r.result())
    del runs
    for contender in (c for c in contenders if c not in main):
        if contender.compile_mode is not None:
            add(end_to_end.run_capped(contender, epochs=epochs, device=device, data_root=data_root, seed=seed,
                                      limit_seconds=compile_timeout))
        else:
            add(end_to_end.run(contender, train_set, test_set, epochs=epochs, device=device, data_root=data_root,
                               seed=seed))
    return rows, source


def write_markdown(result: dict, path: Path) -> None:
    m = result["machine"]
    lines = [
        f"# lenet_fast benchmarks: {m['device_name']}",
        "",
        f"Measured {result['date']} on {m['device_name']} ({m['device']}, {m['threads']} CPU threads), "
        f"torch {m['versions']['torch']}, triton {m['versions']['triton']}. "
        f"Command: `{result['command']}`.",
        "",
    ]
    if result.get("end_to_end"):
        lines += [
            f"## One MNIST training epoch, batch {end_to_end.BATCH_SIZE} ({result['end_to_end_data']})",
            "",
            f"Same seed ({result.get('seed', end_to_end.SEED)}), same batches, same optimizer and schedule for "
            "every row. Epoch = best of "
            f"{result['end_to_end'][0]['epochs']} epoch(s), training loop only; warm-up = compilation/capture "
            "before the first timed step (not in the epoch time).",
            "",
            "| contender | s/epoch | images/s | step (us) | vs stock eager | vs stock + CUDA graph | warm-up (s) "
            "| inference images/s | test accuracy |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in result["end_to_end"]:
            name = f"**{r['name']}** (default)" if r.get("default_path") else r["name"]
            if "cut_after_seconds" in r:
                lines.append(f"| {name} | cut after {r['cut_after_seconds']:g} s | | | | | | | |")
                continue
            vs_graph = f"{r['speedup_vs_stock_graph']:.2f}x" if "speedup_vs_stock_graph" in r else "-"
            lines.append(f"| {name} | {r['best_epoch_seconds']:.2f} | {r['images_per_second']:,.0f} | "
                         f"{r['step_us']:,.0f} | {r['speedup_vs_stock_eager']:.2f}x | {vs_graph} | "
                         f"{r['warmup_seconds']:.1f} | {r['inference_images_per_second']:,.0f} | "
                         f"{100 * r['test_accuracy']:.2f}% |")
        lines += ["", "(default): the path `python -m lenet_fast.train` takes on this device. A row cut after N s "
                  "did not finish its compilation and epoch within its own time limit (`--compile-timeout`).", ""]
    if result.get("ops"):
        lines += [
            "## Per op at LeNet's shapes (median us; p20-p80 in results.json)",
            "",
            "| op / layer | batch | mode | stock | " + " | ".join(result["fast_backends"]) + " | speedup |",
            "| --- | ---: | --- | ---: | " + " | ".join("---:" for _ in result["fast_backends"]) + " | ---: |",
        ]
        by_key = {}
        for r in result["ops"]:
            by_key.setdefault((r["case"], r["batch"], r["mode"]), {})[r["contender"]] = r
        for (case, batch, mode), row in by_key.items():
            cells = [f"{row[c]['median_us']:,.0f}" for c in ["stock", *result["fast_backends"]]]
            best = max(row[c]["speedup_vs_stock"] for c in result["fast_backends"]) if result["fast_backends"] else 1
            lines.append(f"| {case} | {batch} | {mode} | " + " | ".join(cells) + f" | {best:.2f}x |")
        lines.append("")
    path.write_text("\n".join(lines))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if result.get("end_to_end"):
        panels.append(("end to end: MNIST epoch", [(r["name"], r["speedup_vs_stock_eager"]) for r in result["end_to_end"]
                                                   if "speedup_vs_stock_eager" in r]))
    ops = [r for r in result.get("ops", []) if r["contender"] != "stock" and r["mode"] == "forward+backward"
           and r["batch"] == 64]
    if ops:
        panels.append(("per op, forward+backward, batch 64",
                       [(f"{r['case']} [{r['contender']}]", r["speedup_vs_stock"]) for r in ops]))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 0.45 * max(len(p[1]) for p in panels) + 1.8))
    axes = [axes] if len(panels) == 1 else axes
    for ax, (title, bars) in zip(axes, panels):
        labels, values = zip(*bars)
        ax.barh(range(len(values)), values, color=["tab:gray" if v <= 1 else "tab:green" for v in values])
        ax.set_yticks(range(len(values)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set(xlabel="speedup vs stock (x)", title=title)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}x", va="center", fontsize=8)
    fig.suptitle(f"lenet_fast on {result['machine']['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prepare(prog: str, args: argparse.Namespace, argv) -> tuple[torch.device, Path, dict]:
    """What every benchmark command does first: the device (refused clearly when absent),
    the thread count, deterministic settings, the output folder, and the header of its
    results: date, the command as typed, the machine."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        cli.fail(prog, "--device cuda: CUDA is not available on this machine")
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    cli.configure_determinism()
    out = Path(args.out or Path(__file__).parent / "results" / device.type)
    out.mkdir(parents=True, exist_ok=True)
    header = {
        "date": datetime.date.today().isoformat(),
        "command": f"python -m {prog} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"device": device.type, "device_name": cli.device_name(device), "threads": threads,
                    "versions": cli.versions()},
    }
    return device, out, header


def load_real_mnist(prog: str, data_dir, device: torch.device) -> tuple[data.DeviceData, data.DeviceData]:
    """MNIST's (train, test) on `device`, or exit 2 with the reason: for commands whose
    figures are accuracies, which mean nothing on random data (no fallback there)."""
    try:
        return data.load("mnist", data_dir or data.default_data_dir(), device=device, download=False)
    except data.DatasetError as exc:
        cli.fail(prog, f"--data-dir: {exc} (accuracy on random data means nothing)")


def main(argv=None) -> int:
    args = parse_args(argv)
    device, out, header = prepare("benchmarks.run", args, argv)
    threads = header["machine"]["threads"]
    names = fast_backends(device)
    result = {
        **header,
        "fast_backends": names,
        "quick": args.quick,
    }
    print(f"benchmarks.run: {result['machine']['device_name']}, backends {names}, threads {threads}", flush=True)

    def save() -> None:  # after every section and row, so a run cut short keeps what it measured
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        write_markdown(result, out / "results.md")

    if "end-to-end" not in args.skip:  # first: the headline, kept whole if a time limit cuts the ops
        epochs = args.epochs or (1 if args.quick else 2)
        root = args.data_dir or data.default_data_dir()

        def on_row(rows, source):
            result["end_to_end"], result["end_to_end_data"] = rows, source
            save()

        result["seed"] = args.seed
        bench_end_to_end(device, names, epochs=epochs, data_root=root, seed=args.seed,
                         compile_timeout=args.compile_timeout, on_row=on_row)
    if "ops" not in args.skip:
        result["ops"] = bench_ops(device, names, threads=threads, quick=args.quick)
        save()
    save()
    plot(result, out / "speedup.png")
    print(f"benchmarks.run: wrote {out}/results.json, results.md, speedup.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
