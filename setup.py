"""Build entry: the Python package plus the C++/CUDA extension lenet_fast._C.

    pip install --no-build-isolation -e .

Environment:
    LENET_FAST_BUILD_EXT=0      skip the extension (the torch and triton backends still work)
    LENET_FAST_BUILD_CUDA=0     build only the CPU kernels even when a CUDA toolkit is found
    TORCH_CUDA_ARCH_LIST        GPU architectures to compile for (default "8.0;9.0")
    CUDA_HOME                   the CUDA toolkit (the folder holding bin/nvcc and lib*/libcudart.so)
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("LENET_FAST_BUILD_EXT", "1") == "0":
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    if not cpp:
        return [], {}
    from torch.utils import cpp_extension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    use_cuda = (
        bool(cu)
        and os.environ.get("LENET_FAST_BUILD_CUDA", "1") != "0"
        and cpp_extension.CUDA_HOME is not None
    )
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
        ext = cpp_extension.CUDAExtension(
            "lenet_fast._C", cpp + cu, define_macros=macros + [("LENET_FAST_WITH_CUDA", "1")], **common
        )
    else:
        ext = cpp_extension.CppExtension("lenet_fast._C", cpp, define_macros=macros, **common)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    packages=["lenet_fast", "lenet_fast.kernels"],
    package_dir={"lenet_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
