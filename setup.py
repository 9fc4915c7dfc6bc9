"""Build entry: the Python package plus the C++/CUDA extension lenet_fast._C.

    pip install --no-build-isolation -e .

Environment:
    LENET_FAST_BUILD_EXT=0      skip the extension (the torch and triton backends still work)
    LENET_FAST_BUILD_CUDA       unset: CUDA kernels when a toolkit is found, else (or when
                                compiling them fails) the CPU kernels only, said in one line;
                                0: CPU kernels only; 1: CUDA kernels or a failed install
    TORCH_CUDA_ARCH_LIST        GPU architectures to compile for (default "8.0;9.0")
    CUDA_HOME                   the CUDA toolkit, when the one nvcc reports is not the one wanted
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_MACRO = ("LENET_FAST_WITH_CUDA", "1")


def _say(message: str) -> None:
    print(f"lenet_fast: {message}", file=sys.stderr, flush=True)


def _cuda_home() -> str | None:
    """The CUDA toolkit folder: $CUDA_HOME (or $CUDA_PATH) when set, else the one the `nvcc`
    on the PATH reports as its top folder (`nvcc --dryrun` prints it), which is right even
    when that nvcc is a wrapper script somewhere else, where torch's guess (the folder
    above the script) is not."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return os.environ[name]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        # --dryrun prints the commands it would run, and the variables it set for them.
        dryrun = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    top = re.search(r"^#\$ TOP=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    if top is None:
        return None
    home = os.path.realpath(top.group(1).strip())
    return home if os.path.isfile(os.path.join(home, "bin", "nvcc")) else None


def _extensions():
    if os.environ.get("LENET_FAST_BUILD_EXT", "1") == "0":
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    if not cpp:
        return [], {}
    want_cuda = os.environ.get("LENET_FAST_BUILD_CUDA", "")
    home = _cuda_home() if cu and want_cuda != "0" else None
    if home is not None:
        os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension when it is imported
    from torch.utils import cpp_extension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    use_cuda = home is not None and cpp_extension.CUDA_HOME is not None
    if cu and want_cuda == "1" and not use_cuda:
        raise SystemExit("lenet_fast: LENET_FAST_BUILD_CUDA=1 but no CUDA toolkit was found "
                         "(no nvcc on the PATH, and CUDA_HOME unset)")
    if cu and want_cuda != "0" and not use_cuda:
        _say("no CUDA toolkit found (no nvcc on the PATH, CUDA_HOME unset): building the CPU kernels only")
    # CPU kernels: -O3 + AVX2/FMA so GCC vectorises the inner loops (FMA
    # contraction on); -fopenmp because at::parallel_for is OpenMP inline code.
    # LENET_FAST_CPU_ARCH overrides -march (e.g. "native", or "x86-64-v2" for old CPUs).
    arch = os.environ.get("LENET_FAST_CPU_ARCH", "haswell")
    cxx_flags = ["-O3", "-fopenmp", f"-march={arch}", "-mtune=generic", "-fno-math-errno"]
    extra = {"cxx": cxx_flags}
    macros = [("Py_LIMITED_API", "0x030A0000")]
    common = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if use_cuda:
        # The *_cuda.cu files hold plain CUDA kernels (no torch headers), so nvcc is
        # fast; they are named apart from the .cpp files because both would compile
        # to the same object name.
        extra["nvcc"] = ["-O3", "-lineinfo", "-Xptxas=-v", "--expt-relaxed-constexpr"]
        ext = cpp_extension.CUDAExtension("lenet_fast._C", cpp + cu, define_macros=macros + [CUDA_MACRO], **common)
    else:
        ext = cpp_extension.CppExtension("lenet_fast._C", cpp, define_macros=macros, **common)

    class BuildExt(cpp_extension.BuildExtension):
        """torch's BuildExtension; when the CUDA part fails to compile (a toolkit that does not
        match torch's CUDA, missing headers...), the CPU kernels are built instead and the
        install finishes, unless LENET_FAST_BUILD_CUDA=1 asked for CUDA."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                cuda_exts = [e for e in self.extensions if any(s.endswith(".cu") for s in e.sources)]
                if want_cuda == "1" or not cuda_exts:
                    raise
                reason = " ".join(str(exc).split())[:300]
                _say(f"compiling the CUDA kernels failed ({type(exc).__name__}: {reason}); building the CPU "
                     f"kernels only, so the ext backend will not run on CUDA tensors (LENET_FAST_BUILD_CUDA=1 "
                     f"makes this an error; the build log above says why)")
                for e in cuda_exts:
                    e.sources = [s for s in e.sources if not s.endswith(".cu")]
                    e.define_macros = [m for m in e.define_macros if m != CUDA_MACRO]
                    e.extra_compile_args.pop("nvcc", None)
                    e.libraries = [lib for lib in e.libraries if "cuda" not in lib and lib != "cudart"]
                self.compiler = None  # run() makes a fresh one
                super().run()

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["lenet_fast", "lenet_fast.kernels"],
    package_dir={"lenet_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
