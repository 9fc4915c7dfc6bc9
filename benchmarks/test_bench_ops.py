"""Per-op benchmarks through pytest-benchmark: `pytest benchmarks/ --benchmark-only`.

The same cases as `python -m benchmarks.run` (benchmarks/op_cases.py), one test per
(case, batch, mode, contender), grouped so each op is compared with its stock
composite in pytest-benchmark's table.
"""

import pytest
import torch

from benchmarks import op_cases
from benchmarks.run import fast_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CONTENDERS = ["stock", *fast_backends(DEVICE)]


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("batch", op_cases.BATCHES)
@pytest.mark.parametrize("case", op_cases.CASES, ids=lambda c: c.name)
def test_op(benchmark, case, batch, mode, contender):
    benchmark.group = f"{case.name} b={batch} {mode}"
    inputs = case.make_inputs(batch, DEVICE)
    fn = case.stock if contender == "stock" else case.fused(contender)
    runner = op_cases.runners(fn, inputs)[mode]
    if DEVICE.type == "cuda":
        def synced():
            runner()
            torch.cuda.synchronize()
        benchmark(synced)
    else:
        benchmark(runner)
