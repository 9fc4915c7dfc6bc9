"""y = x @ weight.T + bias, optionally followed by ReLU, and its gradients.

    forward(x, weight, bias, relu) -> out                    x (M, K)
    backward(grad_out, out, x, weight, relu, input_grad, weight_grad) -> (grad_x, grad_w, grad_b)

Three tiled GEMMs with fp32 accumulation, one per kernel:

    forward       y[M, N]       = x[M, K] @ W[N, K]^T  (+ bias, ReLU)
    grad_input    grad_x[M, K]  = gm[M, N] @ W[N, K]
    grad_weight   grad_W[N, K]  = gm[M, N]^T @ x[M, K],   grad_b[N] = sum_m gm[m, N]

where gm is grad_y with ReLU's mask applied (from the saved output).  The
weight gradient reduces over the batch inside one program per output tile, in
a fixed order, so it is deterministic without a partial-sum buffer: LeNet's
batches (64..1024 rows) are short reductions.
"""

import torch
import triton
import triton.language as tl

from ._common import NUM_WARPS, cdiv, dot_precision, launch, pow2_clamp, relu, relu_grad


@triton.jit
def linear_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (i, t): y[i-th block of rows, t-th block of columns]."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid_m = rm < M
    valid_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        valid_k = rk < K
        a = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=valid_m[:, None] & valid_k[None, :], other=0.0)
        # W^T tile [BLOCK_K, BLOCK_N], read straight from the row-major [N, K] weight.
        bt = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=valid_k[:, None] & valid_n[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=valid_n, other=0.0)[None, :]
    if RELU:
        acc = relu(acc)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=valid_m[:, None] & valid_n[None, :])


@triton.jit
def _masked_grad_tile(grad_ptr, y_ptr, offs, mask, RELU: tl.constexpr):
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    if RELU:
        g = relu_grad(g, tl.load(y_ptr + offs, mask=mask, other=0.0))
    return g


@triton.jit
def linear_bwd_input_kernel(
    grad_ptr, y_ptr, w_ptr, gx_ptr, M, N, K,
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (i, t): grad_x[i-th block of rows, t-th block of the K columns];
    the reduction runs over the N output features."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    valid_m = rm < M
    valid_k = rk < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        valid_n = rn < N
        gm = _masked_grad_tile(grad_ptr, y_ptr, rm[:, None] * N + rn[None, :],
                               valid_m[:, None] & valid_n[None, :], RELU)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=valid_n[:, None] & valid_k[None, :], other=0.0)
        acc = tl.dot(gm, w, acc, input_precision=PRECISION)
    tl.store(gx_ptr + rm[:, None] * K + rk[None, :], acc, mask=valid_m[:, None] & valid_k[None, :])


@triton.jit
def linear_bwd_weight_kernel(
    grad_ptr, y_ptr, x_ptr, gw_ptr, gb_ptr, M, N, K,
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (t, s): grad_W[t-th block of rows N, s-th block of columns K],
    reduced over all M rows of the batch in order; the programs with s == 0
    also produce grad_b for their block of N."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    valid_n = rn < N
    valid_k = rk < K
    acc_w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    rm = tl.arange(0, BLOCK_M).to(tl.int64)
    for _ in range(0, M, BLOCK_M):
        valid_m = rm < M
        # gm^T tile [BLOCK_N, BLOCK_M], read from the row-major [M, N] gradient.
        gmt = _masked_grad_tile(grad_ptr, y_ptr, rm[None, :] * N + rn[:, None],
                                valid_n[:, None] & valid_m[None, :], RELU)
        a = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=valid_m[:, None] & valid_k[None, :], other=0.0)
        acc_w = tl.dot(gmt, a, acc_w, input_precision=PRECISION)
        acc_b += tl.sum(gmt, axis=1)
        rm += BLOCK_M
    tl.store(gw_ptr + rn[:, None] * K + rk[None, :], acc_w, mask=valid_n[:, None] & valid_k[None, :])
    tl.store(gb_ptr + rn, acc_b, mask=valid_n & (tl.program_id(1) == 0))


# --------------------------------------------------------------------------- block sizes


def linear_config(M: int, N: int, K: int, on_gpu: bool = True) -> dict:
    """32x32 output tiles with 32-deep K steps on the GPU.

    LeNet's layers (N = 120, 84, 10; K = 400, 120, 84) at batch 64..1024 are a
    few MFLOP: 32x32 tiles give up to ~130 programs at batch 1024, and the
    kernels are launch-bound long before tile shape matters.  The interpreter
    (CPU) gets whole-batch tiles: it pays per program, not per element.
    """
    if on_gpu:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": NUM_WARPS}
    return {"BLOCK_M": pow2_clamp(M, 16, 1024), "BLOCK_N": pow2_clamp(N, 16, 128), "BLOCK_K": pow2_clamp(K, 16, 128),
            "num_warps": NUM_WARPS}


# --------------------------------------------------------------------------- launch wrappers


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T + bias, then ReLU when `relu`."""
    x, weight = x.contiguous(), weight.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    cfg = linear_config(M, N, K, x.is_cuda)
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(N, cfg["BLOCK_N"]))
    launch(
        linear_fwd_kernel, grid,
        x, weight, bias.contiguous() if bias is not None else weight, y, M, N, K,
        HAS_BIAS=bias is not None, RELU=relu, PRECISION=dot_precision(), **cfg,
    )
    return y


def _backward_input(grad: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, relu: bool) -> torch.Tensor:
    """grad_x (M, K) from grad_y, the saved output (for ReLU's mask) and the weight."""
    grad, y, weight = grad.contiguous(), y.contiguous(), weight.contiguous()
    M, N = y.shape
    K = weight.shape[1]
    gx = torch.empty((M, K), device=y.device, dtype=y.dtype)
    if gx.numel() == 0:
        return gx
    cfg = linear_config(M, N, K, y.is_cuda)
    grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(K, cfg["BLOCK_K"]))
    launch(
        linear_bwd_input_kernel, grid,
        grad, y, weight, gx, M, N, K,
        RELU=relu, PRECISION=dot_precision(), **cfg,
    )
    return gx


def _backward_params(grad: torch.Tensor, y: torch.Tensor, x: torch.Tensor,
                     relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight (N, K), grad_bias (N,)) from grad_y, the saved output and the input."""
    grad, y, x = grad.contiguous(), y.contiguous(), x.contiguous()
    M, N = y.shape
    K = x.shape[1]
    gw = torch.empty((N, K), device=x.device, dtype=x.dtype)
    gb = torch.empty((N,), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return gw.zero_(), gb.zero_()
    cfg = linear_config(M, N, K, x.is_cuda)
    # At least one program along K, so grad_b is computed even when K == 0.
    grid = (cdiv(N, cfg["BLOCK_N"]), max(1, cdiv(K, cfg["BLOCK_K"])))
    launch(
        linear_bwd_weight_kernel, grid,
        grad, y, x, gw, gb, M, N, K,
        RELU=relu, PRECISION=dot_precision(), **cfg,
    )
    return gw, gb


def backward(grad_out: torch.Tensor, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, relu: bool,
             input_grad: bool, weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias); those not asked for come back empty, and their kernels
    are not launched."""
    grad_x = _backward_input(grad_out, out, weight, relu) if input_grad else x.new_empty(0)
    grad_w, grad_b = _backward_params(grad_out, out, x, relu) if weight_grad else (x.new_empty(0), x.new_empty(0))
    return grad_x, grad_w, grad_b
