"""Kernels launched per LeNet training step (forward, backward, optimizer step), per contender.

    python -m benchmarks.count_kernels [--device cuda] [--batch 64]

On CUDA this counts GPU kernel launches with torch.profiler (what launch overhead
scales with).  On CPU there are no launches to count; it reports the number of
top-level operator calls instead (what dispatcher/autograd overhead scales with), and
says so.  Triton under the CPU interpreter is left out.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.end_to_end import Contender
from benchmarks.run import fast_backends
from lenet_fast.training import train_step


def count(contender: Contender, device: torch.device, batch: int) -> dict:
    model = contender.make_model(device)
    optimizer = contender.make_optimizer(model, 0.05)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for _ in range(3):  # warm-up: lazy init, autotuning, optimizer state
        train_step(model, optimizer, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        train_step(model, optimizer, x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        return {"name": contender.name, "kernels": len(kernels)}
    # top-level operator calls only (not the ones nested inside another op)
    is_op = lambda name: name.startswith(("aten::", "lenet_fast::"))  # noqa: E731
    ops = [e for e in events if is_op(e.name) and not any(is_op(p.name) for p in _ancestors(e))]
    return {"name": contender.name, "operator_calls": len(ops)}


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.count_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = [count(Contender("stock eager"), device, args.batch)]
    rows += [count(Contender(f"lenet_fast {b}", backend=b), device, args.batch) for b in fast_backends(device)]
    unit = "kernels" if device.type == "cuda" else "operator_calls"
    print(f"per training step at batch {args.batch} on {device.type} "
          f"({'GPU kernel launches' if unit == 'kernels' else 'top-level aten/lenet_fast operator calls; no kernels on CPU'}):")
    for r in rows:
        print(f"  {r['name']:24} {r[unit]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
