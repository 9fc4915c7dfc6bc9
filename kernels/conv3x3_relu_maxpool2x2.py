"""max_pool2d(relu(conv2d(x, weight, bias, padding)), 2) in one kernel, and its gradients.

    forward(x, weight, bias, padding) -> (out, code)
    backward(grad_out, code, x, weight, padding, input_grad, weight_grad) -> (grad_x, grad_w, grad_b)

Forward: each program owns a tile of pooled pixels.  For each of the four
window positions it computes the convolution there (the implicit GEMM of
conv3x3_relu.py, on the im2col tile shifted by (dy, dx)), applies bias and
ReLU, and folds the result into a running 2x2 max.  The full-resolution
convolution output never reaches memory: only the pooled output and a uint8
code per pooled element are written: the winner's position 0..3 (row-major in
the window), or RELU_BLOCKED (4) where ReLU blocks the gradient.  That is
where the pooled output is <= 0 (relu(max) == max(relu), and torch's
threshold_backward zeroes where `out <= 0`; a NaN output lets the gradient
through), so the backward kernels never read the pooled output.

Backward: the gradient of the convolution output is non-zero only at each
window's winner, where it equals grad_pooled unless ReLU blocks it.  Both
gradient kernels rebuild that sparse gradient on the fly from the codes (a
code of 4 matches no window position, so selecting `code == pos` applies
ReLU's mask too):

    grad_weight[co, j] = sum_{p, pos}  [code(co, p) == pos] * g[co, p] * X_pos[j, p]
    grad_input[ci, q]  = sum_{co,kh,kw} W[co, ci, kh, kw] * gconv[co, q - (kh, kw) + pad]
"""

import torch
import triton
import triton.language as tl

from ._common import (
    RELU_BLOCKED, cdiv, conv_forward_config, conv_input_grad_config, conv_weight_grad_config, dot_precision,
    im2col_3x3, launch, pool_update, reduction_split, relu, split_pixel,
)


@triton.jit
def _conv_at(x_ptr, w_ptr, co, valid_co, img_base, oh, ow, valid_p, C_in, H, W,
             PAD: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr,
             PRECISION: tl.constexpr):
    """conv2d (no bias) for channels `co` at output pixels (oh, ow): [BLOCK_CO, BLOCK_P]."""
    K = C_in * 9
    acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
    for j0 in range(0, K, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        # The weight tile is re-read for each window position; it is a few KiB
        # and stays in L1, which is cheaper than holding four accumulators.
        w = tl.load(w_ptr + co[:, None] * K + j[None, :], mask=valid_co[:, None] & (j < K)[None, :], other=0.0)
        cols = im2col_3x3(x_ptr, img_base, oh, ow, valid_p, j, C_in, H, W, PAD)
        acc = tl.dot(w, cols, acc, input_precision=PRECISION)
    return acc


@triton.jit
def conv3x3_relu_maxpool2x2_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, idx_ptr,
    n_pix, C_in, H, W, C_out, PH, PW,
    PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (i, c): channels [c*BLOCK_CO, +BLOCK_CO) at the pooled pixels
    [i*BLOCK_P, +BLOCK_P) of the flattened (n, ph, pw) axis."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid_p = p < n_pix
    n, r, ph, pw = split_pixel(p, PH, PW)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    valid_co = co < C_out
    img_base = n * (C_in * H * W)
    if HAS_BIAS:
        bias = tl.load(b_ptr + co, mask=valid_co, other=0.0)[:, None]
    else:
        bias = tl.zeros((BLOCK_CO, 1), dtype=tl.float32)

    # Window position 0 seeds the running max; 1..3 are folded in, in row-major
    # order, with ATen's tie and NaN rule.  ReLU comes before the max (as in
    # the unfused model) so that ties among clamped zeros pick the same winner.
    best = relu(_conv_at(x_ptr, w_ptr, co, valid_co, img_base, 2 * ph, 2 * pw, valid_p, C_in, H, W,
                         PAD, BLOCK_CO, BLOCK_P, BLOCK_J, PRECISION) + bias)
    pos = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.int32)
    for k in tl.static_range(1, 4):
        v = _conv_at(x_ptr, w_ptr, co, valid_co, img_base, 2 * ph + k // 2, 2 * pw + k % 2, valid_p,
                     C_in, H, W, PAD, BLOCK_CO, BLOCK_P, BLOCK_J, PRECISION)
        best, pos = pool_update(best, pos, relu(v + bias), k)

    offs = (n * C_out * (PH * PW) + r)[None, :] + (co * (PH * PW))[:, None]
    mask = valid_co[:, None] & valid_p[None, :]
    tl.store(out_ptr + offs, best, mask=mask)
    # ReLU's gradient mask, as torch's threshold_backward: blocked where out <= 0 (not for NaN).
    tl.store(idx_ptr + offs, tl.where(best <= 0, RELU_BLOCKED, pos).to(tl.uint8), mask=mask)


# blocks_per_prog is often 1; specialising on it would only add a compiled variant.
@triton.jit(do_not_specialize=["blocks_per_prog"])
def conv3x3_relu_maxpool2x2_bwd_weight_kernel(
    x_ptr, grad_ptr, idx_ptr, gw_part_ptr, gb_part_ptr,
    n_pix, C_in, H, W, C_out, PH, PW, blocks_per_prog,
    PAD: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (s, c, t): partial sums of grad_weight[c-block, t-block of j]
    (and of grad_bias when t == 0) over pooled-pixel blocks
    [s*blocks_per_prog, (s+1)*blocks_per_prog), stored in row s of the partial buffers."""
    split = tl.program_id(0)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    valid_co = co < C_out
    K = C_in * 9
    j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)

    acc_w = tl.zeros((BLOCK_CO, BLOCK_J), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    first = split * blocks_per_prog
    last = tl.minimum(first + blocks_per_prog, tl.cdiv(n_pix, BLOCK_P))
    p = first.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    for _ in range(first, last):
        valid_p = p < n_pix
        n, r, ph, pw = split_pixel(p, PH, PW)
        offs = (n * C_out * (PH * PW) + r)[None, :] + (co * (PH * PW))[:, None]
        mask = valid_co[:, None] & valid_p[None, :]
        winner = tl.load(idx_ptr + offs, mask=mask, other=RELU_BLOCKED).to(tl.int32)
        # ReLU's mask, from the code; selected, not multiplied, so an inf/NaN gradient
        # where ReLU blocks it adds nothing.
        gm = tl.where(winner != RELU_BLOCKED, tl.load(grad_ptr + offs, mask=mask, other=0.0), 0.0)
        img_base = n * (C_in * H * W)
        # Each (channel, pooled pixel) has one winner (or none, code 4), so the four
        # position GEMMs see disjoint parts of gm; 4x the FLOPs of a gather, no scatter.
        for k in tl.static_range(4):
            cols = im2col_3x3(x_ptr, img_base, 2 * ph + k // 2, 2 * pw + k % 2, valid_p, j, C_in, H, W, PAD)
            acc_w = tl.dot(tl.where(winner == k, gm, 0.0), tl.trans(cols), acc_w, input_precision=PRECISION)
        acc_b += tl.sum(gm, axis=1)
        p += BLOCK_P

    part = split.to(tl.int64) * C_out
    tl.store(gw_part_ptr + (part + co)[:, None] * K + j[None, :], acc_w,
             mask=valid_co[:, None] & (j < K)[None, :])
    tl.store(gb_part_ptr + part + co, acc_b, mask=valid_co & (tl.program_id(2) == 0))


@triton.jit
def conv3x3_relu_maxpool2x2_bwd_input_kernel(
    grad_ptr, idx_ptr, w_ptr, gx_ptr,
    n_pix, C_in, H, W, C_out, PH, PW,
    PAD: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (i, c): grad_input for input channels [c*BLOCK_CI, +BLOCK_CI) at
    input pixels [i*BLOCK_P, +BLOCK_P) of the flattened (n, ih, iw) axis.

    One tl.dot per tap and block of output channels.  With the tap fixed, the
    convolution-output pixel an input pixel feeds, its pooling window and its
    position in the window are per-pixel vectors, so the index math stays 1-D.
    """
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid_p = p < n_pix
    n, r, ih, iw = split_pixel(p, H, W)
    ci = tl.program_id(1) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    valid_ci = ci < C_in
    pooled_img = n * C_out * (PH * PW)

    acc = tl.zeros((BLOCK_CI, BLOCK_P), dtype=tl.float32)
    for tap in tl.static_range(9):
        # Only convolution outputs inside a pooling window (rows < 2*PH,
        # cols < 2*PW) can carry gradient; floor mode drops the rest.  But every
        # output pixel that exists (rows < H + 2*PAD - 2) takes part in stock's
        # dense sum, so only taps off the image add nothing: not 0 * W, which a
        # NaN or inf weight would turn into NaN.
        oh = ih - tap // 3 + PAD
        ow = iw - tap % 3 + PAD
        on_image = valid_p & (oh >= 0) & (oh < H + 2 * PAD - 2) & (ow >= 0) & (ow < W + 2 * PAD - 2)
        valid = valid_p & (oh >= 0) & (oh < 2 * PH) & (ow >= 0) & (ow < 2 * PW)
        oh = tl.where(valid, oh, 0)  # keeps // below on non-negative values
        ow = tl.where(valid, ow, 0)
        ph = oh // 2
        pw = ow // 2
        window = pooled_img + ph * PW + pw
        pos = (oh - 2 * ph) * 2 + (ow - 2 * pw)
        tap_acc = tl.zeros((BLOCK_CI, BLOCK_P), dtype=tl.float32)
        for co0 in range(0, C_out, BLOCK_CO):
            co = co0 + tl.arange(0, BLOCK_CO)
            valid_co = co < C_out
            # weight[co, ci, kh, kw] as a [ci, co] tile.
            wt = tl.load(w_ptr + co[None, :] * (C_in * 9) + ci[:, None] * 9 + tap,
                         mask=valid_ci[:, None] & valid_co[None, :], other=0.0)
            offs = window[None, :] + (co * (PH * PW))[:, None]
            m = valid_co[:, None] & valid[None, :]
            winner = tl.load(idx_ptr + offs, mask=m, other=RELU_BLOCKED).to(tl.int32)
            # Code 4 (ReLU blocks the gradient) matches no position: ReLU's mask is applied here.
            gconv = tl.where(winner == pos[None, :], tl.load(grad_ptr + offs, mask=m, other=0.0), 0.0)
            tap_acc = tl.dot(wt, gconv, tap_acc, input_precision=PRECISION)
        acc += tl.where(on_image[None, :], tap_acc, 0.0)

    gx_offs = (n * C_in * (H * W) + r)[None, :] + (ci * (H * W))[:, None]
    tl.store(gx_ptr + gx_offs, acc, mask=valid_ci[:, None] & valid_p[None, :])


# --------------------------------------------------------------------------- launch wrappers


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_pool2d(relu(conv2d(x, weight, bias, padding)), 2), uint8 code: winner 0..3, or 4 where ReLU blocks)."""
    x, weight = x.contiguous(), weight.contiguous()
    N, C_in, H, W = x.shape
    C_out = weight.shape[0]
    PH, PW = (H + 2 * padding - 2) // 2, (W + 2 * padding - 2) // 2
    out = torch.empty((N, C_out, PH, PW), device=x.device, dtype=x.dtype)
    idx = torch.empty((N, C_out, PH, PW), device=x.device, dtype=torch.uint8)
    if out.numel() == 0:
        return out, idx
    n_pix = N * PH * PW
    # Eight warps: a program holds four conv tiles (one per pool-window corner), and with
    # four warps Triton 3.6 needs 255 registers per thread for conv2 and spills (3.8: 154).
    cfg = {**conv_forward_config(n_pix, C_in, C_out, x.is_cuda), "num_warps": 8}
    grid = (cdiv(n_pix, cfg["BLOCK_P"]), cdiv(C_out, cfg["BLOCK_CO"]))
    launch(
        conv3x3_relu_maxpool2x2_fwd_kernel, grid,
        x, weight, bias.contiguous() if bias is not None else weight, out, idx,
        n_pix, C_in, H, W, C_out, PH, PW,
        PAD=padding, HAS_BIAS=bias is not None, PRECISION=dot_precision(), **cfg,
    )
    return out, idx


def _backward_params(grad: torch.Tensor, idx: torch.Tensor, x: torch.Tensor,
                     padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight, grad_bias) from grad_pooled, the codes and the input."""
    grad, idx, x = grad.contiguous(), idx.contiguous(), x.contiguous()
    N, C_in, H, W = x.shape
    C_out, PH, PW = idx.shape[1:]
    K = C_in * 9
    n_pix = N * PH * PW
    if n_pix == 0:
        return x.new_zeros((C_out, C_in, 3, 3)), x.new_zeros((C_out,))
    cfg = conv_weight_grad_config(n_pix, C_in, C_out, x.is_cuda)
    splits, per_split = reduction_split(cdiv(n_pix, cfg["BLOCK_P"]))
    gw_part = torch.empty((splits, C_out, K), device=x.device, dtype=torch.float32)
    gb_part = torch.empty((splits, C_out), device=x.device, dtype=torch.float32)
    grid = (splits, cdiv(C_out, cfg["BLOCK_CO"]), cdiv(K, cfg["BLOCK_J"]))
    launch(
        conv3x3_relu_maxpool2x2_bwd_weight_kernel, grid,
        x, grad, idx, gw_part, gb_part,
        n_pix, C_in, H, W, C_out, PH, PW, per_split,
        PAD=padding, PRECISION=dot_precision(), **cfg,
    )
    # Summing over a fixed axis of a fixed-size buffer: deterministic.
    return gw_part.sum(0).view(C_out, C_in, 3, 3).to(x.dtype), gb_part.sum(0).to(x.dtype)


def _backward_input(grad: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, H: int, W: int,
                    padding: int) -> torch.Tensor:
    """grad_input (N, Cin, H, W) from grad_pooled, the codes and the weight."""
    grad, idx, weight = grad.contiguous(), idx.contiguous(), weight.contiguous()
    N, C_out, PH, PW = idx.shape
    C_in = weight.shape[1]
    gx = torch.empty((N, C_in, H, W), device=grad.device, dtype=grad.dtype)
    if gx.numel() == 0:
        return gx
    n_pix = N * H * W
    cfg = conv_input_grad_config(n_pix, C_in, C_out, gx.is_cuda)
    grid = (cdiv(n_pix, cfg["BLOCK_P"]), cdiv(C_in, cfg["BLOCK_CI"]))
    launch(
        conv3x3_relu_maxpool2x2_bwd_input_kernel, grid,
        grad, idx, weight, gx,
        n_pix, C_in, H, W, C_out, PH, PW,
        PAD=padding, PRECISION=dot_precision(), **cfg,
    )
    return gx


def backward(grad_out: torch.Tensor, code: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: int,
             input_grad: bool, weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) from grad_pooled and the codes; those not asked for
    come back empty, and their kernels are not launched."""
    grad_x = _backward_input(grad_out, code, weight, *x.shape[-2:], padding) if input_grad else x.new_empty(0)
    grad_w, grad_b = _backward_params(grad_out, code, x, padding) if weight_grad else (x.new_empty(0), x.new_empty(0))
    return grad_x, grad_w, grad_b
