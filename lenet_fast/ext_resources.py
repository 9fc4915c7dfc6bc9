"""Resource usage (registers, shared/local memory, stack) of the extension's CUDA kernels.

    from lenet_fast.ext_resources import cuda_resource_usage
    rows = cuda_resource_usage()   # [{"kernel", "config", "arch", "registers", "shared", "local", "stack"}, ...]

Parsed from ``cuobjdump --dump-resource-usage`` run on the built lenet_fast._C
library.  LOCAL or STACK above 0 means register spills.  Raises RuntimeError,
with the reason, when the build has no CUDA kernels or cuobjdump is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

_ARCH_RE = re.compile(r"^\s*arch\s*=\s*(sm_\d+a?)")
_FUNC_RE = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
_RES_RE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def _find_cuobjdump() -> str:
    candidates = [os.environ.get("CUOBJDUMP")]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidates.append(os.path.join(cuda_home, "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise RuntimeError("cuobjdump not found: set CUOBJDUMP or CUDA_HOME, or install triton (it ships one)")


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    return dict(zip(names, lines)) if len(lines) == len(names) else {n: n for n in names}


def _split(demangled: str) -> tuple[str, str]:
    """('lenet_fast::cuda::detail::conv_fwd_kernel', '<float, true>') from a demangled signature."""
    head = demangled.replace("(anonymous namespace)::", "").split("(", 1)[0]
    if head.startswith("void "):
        head = head[5:]
    if "<" in head:
        i = head.index("<")
        return head[:i], head[i:]
    return head, ""


def parse_resource_usage(text: str) -> list[dict]:
    """Rows from the text of ``cuobjdump --dump-resource-usage``."""
    rows, arch, pending = [], None, None
    for line in text.splitlines():
        m = _ARCH_RE.match(line)
        if m:
            arch = m.group(1)
            continue
        m = _FUNC_RE.match(line)
        if m:
            pending = m.group(1)
            continue
        if pending is not None and "REG:" in line:
            res = {k: int(v) for k, v in _RES_RE.findall(line)}
            rows.append(
                {
                    "mangled": pending,
                    "arch": arch,
                    "registers": res.get("REG", 0),
                    "shared": res.get("SHARED", 0),
                    "local": res.get("LOCAL", 0),
                    "stack": res.get("STACK", 0),
                }
            )
            pending = None
    names = _demangle(sorted({r["mangled"] for r in rows}))
    for r in rows:
        kernel, config = _split(names[r.pop("mangled")])
        r["kernel"], r["config"] = kernel, config
    keys = ("kernel", "config", "arch", "registers", "shared", "local", "stack")
    return [{k: r[k] for k in keys} for r in rows]


def cuda_resource_usage() -> list[dict]:
    """One row per CUDA kernel and architecture in lenet_fast._C (see module docstring)."""
    try:
        from . import _C
    except ImportError as exc:
        raise RuntimeError(f"lenet_fast._C is not built ({exc})") from exc
    if not getattr(_C, "HAS_CUDA", 0):
        raise RuntimeError("lenet_fast._C was built without CUDA kernels (no CUDA toolkit at build time)")
    tool = _find_cuobjdump()
    proc = subprocess.run([tool, "--dump-resource-usage", _C.__file__], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} --dump-resource-usage {_C.__file__} failed: {proc.stderr.strip()}")
    rows = parse_resource_usage(proc.stdout)
    if not rows:
        raise RuntimeError(f"no CUDA kernels found in {_C.__file__}")
    return rows


if __name__ == "__main__":  # pragma: no cover
    for row in cuda_resource_usage():
        print(row)
