"""relu(conv2d(x, weight, bias, padding)) for a 3x3 kernel, stride 1, and its gradients.

    forward(x, weight, bias, padding) -> out
    backward(grad_out, out, x, weight, padding, input_grad, weight_grad) -> (grad_x, grad_w, grad_b)

The convolution is an implicit GEMM: out[co, p] = W[co, j] @ X[j, p] where
j = ci*9 + kh*3 + kw runs over the Cin*9 taps and X is the im2col matrix, which
is gathered tile by tile from x and never materialised.  The backward pass is
two more GEMMs on tl.dot:

    grad_weight[co, j] = sum_p  gm[co, p] * X[j, p]      (over the whole batch)
    grad_input[ci, q]  = sum_{kh,kw} sum_co W[co, ci, kh, kw] * gm[co, q - (kh, kw) + pad]

where gm is grad_out zeroed where out <= 0 (torch's ReLU backward, from the
saved output).  grad_bias is the row sum of gm, taken in the weight kernel.
The inner sum of grad_input runs over the output pixels that exist (as stock's
dense formula does): a tap whose output pixel lies outside the image adds
nothing, not 0 * W, which a NaN or inf weight would turn into NaN.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    cdiv, conv_forward_config, conv_input_grad_config, conv_weight_grad_config, dot_precision, im2col_3x3,
    launch, reduction_split, relu, relu_grad, split_pixel,
)


@triton.jit
def conv3x3_relu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    n_pix, C_in, H, W, C_out, OH, OW,
    PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (i, c): output channels [c*BLOCK_CO, +BLOCK_CO) at the output
    pixels [i*BLOCK_P, +BLOCK_P) of the flattened (n, oh, ow) axis."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid_p = p < n_pix
    n, r, oh, ow = split_pixel(p, OH, OW)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    valid_co = co < C_out

    K = C_in * 9
    acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
    for j0 in range(0, K, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        w = tl.load(w_ptr + co[:, None] * K + j[None, :], mask=valid_co[:, None] & (j < K)[None, :], other=0.0)
        cols = im2col_3x3(x_ptr, n * (C_in * H * W), oh, ow, valid_p, j, C_in, H, W, PAD)
        acc = tl.dot(w, cols, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=valid_co, other=0.0)[:, None]

    out_offs = (n * C_out * (OH * OW) + r)[None, :] + (co * (OH * OW))[:, None]
    tl.store(out_ptr + out_offs, relu(acc), mask=valid_co[:, None] & valid_p[None, :])


# blocks_per_prog is often 1; specialising on it would only add a compiled variant.
@triton.jit(do_not_specialize=["blocks_per_prog"])
def conv3x3_relu_bwd_weight_kernel(
    x_ptr, grad_ptr, out_ptr, gw_part_ptr, gb_part_ptr,
    n_pix, C_in, H, W, C_out, OH, OW, blocks_per_prog,
    PAD: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (s, c, t): the partial sums of grad_weight[c-block, t-block of j]
    (and of grad_bias, when t == 0) over pixel blocks
    [s*blocks_per_prog, (s+1)*blocks_per_prog), written to row s of the partial buffers."""
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
        n, r, oh, ow = split_pixel(p, OH, OW)
        g_offs = (n * C_out * (OH * OW) + r)[None, :] + (co * (OH * OW))[:, None]
        g_mask = valid_co[:, None] & valid_p[None, :]
        g = tl.load(grad_ptr + g_offs, mask=g_mask, other=0.0)
        y = tl.load(out_ptr + g_offs, mask=g_mask, other=0.0)
        gm = relu_grad(g, y)
        cols = im2col_3x3(x_ptr, n * (C_in * H * W), oh, ow, valid_p, j, C_in, H, W, PAD)
        acc_w = tl.dot(gm, tl.trans(cols), acc_w, input_precision=PRECISION)
        acc_b += tl.sum(gm, axis=1)
        p += BLOCK_P

    part = split.to(tl.int64) * C_out
    tl.store(gw_part_ptr + (part + co)[:, None] * K + j[None, :], acc_w,
             mask=valid_co[:, None] & (j < K)[None, :])
    tl.store(gb_part_ptr + part + co, acc_b, mask=valid_co & (tl.program_id(2) == 0))


@triton.jit
def conv3x3_relu_bwd_input_kernel(
    grad_ptr, out_ptr, w_ptr, gx_ptr,
    n_pix, C_in, H, W, C_out, OH, OW,
    PAD: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (i, c): grad_input for input channels [c*BLOCK_CI, +BLOCK_CI) at
    the input pixels [i*BLOCK_P, +BLOCK_P) of the flattened (n, ih, iw) axis.

    One tl.dot per tap and block of output channels: with the tap fixed, the
    output pixel an input pixel feeds is a per-pixel vector, so the index math
    stays 1-D (an im2col over (co, tap) would need it per element).
    """
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid_p = p < n_pix
    n, r, ih, iw = split_pixel(p, H, W)
    ci = tl.program_id(1) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    valid_ci = ci < C_in
    grad_img = n * C_out * (OH * OW)

    acc = tl.zeros((BLOCK_CI, BLOCK_P), dtype=tl.float32)
    for tap in tl.static_range(9):
        oh = ih - tap // 3 + PAD
        ow = iw - tap % 3 + PAD
        valid = valid_p & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        src = grad_img + oh * OW + ow
        tap_acc = tl.zeros((BLOCK_CI, BLOCK_P), dtype=tl.float32)
        for co0 in range(0, C_out, BLOCK_CO):
            co = co0 + tl.arange(0, BLOCK_CO)
            valid_co = co < C_out
            # weight[co, ci, kh, kw] as a [ci, co] tile.
            wt = tl.load(w_ptr + co[None, :] * (C_in * 9) + ci[:, None] * 9 + tap,
                         mask=valid_ci[:, None] & valid_co[None, :], other=0.0)
            offs = src[None, :] + (co * (OH * OW))[:, None]
            m = valid_co[:, None] & valid[None, :]
            gm = relu_grad(tl.load(grad_ptr + offs, mask=m, other=0.0), tl.load(out_ptr + offs, mask=m, other=0.0))
            tap_acc = tl.dot(wt, gm, tap_acc, input_precision=PRECISION)
        acc += tl.where(valid[None, :], tap_acc, 0.0)  # see the module docstring: no 0 * W off the image

    gx_offs = (n * C_in * (H * W) + r)[None, :] + (ci * (H * W))[:, None]
    tl.store(gx_ptr + gx_offs, acc, mask=valid_ci[:, None] & valid_p[None, :])


# --------------------------------------------------------------------------- launch wrappers


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """relu(conv2d(x, weight, bias, padding=padding)); x (N, Cin, H, W) fp32."""
    x, weight = x.contiguous(), weight.contiguous()
    N, C_in, H, W = x.shape
    C_out = weight.shape[0]
    OH, OW = H + 2 * padding - 2, W + 2 * padding - 2
    out = torch.empty((N, C_out, OH, OW), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    n_pix = N * OH * OW
    cfg = conv_forward_config(n_pix, C_in, C_out, x.is_cuda)
    grid = (cdiv(n_pix, cfg["BLOCK_P"]), cdiv(C_out, cfg["BLOCK_CO"]))
    launch(
        conv3x3_relu_fwd_kernel, grid,
        x, weight, bias.contiguous() if bias is not None else weight, out,
        n_pix, C_in, H, W, C_out, OH, OW,
        PAD=padding, HAS_BIAS=bias is not None, PRECISION=dot_precision(), **cfg,
    )
    return out


def _backward_params(grad: torch.Tensor, out: torch.Tensor, x: torch.Tensor,
                     padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight, grad_bias) from grad_out, the saved output and the input."""
    grad, out, x = grad.contiguous(), out.contiguous(), x.contiguous()
    N, C_in, H, W = x.shape
    C_out, OH, OW = out.shape[1:]
    K = C_in * 9
    n_pix = N * OH * OW
    if n_pix == 0:
        return (x.new_zeros((C_out, C_in, 3, 3)), x.new_zeros((C_out,)))
    cfg = conv_weight_grad_config(n_pix, C_in, C_out, x.is_cuda)
    splits, per_split = reduction_split(cdiv(n_pix, cfg["BLOCK_P"]))
    gw_part = torch.empty((splits, C_out, K), device=x.device, dtype=torch.float32)
    gb_part = torch.empty((splits, C_out), device=x.device, dtype=torch.float32)
    grid = (splits, cdiv(C_out, cfg["BLOCK_CO"]), cdiv(K, cfg["BLOCK_J"]))
    launch(
        conv3x3_relu_bwd_weight_kernel, grid,
        x, grad, out, gw_part, gb_part,
        n_pix, C_in, H, W, C_out, OH, OW, per_split,
        PAD=padding, PRECISION=dot_precision(), **cfg,
    )
    # Summing over a fixed axis of a fixed-size buffer: deterministic.
    return gw_part.sum(0).view(C_out, C_in, 3, 3).to(x.dtype), gb_part.sum(0).to(x.dtype)


def _backward_input(grad: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """grad_input from grad_out, the saved output and the weight."""
    grad, out, weight = grad.contiguous(), out.contiguous(), weight.contiguous()
    N, C_out, OH, OW = out.shape
    C_in = weight.shape[1]
    H, W = OH - 2 * padding + 2, OW - 2 * padding + 2
    gx = torch.empty((N, C_in, H, W), device=out.device, dtype=out.dtype)
    if gx.numel() == 0:
        return gx
    n_pix = N * H * W
    cfg = conv_input_grad_config(n_pix, C_in, C_out, gx.is_cuda)
    grid = (cdiv(n_pix, cfg["BLOCK_P"]), cdiv(C_in, cfg["BLOCK_CI"]))
    launch(
        conv3x3_relu_bwd_input_kernel, grid,
        grad, out, weight, gx,
        n_pix, C_in, H, W, C_out, OH, OW,
        PAD=padding, PRECISION=dot_precision(), **cfg,
    )
    return gx


def backward(grad_out: torch.Tensor, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: int,
             input_grad: bool, weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias); those not asked for come back empty, and their kernels
    are not launched (LeNet's first layer needs no input gradient)."""
    grad_x = _backward_input(grad_out, out, weight, padding) if input_grad else x.new_empty(0)
    grad_w, grad_b = _backward_params(grad_out, out, x, padding) if weight_grad else (x.new_empty(0), x.new_empty(0))
    return grad_x, grad_w, grad_b
