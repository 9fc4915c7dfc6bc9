"""The "ext" backend's registration: the C++/CUDA extension lenet_fast._C (sources in csrc/).

Importing this module makes ``torch.ops.lenet_fast.ext_<name>`` (and ``..._backward``)
for every op of `lenet_fast.ops.OPS`, which `lenet_fast.backends.ExtBackend` calls:

  * loading lenet_fast._C registers each op's CPU/CUDA kernels and C++ autograd
    (csrc/<name>.cpp), and defines the ops only this backend has (csrc/register.cpp:
    run_backward, ext_count_correct, ext_lenet_sgd_step);
  * `ops.register_kernel_ops("ext")` defines the table's ops from their schemas in
    lenet_fast/ops.py, the ones the triton backend is registered with too, and their
    fakes (torch.compile, opcheck).  The dispatcher binds the kernels registered
    before a schema to it when it is defined, checking their C++ signatures against it.

Importing it raises ImportError, with the reason, when the extension is not built.
"""

from __future__ import annotations

import torch

from . import ops

try:
    from . import _C  # loading the library registers the kernels
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        f"lenet_fast._C is not built ({exc}): reinstall with "
        "`pip install --no-build-isolation -e .` (without LENET_FAST_BUILD_EXT=0) "
        "and a C++ compiler; the CUDA kernels are built when nvcc is on the PATH"
    ) from exc

#: True when the extension was compiled with its CUDA kernels.
HAS_CUDA_KERNELS: bool = bool(_C.HAS_CUDA)

ops.register_kernel_ops("ext")


@torch.library.register_fake("lenet_fast::ext_count_correct")
def _(logits, target):
    return logits.new_empty((), dtype=torch.int64)
