"""max_pool2d(x, 2): 2x2 window, stride 2, floor mode, and its gradient.

    forward(x) -> (out, code)
    backward(grad_out, code, x) -> grad_x          (x only gives the shape)

The forward pass also records, per output element, which of the four window
positions won (0 = top-left, 1 = top-right, 2 = bottom-left, 3 = bottom-right)
as a uint8 code: an eighth of the memory of ATen's int64 flat indices, and all
the backward pass needs.  Ties and NaN follow ATen (see _common.pool_update).
"""

import torch
import triton
import triton.language as tl

from ._common import NUM_WARPS, RELU_BLOCKED, cdiv, launch, pool_update


@triton.jit
def maxpool2x2_fwd_kernel(x_ptr, out_ptr, idx_ptr, n_out, H, W, PH, PW, BLOCK: tl.constexpr):
    """Program i: output elements [i*BLOCK, +BLOCK) of the flattened (n*c, ph, pw) axis."""
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = q < n_out
    plane = q // (PH * PW)
    r = (q - plane * (PH * PW)).to(tl.int32)
    ph = r // PW
    pw = r - ph * PW
    top_left = x_ptr + plane * (H * W) + (2 * ph) * W + 2 * pw
    best = tl.load(top_left, mask=valid)
    pos = tl.zeros((BLOCK,), dtype=tl.int32)
    best, pos = pool_update(best, pos, tl.load(top_left + 1, mask=valid), 1)
    best, pos = pool_update(best, pos, tl.load(top_left + W, mask=valid), 2)
    best, pos = pool_update(best, pos, tl.load(top_left + W + 1, mask=valid), 3)
    tl.store(out_ptr + q, best, mask=valid)
    tl.store(idx_ptr + q, pos.to(tl.uint8), mask=valid)


@triton.jit
def maxpool2x2_bwd_kernel(grad_ptr, idx_ptr, gx_ptr, n_in, H, W, PH, PW, BLOCK: tl.constexpr):
    """Program i: grad_input elements [i*BLOCK, +BLOCK) of the flattened
    (n*c, ih, iw) axis.  Each input element pulls the gradient of its window
    if it was the winner, so every element is written exactly once (no zero
    fill, no scatter) and the odd last row/column of floor mode gets 0."""
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = q < n_in
    plane = q // (H * W)
    r = (q - plane * (H * W)).to(tl.int32)
    ih = r // W
    iw = r - ih * W
    ph = ih // 2
    pw = iw // 2
    in_window = valid & (ph < PH) & (pw < PW)
    o = plane * (PH * PW) + ph * PW + pw
    winner = tl.load(idx_ptr + o, mask=in_window, other=RELU_BLOCKED).to(tl.int32)  # matches no place
    g = tl.load(grad_ptr + o, mask=in_window, other=0.0)
    mine = winner == (ih - 2 * ph) * 2 + (iw - 2 * pw)
    tl.store(gx_ptr + q, tl.where(mine, g, 0.0), mask=valid)


# --------------------------------------------------------------------------- launch wrappers

# Elementwise kernels: one element per lane, 1024 per program.
BLOCK = 1024


def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_pool2d(x, 2), uint8 winner position 0..3 per output element)."""
    x = x.contiguous()
    N, C, H, W = x.shape
    PH, PW = H // 2, W // 2
    out = torch.empty((N, C, PH, PW), device=x.device, dtype=x.dtype)
    idx = torch.empty((N, C, PH, PW), device=x.device, dtype=torch.uint8)
    if out.numel() == 0:
        return out, idx
    launch(
        maxpool2x2_fwd_kernel, (cdiv(out.numel(), BLOCK),),
        x, out, idx, out.numel(), H, W, PH, PW, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return out, idx


def backward(grad_out: torch.Tensor, code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad_x of x's shape from grad_out and the winner codes (x's values are not read)."""
    grad, idx = grad_out.contiguous(), code.contiguous()
    N, C, PH, PW = idx.shape
    H, W = x.shape[-2:]
    gx = torch.empty((N, C, H, W), device=grad.device, dtype=grad.dtype)
    if gx.numel() == 0:
        return gx
    launch(
        maxpool2x2_bwd_kernel, (cdiv(gx.numel(), BLOCK),),
        grad, idx, gx, gx.numel(), H, W, PH, PW, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return gx
