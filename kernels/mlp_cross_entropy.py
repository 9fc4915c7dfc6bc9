"""Mean cross-entropy of logits against class indices, and its gradient, in one pass.

    loss = mean_n (logsumexp(z[n]) - z[n, t[n]])        dz = (softmax(z) - onehot(t)) / N

over the rows whose target is not IGNORE_INDEX (-100, stock cross_entropy's
ignore_index): such a row adds nothing to the loss or the gradient, and N counts
the other rows (none: NaN loss, zero gradient, as in stock).

The loss of the classifier head `mlp_cross_entropy`, whose layers are
kernels/linear.py's.  One program per block of rows: each row's max, exp, sum and
log stay in registers, and the row losses and dz are written in the same pass, so
the backward is dz times the loss's gradient (no second read of the logits, no
separate log_softmax / nll_loss and their two backward kernels).  The mean is
taken afterwards over the row losses in a fixed order (deterministic).

Any other target outside [0, C) makes that row's loss and gradient NaN: the kernel cannot
raise, and a NaN loss cannot go unnoticed (stock PyTorch fails a device assert on
CUDA).  The launch wrapper raises IndexError instead, as stock does, when the
tensors are on the CPU (the interpreter), where checking costs no device
synchronisation.
"""

import torch
import triton
import triton.language as tl

from ._common import NUM_WARPS, launch, pow2_clamp

IGNORE_INDEX = -100


@triton.jit
def softmax_cross_entropy_kernel(z_ptr, t_ptr, row_loss_ptr, dz_ptr, counted_ptr, N, C,
                                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IGNORE: tl.constexpr):
    """Program i: rows [i * BLOCK_R, (i + 1) * BLOCK_R), all C columns (C <= BLOCK_C).
    counted_ptr: the number of rows not ignored (a device scalar: no host sync to read it)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    valid_r = rows < N
    mask = valid_r[:, None] & (cols[None, :] < C)
    z = tl.load(z_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=-float("inf"))
    t = tl.load(t_ptr + rows, mask=valid_r, other=0)
    # The max shift keeps exp() finite; a NaN anywhere in a row makes its max NaN
    # (as in stock), which tl.max alone does not promise.  Rows past N get 0.
    has_nan = tl.sum((z != z).to(tl.int32), axis=1) > 0
    m = tl.where(has_nan, float("nan"), tl.max(z, axis=1))
    m = tl.where(valid_r, m, 0.0)
    e = tl.exp(z - m[:, None])                       # padding columns: exp(-inf) = 0
    s = tl.where(valid_r, tl.sum(e, axis=1), 1.0)
    is_target = cols[None, :] == t[:, None]
    ignored = t == IGNORE
    target_ok = (t >= 0) & (t < C)
    z_t = tl.where(target_ok, tl.sum(tl.where(is_target, z, 0.0), axis=1), float("nan"))
    tl.store(row_loss_ptr + rows, tl.where(ignored, 0.0, m + tl.log(s) - z_t), mask=valid_r)
    inv_n = 1.0 / tl.maximum(tl.load(counted_ptr), 1.0)  # nothing counted: every row is ignored
    dz = (e / s[:, None] - is_target.to(tl.float32)) * inv_n
    dz = tl.where(target_ok[:, None], dz, float("nan"))
    dz = tl.where(ignored[:, None], 0.0, dz)
    tl.store(dz_ptr + rows[:, None] * C + cols[None, :], dz, mask=mask)


# --------------------------------------------------------------------------- block sizes


def softmax_cross_entropy_config(N: int, C: int, on_gpu: bool = True) -> dict:
    """A whole row per program row (classifier heads have few classes: LeNet 10);
    16 rows per program on the GPU, the whole batch at once in the interpreter."""
    block_c = pow2_clamp(C, 16, 1 << 14)
    if on_gpu:
        return {"BLOCK_R": 16, "BLOCK_C": block_c, "num_warps": NUM_WARPS}
    return {"BLOCK_R": pow2_clamp(N, 16, 1024), "BLOCK_C": block_c, "num_warps": NUM_WARPS}


# --------------------------------------------------------------------------- launch wrapper


def softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, d loss / d logits) for logits (N, C) and int64 class indices (N,)."""
    logits, target = logits.contiguous(), target.contiguous()
    N, C = logits.shape
    if C > 1 << 14:
        raise ValueError(f"softmax_cross_entropy holds a row in one block: at most {1 << 14} classes, got {C}")
    # Checked on the CPU only: on a GPU it would cost kernels and a host sync every step.
    bad_rows = None if logits.is_cuda or N == 0 else ((target < 0) | (target >= C)) & (target != IGNORE_INDEX)
    if bad_rows is not None and bool(bad_rows.any()):
        bad = target[bad_rows][0].item()
        raise IndexError(f"target holds class index {bad}, outside [0, {C}) for logits of shape "
                         f"{tuple(logits.shape)} (and not the ignored index {IGNORE_INDEX})")
    row_loss = torch.empty((N,), device=logits.device, dtype=logits.dtype)
    dz = torch.empty_like(logits)
    counted = (target != IGNORE_INDEX).sum().to(logits.dtype)
    if N > 0:
        cfg = softmax_cross_entropy_config(N, C, logits.is_cuda)
        launch(softmax_cross_entropy_kernel, (triton.cdiv(N, cfg["BLOCK_R"]),),
               logits, target, row_loss, dz, counted, N, C, IGNORE=IGNORE_INDEX, **cfg)
    return row_loss.sum() / counted, dz  # nothing counted: 0 / 0 = NaN, as stock's mean over nothing
