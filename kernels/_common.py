"""Pieces shared by the kernel files: launch heuristics, the dot precision switch,
and the few @triton.jit helpers that two or more ops need (ReLU, its gradient,
the 2x2 max-pool comparison, and the im2col gather of a 3x3 convolution).

Each op's file (kernels/<name>.py) holds its kernels, their launch wrappers and
the two entry points of the backward contract of lenet_fast.ops, `forward` and
`backward`, which lenet_fast.triton_backend registers as the op's triton_ops.

Conventions used by every kernel in this package:

* Tensors are contiguous NCHW (or row-major 2-D) fp32; the launch wrappers make
  them so.  Pixel indices that run over a whole batch are int64, because
  N*C*H*W may exceed 2**31; a single image (C*H*W) is assumed to fit in int32.
* A "pixel" axis flattens (n, row, col) so that one block of a program may span
  several images: LeNet's maps are small (26x26, 13x13, 11x11, 5x5) and
  per-image tiles would leave most lanes idle.
* Weight and bias gradients are reduced deterministically: each program writes
  a partial sum for its slice of pixels, and the partials are summed over a
  fixed axis afterwards (never float atomics).
"""

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterator

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# tl.dot precision for fp32 operands.  "ieee" (the default) makes the GPU agree
# with the CPU interpreter and with torch to ~1e-6; TF32 is faster on sm_80+
# tensor cores but keeps only 10 mantissa bits, so it is opt-in:
#   LENET_FAST_TRITON_TF32=1            (environment, read at import), or
#   lenet_fast.kernels._common.ALLOW_TF32 = True   (at run time).
ALLOW_TF32 = os.environ.get("LENET_FAST_TRITON_TF32", "0") == "1"

# Warps per program unless a config says otherwise.  Register use and spills
# of every configuration LeNet launches: `python -m lenet_fast.compile_check`.
NUM_WARPS = 4

# Upper bound on the number of partial sums of a weight gradient: enough
# programs to fill the GPU, few enough that summing the partials is trivial.
_MAX_REDUCTION_PROGRAMS = 128


@dataclasses.dataclass
class Launch:
    """One kernel launch, as recorded by `recording_launches`."""

    kernel: Any  # the @triton.jit function
    grid: tuple
    args: tuple
    kwargs: dict


_recorded: list[Launch] | None = None


def launch(kernel: Callable, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """Launch `kernel` over `grid`: the only way the wrappers start a kernel.

    The launch goes through torch.library.wrap_triton, which a triton_op
    needs to see (and trace) the kernel.  Inside `recording_launches()` the
    launch is recorded instead, which lets lenet_fast.compile_check enumerate
    exactly what the wrappers would launch, without a GPU.
    """
    if _recorded is not None:
        _recorded.append(Launch(kernel, tuple(grid), args, kwargs))
        return
    wrap_triton(kernel)[grid](*args, **kwargs)


@contextlib.contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Record launches instead of running them (run the wrappers on fake tensors)."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous


# Cross-entropy's ignored target (stock cross_entropy's default ignore_index).
IGNORE_INDEX = -100
# The profiler range of checks that run on CPU tensors only (benchmarks.count_kernels
# leaves them out of a step's kernels, as a GPU never runs them).
CPU_ONLY_CHECK = "lenet_fast: CPU-only check"


def check_buffer(t, name: str, shape: tuple, dtype, device) -> None:
    """ValueError unless t is a contiguous `dtype` tensor of `shape` on `device`: a buffer a
    kernel reads or writes in place is used as it is (a copy would not be the caller's)."""
    if t.dtype != dtype or tuple(t.shape) != tuple(shape) or t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}; "
                         f"got {t.dtype}, {tuple(t.shape)} on {t.device}"
                         f"{'' if t.is_contiguous() else ', not contiguous'}")


def check_targets(target, num_classes: int) -> None:
    """IndexError for a target outside [0, num_classes) other than IGNORE_INDEX, on CPU
    tensors only: on a GPU it would cost kernels and a host sync every step (the kernels
    make such a row's loss NaN instead)."""
    if target.is_cuda or target.numel() == 0:
        return
    with torch.profiler.record_function(CPU_ONLY_CHECK):
        bad_rows = ((target < 0) | (target >= num_classes)) & (target != IGNORE_INDEX)
        if bool(bad_rows.any()):
            raise IndexError(f"target holds class index {target[bad_rows][0].item()}, outside "
                             f"[0, {num_classes}) (and not the ignored index {IGNORE_INDEX})")


def dot_precision() -> str:
    """The `input_precision` passed to every tl.dot on fp32 tiles."""
    return "tf32" if ALLOW_TF32 else "ieee"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b), for the launch wrappers' host code.  triton.cdiv and
    triton.next_power_of_2 are constexpr functions, whose every call from Python goes
    through Triton's JIT dispatch: a few of them per launch showed in the host time of a step."""
    return -(-int(a) // int(b))


def pow2_clamp(n: int, lo: int, hi: int) -> int:
    """next_power_of_2(n) limited to [lo, hi]; tl.dot needs every tile dim >= 16."""
    return max(lo, min(hi, 1 << (max(int(n), 1) - 1).bit_length()))


def pixel_block(n_pix: int, on_gpu: bool) -> int:
    """Pixels per program for a conv-like kernel.

    GPU: 64, which keeps the gathered tiles in registers and still gives
    thousands of programs at LeNet's batch 1024 and ~170 at batch 64.  CPU,
    i.e. the Triton interpreter, pays mostly per program and per op (Python
    overhead), hardly per element, so it gets about 4 programs along the pixel
    axis, with blocks of 64 to 4096: small test shapes still run several
    programs (block edges, blocks spanning images) and LeNet's batch-64 layers
    take a fraction of a second instead of tens.
    """
    if not on_gpu:
        return pow2_clamp(cdiv(n_pix, 4), 64, 4096)
    return 64


def taps_block(C: int, on_gpu: bool) -> int:
    """im2col rows (channel*9 + tap) per tl.dot step.  GPU: 16, the smallest
    tl.dot depth, because each row is a gathered [BLOCK_P] vector of 64-bit
    addresses; CPU: up to 64, so LeNet's 9 and 54 rows take one step."""
    return 16 if on_gpu else pow2_clamp(C * 9, 16, 64)


def reduction_split(n_blocks: int) -> tuple[int, int]:
    """Split `n_blocks` pixel blocks of a gradient reduction over programs.

    Returns (programs, blocks_per_program).  Program i reduces the contiguous
    blocks [i*blocks_per_program, (i+1)*blocks_per_program); the split depends
    only on the problem size, so the summation order, and with it the result,
    is the same on every run.
    """
    per_program = max(1, cdiv(n_blocks, _MAX_REDUCTION_PROGRAMS))
    return max(1, cdiv(n_blocks, per_program)), per_program


# Block sizes of the 3x3-convolution kernels (plain and pooled share them).
# BLOCK_CO/BLOCK_CI: output/input channels per program (or per tl.dot step of
# the input gradient), BLOCK_P: pixels per program, BLOCK_J: im2col rows per
# tl.dot step.  Channel blocks are 16 or 32 (tl.dot's minimum is 16; LeNet
# has 6 and 16 channels; wider layers get several channel blocks).


def conv_forward_config(n_pix: int, C_in: int, C_out: int, on_gpu: bool = True) -> dict:
    return {
        "BLOCK_CO": pow2_clamp(C_out, 16, 32),
        "BLOCK_P": pixel_block(n_pix, on_gpu),
        "BLOCK_J": taps_block(C_in, on_gpu),
        "num_warps": NUM_WARPS,
        # The tap loop runs 1 (conv1) or 4 (conv2) times: one gather in
        # flight is enough, and a third stage costs registers (fused conv2 on
        # sm_80: 237 with 3 stages, 154 with 2).
        "num_stages": 2,
    }


def conv_weight_grad_config(n_pix: int, C_in: int, C_out: int, on_gpu: bool = True) -> dict:
    # The pixel axis is the reduction here; on the GPU its parallelism comes
    # from reduction_split.
    return {
        "BLOCK_CO": pow2_clamp(C_out, 16, 32),
        "BLOCK_P": pixel_block(n_pix, on_gpu),
        "BLOCK_J": taps_block(C_in, on_gpu),
        # Eight warps halve the per-thread share of the gathered tiles; the
        # pooled variant needs ~200 registers per thread with four.
        "num_warps": 8,
    }


def conv_input_grad_config(n_pix: int, C_in: int, C_out: int, on_gpu: bool = True) -> dict:
    return {
        "BLOCK_CI": pow2_clamp(C_in, 16, 32),
        # 32 pixels on eight warps: each tap's sum is kept apart and masked to the
        # pixels the tap reaches (no 0 * W off the image, see the kernels), which
        # spilled with 64 pixels on four or eight warps, under Triton 3.6 or 3.8
        # (compile_check; the GPU machines carry 3.6).
        "BLOCK_P": min(32, pixel_block(n_pix, on_gpu)) if on_gpu else pixel_block(n_pix, on_gpu),
        "BLOCK_CO": pow2_clamp(C_out, 16, 32),
        "num_warps": 8,
        # The loop over output-channel blocks runs once for LeNet (16
        # channels): software pipelining it buys nothing and more than
        # doubles the registers (compile_check shows them).
        "num_stages": 1,
    }


@triton.jit
def relu(v):
    # `v < 0` is False for NaN, so NaN passes through as in torch.relu.
    return tl.where(v < 0, 0.0, v)


@triton.jit
def relu_grad(grad, out):
    # torch's threshold_backward zeroes the gradient where out <= 0; a NaN
    # output lets the gradient through, and so does this.
    return tl.where(out <= 0, 0.0, grad)


# The pooling ops' code for "ReLU blocks the gradient" (lenet_fast.ops, the backward
# contract): beside the winner's place 0..3 in the window, it matches no place, so a
# backward kernel's `code == place` selection drops such an element.
RELU_BLOCKED = tl.constexpr(4)


@triton.jit
def pool_update(best, best_pos, v, pos: tl.constexpr):
    """One step of the 2x2 max-pool scan over positions 0..3 (row-major).

    Same rule as ATen's max_pool2d: a value replaces the running maximum when it
    is strictly greater (so the first of equal maxima wins) or when it is NaN
    (so NaN wins, and of several NaNs the last one does).
    """
    take = (v > best) | (v != v)
    return tl.where(take, v, best), tl.where(take, pos, best_pos)


@triton.jit
def split_pixel(p, H, W):
    """Flat pixel index p over (n, y, x) of an (H, W) plane -> (n, r, y, x).

    n stays int64 (p can pass 2**31 across a large batch); r = y*W + x, the offset
    inside one image's plane, fits in int32, and so do y and x.
    """
    n = p // (H * W)
    r = (p - n * (H * W)).to(tl.int32)
    y = r // W
    x = r - y * W
    return n, r, y, x


@triton.jit
def im2col_3x3(x_ptr, img_base, oh, ow, valid_p, j, C, H, W, PAD: tl.constexpr):
    """The [len(j), len(oh)] im2col tile of a 3x3 convolution.

    Row j = ci*9 + kh*3 + kw of column p holds x[n, ci, oh+kh-PAD, ow+kw-PAD],
    or 0 outside the image (zero padding), for j >= C*9 or for an invalid p.
    img_base is n*C*H*W per pixel (int64); oh/ow are output coordinates.
    """
    ci = j // 9
    tap = j - ci * 9
    kh = tap // 3
    kw = tap - kh * 3
    ih = oh[None, :] + (kh - PAD)[:, None]
    iw = ow[None, :] + (kw - PAD)[:, None]
    mask = (j < C * 9)[:, None] & valid_p[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    offs = img_base[None, :] + (ci * (H * W))[:, None] + ih * W + iw
    return tl.load(x_ptr + offs, mask=mask, other=0.0)
