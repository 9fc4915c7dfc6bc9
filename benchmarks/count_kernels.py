"""Kernels launched per LeNet training step (forward, backward, optimizer step), per contender.

    python -m benchmarks.count_kernels [--device cuda] [--batch 64]

On CUDA this counts GPU kernel launches with torch.profiler (what launch overhead
scales with).  On CPU there are no launches to count; it reports the number of
top-level operator calls instead (what dispatcher/autograd overhead scales with), and
says so.

The triton backend's step is also counted on the CPU, as a GPU would run it
(`triton_step_kernels`): its Triton launches are recorded instead of run
(kernels._common.recording_launches), and every other non-view, non-allocating aten
op the step executes is a kernel of its own on a GPU (checks that run on CPU tensors
only, inside kernels._common.CPU_ONLY_CHECK ranges, are left out).  The same run gives the host
time of one eager step with no kernel running: what an eager GPU step costs the CPU
that launches it.  Both for the whole-step path and for the op-by-op step.
"""

from __future__ import annotations

import argparse
import json
import os
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


# aten ops that launch no kernel on a GPU: views, metadata and allocation.
_NO_KERNEL = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::flatten", "aten::as_strided", "aten::slice",
    "aten::select", "aten::t", "aten::transpose", "aten::expand", "aten::detach", "aten::alias", "aten::unsqueeze",
    "aten::squeeze", "aten::permute", "aten::lift_fresh", "aten::empty", "aten::empty_like", "aten::empty_strided",
    "aten::resolve_conj", "aten::resolve_neg", "aten::new_empty", "aten::new_empty_strided", "aten::contiguous", "aten::result_type", "aten::is_nonzero",
}


def triton_step_kernels(batch: int, *, fused: bool = True, repeats: int = 20) -> dict:
    """The kernels of one triton LeNet training step at `batch`, counted on the CPU, and the
    host time of that step with its Triton launches recorded instead of run.

    Returns {"triton_launches": n, "other_kernels": [aten op names], "kernels": total,
    "host_seconds": median over `repeats`}.  Needs TRITON_INTERPRET=1 (the warm-up steps
    that create the optimizer state run the kernels in the interpreter).
    """
    import statistics
    import time

    from lenet_fast.kernels import _common
    from lenet_fast.model import LeNet
    from lenet_fast.optim import FusedSGD

    torch.manual_seed(0)
    model = LeNet("triton")
    optimizer = FusedSGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    train_step(model, optimizer, x, y, fused=fused)  # creates the momentum buffers: the fast path needs them
    # With the launches recorded, buffers the kernels would fill hold whatever memory held;
    # the op-by-op step's CPU ops on denormals among it would time the CPU's slow path.
    flush = torch.set_flush_denormal(True)
    with _common.recording_launches() as launches:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(model, optimizer, x, y, fused=fused)
        recorded = len(launches)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            train_step(model, optimizer, x, y, fused=fused)
            times.append(time.perf_counter() - start)
    if flush:
        torch.set_flush_denormal(False)
    is_aten = lambda name: name.startswith("aten::")  # noqa: E731
    other = [e.name for e in prof.events()
             if is_aten(e.name) and e.name not in _NO_KERNEL
             and not any(is_aten(p.name) or p.name == _common.CPU_ONLY_CHECK for p in _ancestors(e))]
    return {"triton_launches": recorded, "other_kernels": other, "kernels": recorded + len(other),
            "host_seconds": statistics.median(times)}


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
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        print(f"triton training step at batch {args.batch}, counted on the CPU as a GPU would run it "
              "(Triton launches recorded, not run; host time of the step without its kernels):")
        for fused in (True, False):
            r = triton_step_kernels(args.batch, fused=fused)
            what = "whole step (four launches)" if fused else "op by op"
            print(f"  {what:28} {r['kernels']:3} kernels ({r['triton_launches']} Triton + "
                  f"{len(r['other_kernels'])} other: {', '.join(sorted(set(r['other_kernels']))) or '-'}), "
                  f"host {r['host_seconds'] * 1e6:.0f} us")
            rows.append({"name": f"lenet_fast triton, {what}", **r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
