"""The "triton" backend: the Triton kernels of `lenet_fast.kernels` as PyTorch custom ops.

Every op of `lenet_fast.ops.OPS` has its kernels in `lenet_fast.kernels.<name>`,
whose `forward` and `backward` follow the backward contract of lenet_fast.ops.
Importing this module registers them as `torch.library.triton_op`s,

    lenet_fast::triton_<name>             forward, schema OpDef.schema
    lenet_fast::triton_<name>_backward    backward, schema OpDef.backward_schema

with autograd from the op's glue (ops.register_kernel_ops), so the ops show up in
torch.compile / torch.export graphs with their kernels visible (wrap_triton).  An
op added to the table needs its kernel file only, no edit here.

On CPU tensors the kernels run only under TRITON_INTERPRET=1 (see
lenet_fast.backends).  Only float32 is supported.
"""

import importlib

from . import ops


def _kernels(op: ops.OpDef):
    return importlib.import_module(f"lenet_fast.kernels.{op.name}")


ops.register_kernel_ops("triton", forward=lambda op: _kernels(op).forward, backward=lambda op: _kernels(op).backward)
