"""LeNet's whole head, forward and backward, with its loss, in one launch.

    head_step(features, w3, b3, w4, b4, w5, b5, target, out=None) -> HeadStep

features (N, K1) fp32 is the conv stack's output, flattened; the head is

    h1 = relu(features @ w3^T + b3)     w3 (H1, K1)   LeNet: 120 x 400
    h2 = relu(h1 @ w4^T + b4)           w4 (H2, H1)          84 x 120
    z  = h2 @ w5^T + b5                 w5 (C, H2)           10 x 84

with softmax cross-entropy against the int64 class indices `target` (N,); a row
whose target is IGNORE_INDEX (-100, stock cross_entropy's ignore_index) adds
nothing to the loss or the gradients, and is not counted.

One program per block of BLOCK_M rows runs the forward, the loss, and the
backward of its rows, with the rows' activations in registers; only the
outputs below reach global memory.

Scaling (the design shared with kernels/lenet_sgd.py): everything this kernel
writes is a gradient of the SUM of the counted rows' losses, not of their mean,
because the mean divides by the number of counted rows of the whole batch,
which no single program knows.  The row gradient is dz = softmax(z) - onehot(t)
(0 for an ignored row), and

    dfeatures                 d sum / d features, (N, K1)
    w3_part .. b5_part        per-program partial sums of d sum / d parameter,
                              (P, *parameter.shape), P = cdiv(N, BLOCK_M)
    loss_part (P,) fp32       per-program sums of the counted rows' losses
    count_part (P,) int32     per-program numbers of counted rows
    correct_part (P,) int32   per-program numbers of rows with argmax(z) == target
                              (the first maximum, as torch.argmax; a NaN wins)

The backward is linear in dz, so the conv stack's backward may run on the
unscaled dfeatures and produce unscaled partials too: kernels/lenet_sgd.py sums
each parameter's partials over axis 0 in a fixed order and multiplies by
1 / max(count, 1), count = sum(count_part), which gives the gradient of the
mean loss over the counted rows (no row counted: zero gradients, and the mean
loss 0 / 0 = NaN, as stock).  The partials are summed in a fixed order, never
with atomics, so two runs are bitwise the same.

How the chain stays in registers: a register tensor cannot be sliced, and an
fp32 "ieee" tl.dot (the FMA path) holds a thread's whole depth of both operands
in registers, so a dot as deep as h1 (128) spills.  Every contraction over a
hidden dimension therefore runs over pieces that are produced apart:

* h1 is kept as four pieces of H1Q columns (LeNet: 4 x 32 for 120), each
  accumulated by its own dot over fc1's K1 inputs in steps of BLOCK_K;
* fc2 and fc3 run over chunks of HC of fc2's outputs: h2c = relu(sum over the
  pieces of h1_piece @ w4[chunk, piece]^T + b4[chunk]), then z += h2c @
  w5[:, chunk]^T;
* the backward runs the chunk loop again, recomputing h2c (cheaper in registers
  than keeping it, and fc2 is a sixth of fc1's work), writes d w5[:, chunk]
  and d w4[chunk, :], and accumulates dh1 += dh2c @ w4[chunk, :] piece by piece;
* fc1's backward writes d w3 and d features step by step over K1.

Every tl.dot is then at most max(H1Q, HC, BLOCK_K, BLOCK_M) deep.

Targets outside [0, C) other than IGNORE_INDEX make the row's loss and
gradients NaN (a kernel cannot raise); on the CPU the wrapper raises IndexError
instead, as kernels/mlp_cross_entropy.py does.
"""

from __future__ import annotations

import functools
import typing

import torch
import triton
import triton.language as tl

from ._common import (
    IGNORE_INDEX, NUM_WARPS, cdiv, check_buffer, check_targets, dot_precision, launch, pow2_clamp, relu, relu_grad,
)



@triton.jit
def lenet_head_step_kernel(
    x_ptr, w3_ptr, b3_ptr, w4_ptr, b4_ptr, w5_ptr, b5_ptr, t_ptr,
    dx_ptr, gw3_ptr, gb3_ptr, gw4_ptr, gb4_ptr, gw5_ptr, gb5_ptr,
    loss_ptr, count_ptr, correct_ptr,
    N, K1, H1, H2, C,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, H1Q: tl.constexpr, HC: tl.constexpr, CP: tl.constexpr,
    IGNORE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program i: rows [i * BLOCK_M, (i + 1) * BLOCK_M).  fc1's K1 inputs in steps of
    BLOCK_K; its H1 <= 4 * H1Q outputs as four pieces of H1Q (a, b, c, d); fc2's H2
    outputs in chunks of HC; C <= CP classes."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid_m = rows < N
    ra = tl.arange(0, H1Q)
    rb = ra + H1Q
    rc = ra + 2 * H1Q
    rd = ra + 3 * H1Q
    va, vb, vc, vd = ra < H1, rb < H1, rc < H1, rd < H1
    rz = tl.arange(0, CP)
    valid_z = rz < C

    # ---- fc1: h1 = relu(x @ w3^T + b3), as four [BLOCK_M, H1Q] pieces.
    acc_a = tl.zeros((BLOCK_M, H1Q), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, H1Q), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_M, H1Q), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_M, H1Q), dtype=tl.float32)
    for k0 in range(0, K1, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        valid_k = rk < K1
        x = _tile(x_ptr, rows, rk, K1, valid_m, valid_k)
        acc_a = tl.dot(x, _tile_t(w3_ptr, rk, ra, K1, valid_k, va), acc_a, input_precision=PRECISION)
        acc_b = tl.dot(x, _tile_t(w3_ptr, rk, rb, K1, valid_k, vb), acc_b, input_precision=PRECISION)
        acc_c = tl.dot(x, _tile_t(w3_ptr, rk, rc, K1, valid_k, vc), acc_c, input_precision=PRECISION)
        acc_d = tl.dot(x, _tile_t(w3_ptr, rk, rd, K1, valid_k, vd), acc_d, input_precision=PRECISION)
    h1a = _fc1_piece(acc_a, b3_ptr, ra, va, valid_m)
    h1b = _fc1_piece(acc_b, b3_ptr, rb, vb, valid_m)
    h1c = _fc1_piece(acc_c, b3_ptr, rc, vc, valid_m)
    h1d = _fc1_piece(acc_d, b3_ptr, rd, vd, valid_m)

    # ---- fc2 and fc3 over chunks of fc2's outputs: z = sum over chunks of h2c @ w5[:, chunk]^T.
    z = tl.zeros((BLOCK_M, CP), dtype=tl.float32)
    for j0 in range(0, H2, HC):
        h2c, rj, valid_j = _fc2_chunk(h1a, h1b, h1c, h1d, w4_ptr, b4_ptr, ra, rb, rc, rd, va, vb, vc, vd,
                                      valid_m, j0, H1, H2, HC, PRECISION)
        z = tl.dot(h2c, _tile_t(w5_ptr, rj, rz, H2, valid_j, valid_z), z, input_precision=PRECISION)
    z = z + tl.load(b5_ptr + rz, mask=valid_z, other=0.0)[None, :]
    z = tl.where(valid_z[None, :], z, -float("inf"))

    # ---- the loss, the row gradient dz = softmax(z) - onehot(t), the correct count.
    t = tl.load(t_ptr + rows, mask=valid_m, other=IGNORE)  # rows past N: ignored
    counted = t != IGNORE
    target_ok = (t >= 0) & (t < C)
    is_nan = z != z  # noqa: PLR0124 (the NaN test)
    has_nan = tl.sum(is_nan.to(tl.int32), axis=1) > 0
    zmax = tl.max(z, axis=1)
    # The max shift keeps exp() finite; a NaN anywhere in a row makes it NaN, as in
    # stock, which tl.max alone does not promise.
    m = tl.where(has_nan, float("nan"), zmax)
    e = tl.exp(z - m[:, None])  # padding columns: exp(-inf) = 0
    s = tl.sum(e, axis=1)
    is_target = rz[None, :] == t[:, None]
    z_t = tl.where(target_ok, tl.sum(tl.where(is_target, z, 0.0), axis=1), float("nan"))
    row_loss = tl.where(counted, m + tl.log(s) - z_t, 0.0)
    dz = tl.where(target_ok[:, None], e / s[:, None] - is_target.to(tl.float32), float("nan"))
    dz = tl.where(counted[:, None] & valid_z[None, :], dz, 0.0)
    # argmax as torch.argmax: the first NaN of a row if it has one, else its first maximum.
    first_nan = tl.min(tl.where(is_nan, rz[None, :], CP), axis=1)
    first_max = tl.min(tl.where(z == zmax[:, None], rz[None, :], CP), axis=1)
    correct = tl.where(has_nan, first_nan, first_max) == t
    tl.store(loss_ptr + pid, tl.sum(row_loss, axis=0))
    tl.store(count_ptr + pid, tl.sum(counted.to(tl.int32), axis=0))
    tl.store(correct_ptr + pid, tl.sum(correct.to(tl.int32), axis=0))  # rows past N: t = IGNORE < 0

    # ---- backward of fc3 and fc2 over the same chunks (h2c recomputed); dh1 accumulates.
    pw = pid.to(tl.int64)
    tl.store(gb5_ptr + pw * C + rz, tl.sum(dz, axis=0), mask=valid_z)
    dh1a = tl.zeros((BLOCK_M, H1Q), dtype=tl.float32)
    dh1b = tl.zeros((BLOCK_M, H1Q), dtype=tl.float32)
    dh1c = tl.zeros((BLOCK_M, H1Q), dtype=tl.float32)
    dh1d = tl.zeros((BLOCK_M, H1Q), dtype=tl.float32)
    for j0 in range(0, H2, HC):
        h2c, rj, valid_j = _fc2_chunk(h1a, h1b, h1c, h1d, w4_ptr, b4_ptr, ra, rb, rc, rd, va, vb, vc, vd,
                                      valid_m, j0, H1, H2, HC, PRECISION)
        # d w5[:, chunk] = dz^T @ h2c
        gw5 = tl.dot(tl.trans(dz), h2c, input_precision=PRECISION)
        tl.store(gw5_ptr + pw * C * H2 + rz[:, None] * H2 + rj[None, :], gw5, mask=valid_z[:, None] & valid_j[None, :])
        # dh2c = dz @ w5[:, chunk], through ReLU
        dh2c = relu_grad(tl.dot(dz, _tile(w5_ptr, rz, rj, H2, valid_z, valid_j), input_precision=PRECISION), h2c)
        tl.store(gb4_ptr + pw * H2 + rj, tl.sum(dh2c, axis=0), mask=valid_j)
        # d w4[chunk, :] = dh2c^T @ h1, and dh1 += dh2c @ w4[chunk, :], piece by piece
        dh2t = tl.trans(dh2c)
        gw4 = gw4_ptr + pw * H2 * H1 + rj[:, None] * H1
        tl.store(gw4 + ra[None, :], tl.dot(dh2t, h1a, input_precision=PRECISION), mask=valid_j[:, None] & va[None, :])
        tl.store(gw4 + rb[None, :], tl.dot(dh2t, h1b, input_precision=PRECISION), mask=valid_j[:, None] & vb[None, :])
        tl.store(gw4 + rc[None, :], tl.dot(dh2t, h1c, input_precision=PRECISION), mask=valid_j[:, None] & vc[None, :])
        tl.store(gw4 + rd[None, :], tl.dot(dh2t, h1d, input_precision=PRECISION), mask=valid_j[:, None] & vd[None, :])
        dh1a = tl.dot(dh2c, _tile(w4_ptr, rj, ra, H1, valid_j, va), dh1a, input_precision=PRECISION)
        dh1b = tl.dot(dh2c, _tile(w4_ptr, rj, rb, H1, valid_j, vb), dh1b, input_precision=PRECISION)
        dh1c = tl.dot(dh2c, _tile(w4_ptr, rj, rc, H1, valid_j, vc), dh1c, input_precision=PRECISION)
        dh1d = tl.dot(dh2c, _tile(w4_ptr, rj, rd, H1, valid_j, vd), dh1d, input_precision=PRECISION)

    # ---- backward of fc1: d b3, then d w3 and d features over fc1's input steps.
    dh1a = relu_grad(dh1a, h1a)
    dh1b = relu_grad(dh1b, h1b)
    dh1c = relu_grad(dh1c, h1c)
    dh1d = relu_grad(dh1d, h1d)
    gb3 = gb3_ptr + pw * H1
    tl.store(gb3 + ra, tl.sum(dh1a, axis=0), mask=va)
    tl.store(gb3 + rb, tl.sum(dh1b, axis=0), mask=vb)
    tl.store(gb3 + rc, tl.sum(dh1c, axis=0), mask=vc)
    tl.store(gb3 + rd, tl.sum(dh1d, axis=0), mask=vd)
    dta, dtb, dtc, dtd = tl.trans(dh1a), tl.trans(dh1b), tl.trans(dh1c), tl.trans(dh1d)
    for k0 in range(0, K1, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        valid_k = rk < K1
        x = _tile(x_ptr, rows, rk, K1, valid_m, valid_k)
        # d w3[:, step] = dh1^T @ x[:, step], piece by piece
        gw3 = gw3_ptr + pw * H1 * K1 + rk[None, :]
        tl.store(gw3 + ra[:, None] * K1, tl.dot(dta, x, input_precision=PRECISION), mask=va[:, None] & valid_k[None, :])
        tl.store(gw3 + rb[:, None] * K1, tl.dot(dtb, x, input_precision=PRECISION), mask=vb[:, None] & valid_k[None, :])
        tl.store(gw3 + rc[:, None] * K1, tl.dot(dtc, x, input_precision=PRECISION), mask=vc[:, None] & valid_k[None, :])
        tl.store(gw3 + rd[:, None] * K1, tl.dot(dtd, x, input_precision=PRECISION), mask=vd[:, None] & valid_k[None, :])
        # d features[:, step] = dh1 @ w3[:, step]
        dx = tl.dot(dh1a, _tile(w3_ptr, ra, rk, K1, va, valid_k), input_precision=PRECISION)
        dx = tl.dot(dh1b, _tile(w3_ptr, rb, rk, K1, vb, valid_k), dx, input_precision=PRECISION)
        dx = tl.dot(dh1c, _tile(w3_ptr, rc, rk, K1, vc, valid_k), dx, input_precision=PRECISION)
        dx = tl.dot(dh1d, _tile(w3_ptr, rd, rk, K1, vd, valid_k), dx, input_precision=PRECISION)
        tl.store(dx_ptr + rows[:, None] * K1 + rk[None, :], dx, mask=valid_m[:, None] & valid_k[None, :])


@triton.jit
def _tile(ptr, r, c, ld, valid_r, valid_c):
    """The [len(r), len(c)] tile W[r, c] of a row-major matrix W with leading dimension ld
    (0 outside the valid rows and columns)."""
    return tl.load(ptr + r[:, None] * ld + c[None, :], mask=valid_r[:, None] & valid_c[None, :], other=0.0)


@triton.jit
def _tile_t(ptr, r, c, ld, valid_r, valid_c):
    """The [len(r), len(c)] tile W^T[r, c] = W[c, r] of a row-major W with leading dimension ld."""
    return tl.load(ptr + c[None, :] * ld + r[:, None], mask=valid_r[:, None] & valid_c[None, :], other=0.0)


@triton.jit
def _fc1_piece(acc, b3_ptr, r1, valid_1, valid_m):
    """relu(acc + b3[r1]), one piece of h1.  Rows past N are 0, so that they reach no weight
    gradient (not even as 0 * NaN from a NaN bias), and so are padding columns."""
    h = relu(acc + tl.load(b3_ptr + r1, mask=valid_1, other=0.0)[None, :])
    return tl.where(valid_m[:, None] & valid_1[None, :], h, 0.0)


@triton.jit
def _fc2_chunk(h1a, h1b, h1c, h1d, w4_ptr, b4_ptr, ra, rb, rc, rd, va, vb, vc, vd, valid_m, j0, H1, H2,
               HC: tl.constexpr, PRECISION: tl.constexpr):
    """(h2c = relu(h1 @ w4[j0:j0+HC]^T + b4[j0:j0+HC]) [BLOCK_M, HC], its output indices,
    their mask), from h1's four pieces; padding columns and rows past N are 0."""
    rj = j0 + tl.arange(0, HC)
    valid_j = rj < H2
    acc = tl.dot(h1a, _tile_t(w4_ptr, ra, rj, H1, va, valid_j), input_precision=PRECISION)
    acc = tl.dot(h1b, _tile_t(w4_ptr, rb, rj, H1, vb, valid_j), acc, input_precision=PRECISION)
    acc = tl.dot(h1c, _tile_t(w4_ptr, rc, rj, H1, vc, valid_j), acc, input_precision=PRECISION)
    acc = tl.dot(h1d, _tile_t(w4_ptr, rd, rj, H1, vd, valid_j), acc, input_precision=PRECISION)
    h2c = relu(acc + tl.load(b4_ptr + rj, mask=valid_j, other=0.0)[None, :])
    return tl.where(valid_m[:, None] & valid_j[None, :], h2c, 0.0), rj, valid_j


# --------------------------------------------------------------------------- block sizes


@functools.lru_cache(maxsize=64)  # a pure function of its arguments, asked every step
def head_config(N: int, H1: int, C: int, on_gpu: bool = True) -> dict:
    """Rows per program (BLOCK_M), fc1's input step (BLOCK_K), the size of each of h1's
    four pieces (H1Q), fc2's output chunk (HC) and the padded class count (CP).

    GPU: 16 rows, tl.dot's smallest tile, so that LeNet's batch 64 still makes four
    programs (and every batch one per 16 rows); dots at most 32 deep (see the module
    docstring).  Eight warps: on four, sm_80 used all 255 registers.  One stage: the
    K1 loops gain little from pipelining and a second stage spilled on sm_90.  Checked
    without spills on sm_80 and sm_90 at batch 64, 256 and 1024 (the configuration
    does not depend on the batch) under Triton 3.6 and 3.8.  The interpreter (CPU)
    pays per program and per op, hardly per element: about four programs of up to
    256 rows, longer steps.
    """
    h1q, cp = pow2_clamp(cdiv(H1, 4), 16, 1 << 10), pow2_clamp(C, 16, 1 << 12)
    if on_gpu:
        return {"BLOCK_M": 16, "BLOCK_K": 16, "H1Q": h1q, "HC": 16, "CP": cp, "num_warps": 8,
                "num_stages": 1}
    return {"BLOCK_M": pow2_clamp(cdiv(N, 4), 16, 256), "BLOCK_K": 128, "H1Q": h1q, "HC": 32, "CP": cp,
            "num_warps": NUM_WARPS}


# --------------------------------------------------------------------------- launch wrapper


class HeadStep(typing.NamedTuple):
    """What head_step writes (see the module docstring for the scaling).  P = the number of
    programs, cdiv(N, BLOCK_M); the partials are in parameter order w3, b3, w4, b4, w5, b5."""

    dfeatures: torch.Tensor     # (N, K1) fp32
    w3_part: torch.Tensor       # (P, H1, K1) fp32
    b3_part: torch.Tensor       # (P, H1)
    w4_part: torch.Tensor       # (P, H2, H1)
    b4_part: torch.Tensor       # (P, H2)
    w5_part: torch.Tensor       # (P, C, H2)
    b5_part: torch.Tensor       # (P, C)
    loss_part: torch.Tensor     # (P,) fp32
    count_part: torch.Tensor    # (P,) int32
    correct_part: torch.Tensor  # (P,) int32

    def partials(self) -> list[torch.Tensor]:
        """The six parameter partials, in the order of the parameters (w3, b3, w4, b4, w5, b5)."""
        return [self.w3_part, self.b3_part, self.w4_part, self.b4_part, self.w5_part, self.b5_part]


def num_programs(N: int, H1: int, C: int, on_gpu: bool) -> int:
    """P: the number of programs (and of partial sums) head_step uses for N rows."""
    return cdiv(N, head_config(N, H1, C, on_gpu)["BLOCK_M"])


def empty_outputs(N: int, K1: int, H1: int, H2: int, C: int, device: torch.device | str,
                  on_gpu: bool | None = None) -> HeadStep:
    """Preallocated outputs for head_step(..., out=) at N rows (e.g. buffers a CUDA graph reuses).
    on_gpu: whose block size decides P (default: whether `device` is a CUDA device)."""
    device = torch.device(device)
    P = num_programs(N, H1, C, device.type == "cuda" if on_gpu is None else on_gpu)

    def f32(*shape):
        return torch.empty(shape, device=device, dtype=torch.float32)

    def i32(*shape):
        return torch.empty(shape, device=device, dtype=torch.int32)

    return HeadStep(f32(N, K1), f32(P, H1, K1), f32(P, H1), f32(P, H2, H1), f32(P, H2), f32(P, C, H2), f32(P, C),
                    f32(P), i32(P), i32(P))


def head_step(features: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor, w4: torch.Tensor, b4: torch.Tensor,
              w5: torch.Tensor, b5: torch.Tensor, target: torch.Tensor, out: HeadStep | None = None) -> HeadStep:
    """The head's forward, loss and backward for one batch, in one launch (none for N == 0).

    features (N, K1) fp32; w3 (H1, K1), b3 (H1,), w4 (H2, H1), b4 (H2,), w5 (C, H2), b5 (C,)
    fp32; target (N,) int64, IGNORE_INDEX for rows to ignore.  Returns a HeadStep of
    gradients of the summed (not mean) loss: see the module docstring.  `out`: a HeadStep
    from empty_outputs (same N, shapes, device), filled and returned instead of new tensors.
    """
    N, K1 = features.shape
    H1, H2, C = w3.shape[0], w4.shape[0], w5.shape[0]
    if w3.shape != (H1, K1) or w4.shape != (H2, H1) or w5.shape != (C, H2) or \
            b3.shape != (H1,) or b4.shape != (H2,) or b5.shape != (C,) or target.shape != (N,):
        raise ValueError(f"head_step: shapes do not chain: features {tuple(features.shape)}, w3 {tuple(w3.shape)}, "
                         f"b3 {tuple(b3.shape)}, w4 {tuple(w4.shape)}, b4 {tuple(b4.shape)}, w5 {tuple(w5.shape)}, "
                         f"b5 {tuple(b5.shape)}, target {tuple(target.shape)}")
    tensors = (features, w3, b3, w4, b4, w5, b5)
    if any(t.dtype != torch.float32 for t in tensors) or target.dtype != torch.int64:
        raise TypeError("head_step takes fp32 features and parameters and int64 targets")
    if H1 > 1 << 12 or C > 1 << 12:
        raise ValueError(f"head_step holds a row's {H1} fc1 outputs and {C} classes in registers: at most 4096 each")
    features, w3, b3, w4, b4, w5, b5, target = (t.contiguous() for t in (*tensors, target))
    on_gpu = features.is_cuda
    if out is None:
        out = empty_outputs(N, K1, H1, H2, C, features.device)
    else:
        want = empty_outputs(N, K1, H1, H2, C, "meta", on_gpu)
        for name, got, ref in zip(HeadStep._fields, out, want):
            check_buffer(got, f"head_step: out.{name}", ref.shape, ref.dtype, features.device)
    check_targets(target, C)
    if N == 0:
        return out
    cfg = head_config(N, H1, C, on_gpu)
    launch(lenet_head_step_kernel, (cdiv(N, cfg["BLOCK_M"]),),
           features, w3, b3, w4, b4, w5, b5, target, *out,
           N, K1, H1, H2, C, IGNORE=IGNORE_INDEX, PRECISION=dot_precision(), **cfg)
    return out
