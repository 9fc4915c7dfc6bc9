"""Timing with the ecosystem's tools: torch.utils.benchmark on CPU (fixed thread count),
triton.testing.do_bench on CUDA (CUDA events, warm-up, cache flush).  Both return
microseconds as {"median", "p20", "p80"} so rows from either device read the same.

`time_side_by_side` times several functions that are to be compared: on the CPU
in interleaved rounds, so that drift in the machine's speed (a shared CPU can
change pace within seconds) falls on all of them alike."""

from __future__ import annotations

from typing import Callable

import torch


def time_cuda(fn: Callable[[], object], *, rep_ms: int = 100) -> dict[str, float]:
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"median": 1e3 * median, "p20": 1e3 * p20, "p80": 1e3 * p80}


CPU_ROUNDS = 5  # interleaved rounds per side-by-side comparison on the CPU


def _stats(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"median": 1e6 * pick(0.5), "p20": 1e6 * pick(0.2), "p80": 1e6 * pick(0.8), "runs": len(times)}


def time_side_by_side(fns: dict, device: torch.device, *, threads: int, quick: bool) -> dict:
    """{key: stats} for {key: fn}; on the CPU the functions take turns, CPU_ROUNDS rounds."""
    if device.type == "cuda":
        return {key: time_cuda(fn, rep_ms=50 if quick else 200) for key, fn in fns.items()}
    from torch.utils import benchmark

    per_round = (0.2 if quick else 1.0) / CPU_ROUNDS
    times: dict = {key: [] for key in fns}
    for fn in fns.values():
        fn()  # warm-up: lazy initialisation, allocator, first-call dispatch
    for _ in range(CPU_ROUNDS):
        for key, fn in fns.items():
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
            times[key] += timer.blocked_autorange(min_run_time=per_round).times
    return {key: _stats(t) for key, t in times.items()}
