"""Compile every Triton kernel LeNet launches for sm_80 and sm_90 and report its resources.

    python -m lenet_fast.compile_check [--batch 64 256 1024] [--arch 80 90] [--json PATH]

No GPU is needed.  The launch wrappers of `lenet_fast.kernels` run on fake
CUDA tensors inside `recording_launches()`, following a LeNet training step
(forward and backward of every layer, at each batch size), so the recorded
launches carry exactly the block sizes, constexprs and argument
specialisations the real run would use.  Each distinct launch is compiled
ahead of time with `triton.compile` for every architecture, and the cubin's
resource usage is read with the `cuobjdump` that ships with Triton.  Kernels
that LeNet does not call (the unfused conv3x3_relu and maxpool2x2) are
compiled for the same layer shapes, as if the model used them.  No kernel is
autotuned, so there are no autotune configurations to add.

Rows of the C++/CUDA extension are included when `lenet_fast.ext_resources`
exists and reports them; otherwise the reason is printed.

Exit status: 0 when everything compiled, nothing spills (LOCAL or STACK > 0)
and the shared memory fits the architecture; 1 otherwise.  `--json PATH`
writes {"rows": [...], "failures": [...], "ext": "<status>"}; each row has
kernel, config, arch, registers, shared, local, stack, source (and used_by
for Triton rows).

Triton compiles nothing under TRITON_INTERPRET=1 (its kernels become Python
functions), so when that is set this tool re-runs itself in a child process
with the variable removed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile

ARCHS = (80, 90)
BATCHES = (64, 256, 1024)

# Largest dynamic shared memory a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_TRITON_DTYPE = {
    "torch.float32": "fp32",
    "torch.float16": "fp16",
    "torch.bfloat16": "bf16",
    "torch.int8": "i8",
    "torch.uint8": "u8",
    "torch.int32": "i32",
    "torch.int64": "i64",
}

# Launch options, not kernel parameters.
_OPTION_NAMES = ("num_warps", "num_stages", "num_ctas")


# --------------------------------------------------------------------------- what LeNet launches


def lenet_launches(batch: int) -> list:
    """Every kernel launch of one LeNet training step at `batch`, recorded on fake CUDA tensors.

    Each entry is (what, Launch), `what` naming the stage and pass.  Follows
    lenet_fast.model.STAGES as training runs them, through each op's `forward` and
    `backward` (lenet_fast.kernels.<name>): every ConvStage is one
    conv3x3_relu_maxpool2x2, and the LinearStages together are the head, one
    mlp_cross_entropy.  The first stage computes no input gradient (the images need
    none), every other does.  The unfused conv3x3_relu and maxpool2x2, which LeNet
    does not call, are recorded at the ConvStages' shapes as if it did.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lenet_fast.kernels import (_common, conv3x3_relu, conv3x3_relu_maxpool2x2, lenet_step, maxpool2x2,
                                    mlp_cross_entropy)
    from lenet_fast.model import IMAGE_SHAPE, STAGES, ConvStage, LinearStage

    recorded = []

    def record(what, fn, *args):
        with _common.recording_launches() as launches:
            result = fn(*args)
        recorded.extend((what(launch) if callable(what) else what, launch) for launch in launches)
        return result

    def cuda(*shape, dtype=torch.float32):
        return torch.empty(shape, device="cuda", dtype=dtype)

    def conv_params(stage: ConvStage):
        return cuda(stage.out_channels, stage.in_channels, 3, 3), cuda(stage.out_channels)

    convs = [stage for stage in STAGES if isinstance(stage, ConvStage)]
    head = [stage for stage in STAGES if isinstance(stage, LinearStage)]

    def head_stage(pass_: str):
        """Names a head launch by its layer, found from the GEMM's shape (a linear kernel's
        N, K: out_features, in_features); the loss kernel is "loss"."""
        def what(launch):
            args = dict(zip(launch.kernel.arg_names, launch.args))
            names = [s.name for s in head if (s.out_features, s.in_features) == (args.get("N"), args.get("K"))]
            return f"{'/'.join(names)} {pass_}" if names else "loss"
        return what

    with FakeTensorMode():
        # The fused path: what LeNet trains with, stage by stage.
        x = cuda(batch, *IMAGE_SHAPE)
        for i, stage in enumerate(convs):
            w, b = conv_params(stage)
            out, code = record(f"{stage.name} fwd", conv3x3_relu_maxpool2x2.forward, x, w, b, stage.padding)
            record(f"{stage.name} bwd", conv3x3_relu_maxpool2x2.backward,
                   torch.empty_like(out), code, x, w, stage.padding, i > 0, True)
            x = out
        if head:
            weights = [cuda(s.out_features, s.in_features) for s in head]
            biases = [cuda(s.out_features) for s in head]
            target = cuda(batch, dtype=torch.int64)
            loss, logits, dlogits, hidden = record(head_stage("fwd"), mlp_cross_entropy.forward,
                                                   x, weights, biases, target)
            record(head_stage("bwd"), mlp_cross_entropy.backward,
                   torch.empty_like(loss), None, dlogits, logits, x, weights, hidden, bool(convs), True)

        # The whole training step in four launches (kernels/lenet_step.py), which a triton
        # LeNet trained by FusedSGD takes.
        params = [t for stage in STAGES for t in (conv_params(stage) if isinstance(stage, ConvStage)
                                                  else (cuda(stage.out_features, stage.in_features),
                                                        cuda(stage.out_features)))]
        x, target = cuda(batch, *IMAGE_SHAPE), cuda(batch, dtype=torch.int64)
        workspace = lenet_step.make_workspace(batch, x.device, params)
        names = iter(["step: features fwd", "step: head", "step: features bwd", "step: sgd"])
        record(lambda launch: next(names), lenet_step.sgd_train_step, x, target, params,
               [torch.empty_like(p) for p in params], cuda(), 0.9, 0.0, 5e-4, True, False, workspace)

        # The unfused kernels, at the ConvStages' shapes.
        x = cuda(batch, *IMAGE_SHAPE)
        for i, stage in enumerate(convs):
            w, b = conv_params(stage)
            y = record(f"{stage.name} fwd (unfused)", conv3x3_relu.forward, x, w, b, stage.padding)
            record(f"{stage.name} bwd (unfused)", conv3x3_relu.backward,
                   torch.empty_like(y), y, x, w, stage.padding, i > 0, True)
            out, code = record(f"pool{i + 1} fwd (unfused)", maxpool2x2.forward, y)
            record(f"pool{i + 1} bwd (unfused)", maxpool2x2.backward, torch.empty_like(out), code, y)
            x = out
    return recorded


# --------------------------------------------------------------------------- one launch -> one compilation


def _specialize(value, specialize: bool = True) -> tuple[str, bool]:
    """(Triton type, divisible by 16) of a runtime argument, as the JIT specialises it.

    Tensors become typed pointers; torch's allocator aligns to at least 16
    bytes, and every tensor the wrappers pass is a fresh allocation or a
    contiguous copy.  An integer equal to 1 becomes a constexpr ("constexpr")
    and a multiple of 16 is marked divisible, unless the kernel opted out
    with do_not_specialize.
    """
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_DTYPE[str(value.dtype)], True
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", False
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), specialize and value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"cannot specialise a kernel argument of type {type(value).__name__}")


def compilation_key(launch) -> tuple:
    """(kernel name, signature, constexprs, divisible args, options): what decides the binary."""
    kernel = launch.kernel
    names = list(kernel.arg_names)
    values = dict(zip(names, launch.args))
    values.update({k: v for k, v in launch.kwargs.items() if k not in _OPTION_NAMES})
    signature, constexprs, divisible = {}, {}, []
    for param, name in zip(kernel.params, names):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        ty, div16 = _specialize(value, specialize=not param.do_not_specialize)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = value
        elif div16:
            divisible.append(name)
    options = tuple((k, launch.kwargs[k]) for k in _OPTION_NAMES if k in launch.kwargs)
    return (kernel.__name__, tuple(signature.items()), tuple(constexprs.items()), tuple(divisible), options)


def describe(key: tuple) -> str:
    """A short config string: the constexprs (declared ones and integers the
    JIT specialised because they equal 1), then the launch options."""
    _, _, constexprs, _, options = key
    return " ".join(f"{k}={v}" for k, v in (*constexprs, *options))


def _cuobjdump() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(bundled):
        return bundled
    found = shutil.which("cuobjdump")
    if found is None:
        raise RuntimeError("cuobjdump not found (neither bundled with Triton nor on PATH)")
    return found


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED (static), LOCAL of the single function in `cubin`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if not {"REG", "STACK", "SHARED", "LOCAL"} <= fields.keys():
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    return {k: int(v) for k, v in fields.items()}


def compile_one(kernel, key: tuple, arch: int) -> dict:
    """Compile one launch configuration for sm_`arch`; returns a row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    name, signature, constexprs, divisible, options = key
    target = GPUTarget("cuda", arch, 32)
    names = list(kernel.arg_names)
    backend = make_backend(target)
    # The JIT marks 16-divisible pointers and integers so loads can be vectorised.
    divisibility = backend.parse_attr("D") if hasattr(backend, "parse_attr") else [["tt.divisibility", 16]]
    attrs = {(names.index(n),): divisibility for n in divisible}
    src = ASTSource(fn=kernel, signature=dict(signature), constexprs=dict(constexprs), attrs=attrs)
    compiled = triton.compile(src, target=target, options=dict(options))
    usage = resource_usage(compiled.asm["cubin"])
    return {
        "kernel": name,
        "config": describe(key),
        "arch": f"sm_{arch}",
        "registers": usage["REG"],
        # Triton kernels use dynamic shared memory (metadata.shared); the cubin
        # reports only the static part.
        "shared": usage["SHARED"] + int(getattr(compiled.metadata, "shared", 0) or 0),
        "local": usage["LOCAL"],
        "stack": usage["STACK"],
        "source": "triton",
    }


# --------------------------------------------------------------------------- the C++/CUDA extension


def ext_rows() -> tuple[list[dict], str, bool]:
    """(rows, status, ok) from lenet_fast.ext_resources.

    No module, or a RuntimeError from it (its way of saying the build has no
    CUDA kernels), is a reason to report, not a failure; any other error is.
    """
    try:
        from lenet_fast import ext_resources
    except ImportError as exc:
        return [], f"not included: lenet_fast.ext_resources cannot be imported ({exc})", True
    try:
        rows = ext_resources.cuda_resource_usage()
    except RuntimeError as exc:
        return [], f"not included: {exc}", True
    except Exception as exc:
        return [], f"cuda_resource_usage() failed: {type(exc).__name__}: {exc}", False
    normalised = []
    for row in rows:
        row = dict(row)
        arch = row.get("arch")
        if isinstance(arch, int) or (isinstance(arch, str) and arch.isdigit()):
            row["arch"] = f"sm_{arch}"
        row["source"] = "ext"
        normalised.append(row)
    return normalised, f"included ({len(normalised)} rows)", True


# --------------------------------------------------------------------------- report


def problems(row: dict) -> list[str]:
    """Why a row fails the check (empty when it passes)."""
    why = []
    if int(row.get("local") or 0) > 0 or int(row.get("stack") or 0) > 0:
        why.append(f"spills (local {row.get('local')} B, stack {row.get('stack')} B)")
    arch = str(row.get("arch", ""))
    limit = SHARED_LIMIT.get(int(arch[3:])) if arch.startswith("sm_") and arch[3:].isdigit() else None
    if limit is not None and int(row.get("shared") or 0) > limit:
        why.append(f"shared memory {row.get('shared')} B exceeds the {arch} limit of {limit} B")
    return why


def print_table(rows: list[dict]) -> None:
    headers = ("source", "kernel", "config", "arch", "registers", "shared", "local", "stack", "used by")
    table = [[str(r.get("source", "")), str(r.get("kernel", "")), str(r.get("config", "")), str(r.get("arch", "")),
              str(r.get("registers", "")), str(r.get("shared", "")), str(r.get("local", "")),
              str(r.get("stack", "")), ", ".join(r.get("used_by", []))] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(headers)]
    for line in (headers, ["-" * w for w in widths], *table):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


_jobs: list = []  # (kernel, key, arch, used_by), shared with forked workers


def _compile_job(i: int) -> tuple[dict | None, str | None]:
    kernel, key, arch, used_by = _jobs[i]
    try:
        row = compile_one(kernel, key, arch)
    except Exception as exc:  # a failed compilation is a result to report, not a crash
        lines = str(exc).strip().splitlines()
        return None, (f"{key[0]} [{describe(key)}] sm_{arch}: compilation failed: "
                      f"{type(exc).__name__}: {lines[-1] if lines else ''}")
    row["used_by"] = used_by
    return row, None


def _compile_all(jobs: list, workers: int) -> list:
    """Compile every job, in `workers` forked processes (compilation is CPU-bound
    and single-threaded); results come back in job order."""
    global _jobs
    _jobs = jobs
    if workers <= 1 or len(jobs) <= 1:
        return [_compile_job(i) for i in range(len(jobs))]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(_compile_job, range(len(jobs))))


def run(batches, archs, json_path: str | None, only: str | None = None, workers: int = 1) -> int:
    distinct = {}  # key -> (kernel, [where used])
    for batch in batches:
        for what, launch in lenet_launches(batch):
            if only and only not in launch.kernel.__name__:
                continue
            key = compilation_key(launch)
            distinct.setdefault(key, (launch.kernel, []))[1].append(f"{what} @{batch}")

    jobs = [(kernel, key, arch, sorted(set(used_by)))
            for key, (kernel, used_by) in sorted(distinct.items(), key=lambda item: (item[0][0], describe(item[0])))
            for arch in archs]
    rows, failures = [], []
    for row, error in _compile_all(jobs, workers):
        if error is not None:
            failures.append(error)
        else:
            rows.append(row)

    if not jobs:
        failures.append("no kernel launch matched: nothing was compiled")
    extra, ext_status, ext_ok = ext_rows()
    if not ext_ok:
        failures.append(f"C++/CUDA extension: {ext_status}")
    rows.extend(extra)
    for row in rows:
        for why in problems(row):
            failures.append(f"{row.get('source')} {row.get('kernel')} [{row.get('config')}] {row.get('arch')}: {why}")

    print_table(rows)
    print(f"\n{len(distinct)} Triton kernel configurations x {len(archs)} architectures; "
          f"C++/CUDA extension: {ext_status}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"rows": rows, "failures": failures, "ext": ext_status}, f, indent=1)
    if failures:
        print("\nFAILED:", *failures, sep="\n  ")
        return 1
    print("OK: everything compiled, no spills")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lenet_fast.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCHES), help="batch sizes (default: 64 256 1024)")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                        help="compute capabilities (default: 80 90)")
    parser.add_argument("--kernel", metavar="TEXT", help="only kernels whose name contains TEXT")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compilations (default: the number of CPUs)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and failures as JSON")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "lenet_fast.compile_check", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env).returncode
    return run(args.batch, args.arch, args.json, args.kernel, args.jobs)


if __name__ == "__main__":
    sys.exit(main())
