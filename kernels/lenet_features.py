"""LeNet's two convolution stages, forward and backward, in one Triton launch each.

    features_forward(x, w1, b1, w2, b2, pooled1=None, code1=None, features=None, code2=None)
        -> (features, pooled1, code1, code2)
    features_backward(dfeatures, x, pooled1, code1, code2, w2,
                      gw1_part=None, gb1_part=None, gw2_part=None, gb2_part=None)
        -> (gw1_part, gb1_part, gw2_part, gb2_part)

The stages are those of lenet_fast.model.STAGES, with their shapes fixed here:

    x (N, 1, 28, 28) -conv1 3x3, bias, ReLU-> (N, 6, 26, 26) -maxpool 2x2-> pooled1 (N, 6, 13, 13)
    pooled1 -conv2 3x3, bias, ReLU-> (N, 16, 11, 11) -maxpool 2x2-> features (N, 16, 5, 5)

Each pooled output has a uint8 code, as in conv3x3_relu_maxpool2x2.py: the
winner's position 0..3 (row-major in the 2x2 window; the first of equal maxima,
or the last NaN), or RELU_BLOCKED (4) where the pooled value is <= 0, i.e.
where ReLU blocks the gradient (a NaN output lets it through).  The
full-resolution convolution outputs never reach memory.

Forward: a program owns BLOCK_N whole images.  It computes conv1 + bias + ReLU
+ pool for them and writes pooled1 and code1 (the backward needs both), waits
at a barrier so that every thread of the program sees those writes, then reads
its own images' pooled1 back for conv2 + bias + ReLU + pool.  Plain FMA loops
over the 9 taps (and conv2's 6 input channels); no tl.dot.

Backward: a program owns the same BLOCK_N images and writes one row of each
partial-sum buffer (P = features_programs(N, on_gpu) rows: N on a GPU); the
caller sums them over axis 0 in a fixed order (no float atomics anywhere, and
every program sums in a fixed order, so the result is the same bits on every
run):

    gconv2[co, oh, ow] = dfeatures[co, oh//2, ow//2] at the window's winner, 0 elsewhere
                         (and 0 in conv2's row and column 10, which floor-mode pooling drops)
    gw2[co, ci, tap]   = sum over the 11x11 conv2 outputs of gconv2 * pooled1[ci, at + tap]
    dpooled1[ci, q]    = sum over the taps whose conv2 output exists and over co of
                         w2[co, ci, tap] * gconv2[co, q - tap]
    gconv1             = dpooled1 at the window's winner of code1, 0 elsewhere
    gw1[c, tap]        = sum over the 26x26 conv1 outputs of gconv1 * x[at + tap]

Each sum runs over exactly the products of stock's dense formulas (conv2d's
backward multiplies every existing output's gradient, zero or not, by every
tap), so a NaN or inf in x, pooled1 or w2 reaches the gradients where it does
in stock: 0 * NaN is NaN there too.  Gradients are selected by the codes, never
multiplied by a mask, so a NaN upstream gradient where ReLU blocks it or at a
window's loser adds nothing.  dpooled1 and gconv1 stay in registers, with no
scratch memory and no barrier: each block of pooled1 pixels is routed and
reduced as soon as it is computed.

Batch 0 launches nothing: the forward returns empty outputs and the backward
returns partial buffers of P = 0 rows (their sum over axis 0 is zero).
"""

import functools

import torch
import triton
import triton.language as tl

from ._common import RELU_BLOCKED, cdiv, check_buffer, launch, pool_update, pow2_clamp, relu

# LeNet's shapes (lenet_fast.model.STAGES): the kernels are written for these only.
_H0 = tl.constexpr(28)   # input side
_C1 = tl.constexpr(6)    # conv1 output channels
_C1_PAD = tl.constexpr(8)
_P1 = tl.constexpr(13)   # pooled1 side (conv1 output: 26)
_O2 = tl.constexpr(11)   # conv2 output side
_C2 = tl.constexpr(16)   # conv2 output channels
_P2 = tl.constexpr(5)    # features side

IMAGE_SHAPE = (1, 28, 28)
POOLED1_SHAPE = (6, 13, 13)
FEATURES_SHAPE = (16, 5, 5)
W1_SHAPE, W2_SHAPE = (6, 1, 3, 3), (16, 6, 3, 3)


# --------------------------------------------------------------------------- forward


@triton.jit
def _conv1_at(x_ptr, w1_ptr, c, valid_c, x_base, valid, k: tl.constexpr, BLOCK_P: tl.constexpr):
    """conv1 (no bias) at window position k of the pooled pixels whose window's
    top-left input is x_base: [_C1_PAD, BLOCK_P]."""
    acc = tl.zeros((_C1_PAD, BLOCK_P), dtype=tl.float32)
    for t in tl.static_range(9):
        xv = tl.load(x_ptr + x_base + ((k // 2 + t // 3) * _H0 + k % 2 + t % 3), mask=valid, other=0.0)
        wv = tl.load(w1_ptr + c * 9 + t, mask=valid_c, other=0.0)
        acc += wv[:, None] * xv[None, :]
    return acc


@triton.jit
def _conv2_at(p1_ptr, w2_ptr, co, in_base, valid, k: tl.constexpr, BLOCK_P: tl.constexpr):
    """conv2 (no bias) at window position k of the pooled pixels whose window's
    top-left pooled1 input is in_base (channel 0): [_C2, BLOCK_P]."""
    acc = tl.zeros((_C2, BLOCK_P), dtype=tl.float32)
    for ci in range(_C1):
        for t in tl.static_range(9):
            xv = tl.load(p1_ptr + in_base + (ci * (_P1 * _P1) + (k // 2 + t // 3) * _P1 + k % 2 + t % 3),
                         mask=valid, other=0.0)
            wv = tl.load(w2_ptr + co * (_C1 * 9) + (ci * 9 + t))
            acc += wv[:, None] * xv[None, :]
    return acc


@triton.jit
def lenet_features_fwd_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    pooled1_ptr, code1_ptr, feat_ptr, code2_ptr,
    N,
    BLOCK_N: tl.constexpr, BLOCK_P1: tl.constexpr, BLOCK_P2: tl.constexpr,
):
    """Program i: images [i*BLOCK_N, (i+1)*BLOCK_N) (those < N).  Pixel axes
    flatten (image of the block, pooled row, pooled column)."""
    first = tl.program_id(0).to(tl.int64) * BLOCK_N

    # Stage 1: conv1 + bias + ReLU + pool -> pooled1, code1.
    c = tl.arange(0, _C1_PAD)
    valid_c = c < _C1
    b1 = tl.load(b1_ptr + c, mask=valid_c, other=0.0)[:, None]
    for p0 in range(0, BLOCK_N * (_P1 * _P1), BLOCK_P1):
        p = p0 + tl.arange(0, BLOCK_P1)
        i = p // (_P1 * _P1)
        r = p - i * (_P1 * _P1)
        ph = r // _P1
        pw = r - ph * _P1
        n = first + i
        valid = (p < BLOCK_N * (_P1 * _P1)) & (n < N)
        x_base = n * (_H0 * _H0) + (2 * ph) * _H0 + 2 * pw
        # ReLU before the max, as in the unfused model, so ties among clamped zeros
        # pick the same winner; position 0 seeds the scan, 1..3 fold in (ATen's rule).
        best = relu(_conv1_at(x_ptr, w1_ptr, c, valid_c, x_base, valid, 0, BLOCK_P1) + b1)
        pos = tl.zeros((_C1_PAD, BLOCK_P1), dtype=tl.int32)
        for k in tl.static_range(1, 4):
            v = relu(_conv1_at(x_ptr, w1_ptr, c, valid_c, x_base, valid, k, BLOCK_P1) + b1)
            best, pos = pool_update(best, pos, v, k)
        offs = (n * (_C1 * _P1 * _P1) + r)[None, :] + (c * (_P1 * _P1))[:, None]
        mask = valid_c[:, None] & valid[None, :]
        tl.store(pooled1_ptr + offs, best, mask=mask)
        tl.store(code1_ptr + offs, tl.where(best <= 0, RELU_BLOCKED, pos).to(tl.uint8), mask=mask)

    # Stage 2 reads pooled1 that other threads of this program wrote: the barrier
    # makes those global writes visible to the whole program.  Only this
    # program's images are read, so no other program is waited for.
    tl.debug_barrier()

    # Stage 2: conv2 + bias + ReLU + pool -> features, code2.
    co = tl.arange(0, _C2)
    b2 = tl.load(b2_ptr + co)[:, None]
    for p0 in range(0, BLOCK_N * (_P2 * _P2), BLOCK_P2):
        p = p0 + tl.arange(0, BLOCK_P2)
        i = p // (_P2 * _P2)
        r = p - i * (_P2 * _P2)
        ph = r // _P2
        pw = r - ph * _P2
        n = first + i
        valid = (p < BLOCK_N * (_P2 * _P2)) & (n < N)
        in_base = n * (_C1 * _P1 * _P1) + (2 * ph) * _P1 + 2 * pw
        best = relu(_conv2_at(pooled1_ptr, w2_ptr, co, in_base, valid, 0, BLOCK_P2) + b2)
        pos = tl.zeros((_C2, BLOCK_P2), dtype=tl.int32)
        for k in tl.static_range(1, 4):
            v = relu(_conv2_at(pooled1_ptr, w2_ptr, co, in_base, valid, k, BLOCK_P2) + b2)
            best, pos = pool_update(best, pos, v, k)
        offs = (n * (_C2 * _P2 * _P2) + r)[None, :] + (co * (_P2 * _P2))[:, None]
        mask = (co < _C2)[:, None] & valid[None, :]
        tl.store(feat_ptr + offs, best, mask=mask)
        tl.store(code2_ptr + offs, tl.where(best <= 0, RELU_BLOCKED, pos).to(tl.uint8), mask=mask)


# --------------------------------------------------------------------------- backward


@triton.jit
def _conv2_out_grad(dfeat_ptr, code2_ptr, co, n, oh, ow, valid):
    """gconv2 at channels `co` and conv2 output pixels (n, oh, ow), all broadcast
    against each other: the upstream gradient at each window's winner; 0 elsewhere,
    where ReLU blocks it (code 4 matches no position), outside the windows (row or
    column 10) and where `valid` is false.  Selected, never multiplied, so a NaN
    upstream gradient at any of those places adds nothing."""
    windowed = valid & (oh >= 0) & (oh < 2 * _P2) & (ow >= 0) & (ow < 2 * _P2)
    oh = tl.where(windowed, oh, 0)  # keeps // on non-negative values
    ow = tl.where(windowed, ow, 0)
    ph = oh // 2
    pw = ow // 2
    place = (oh - 2 * ph) * 2 + (ow - 2 * pw)
    offs = n * (_C2 * _P2 * _P2) + ph * _P2 + pw + co * (_P2 * _P2)
    m = windowed & (co < _C2)
    winner = tl.load(code2_ptr + offs, mask=m, other=RELU_BLOCKED).to(tl.int32) == place
    return tl.load(dfeat_ptr + offs, mask=m & winner, other=0.0)


@triton.jit
def lenet_features_bwd_kernel(
    dfeat_ptr, x_ptr, pooled1_ptr, code1_ptr, code2_ptr, w2_ptr,
    gw1_ptr, gb1_ptr, gw2_ptr, gb2_ptr,
    N,
    BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Program i: the gradient contributions of images [i*BLOCK_N, (i+1)*BLOCK_N)
    (those < N), written to row i of the four partial buffers.

    Each sum over pixels is kept elementwise in a 3-D accumulator
    [rows, columns, pixel block] and reduced over the pixel block once, at the
    end: a GEMM of this shape as tl.dot holds a whole K slice of both operands
    per thread, which costs far more registers.
    """
    pid = tl.program_id(0)
    row = pid.to(tl.int64)
    first = row * BLOCK_N

    # conv2's weight and bias gradients: gconv2 [co, 1, Q] times pooled1's im2col
    # tile [1, j, Q] (j = ci*9 + tap) over conv2's 11x11 output pixels (the axis Q
    # flattens image, row and column).
    co = tl.arange(0, _C2)[:, None, None]
    j = tl.arange(0, 64)[None, :, None]
    valid_j = j < _C1 * 9
    j_offs = (j // 9) * (_P1 * _P1) + ((j % 9) // 3) * _P1 + j % 3
    acc_w2 = tl.zeros((_C2, 64, BLOCK_Q), dtype=tl.float32)
    acc_b2 = tl.zeros((_C2, 1, BLOCK_Q), dtype=tl.float32)
    for q0 in range(0, BLOCK_N * (_O2 * _O2), BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)[None, None, :]
        i = q // (_O2 * _O2)
        r = q - i * (_O2 * _O2)
        oh = r // _O2
        ow = r - oh * _O2
        n = first + i
        valid = (q < BLOCK_N * (_O2 * _O2)) & (n < N)
        g = _conv2_out_grad(dfeat_ptr, code2_ptr, co, n, oh, ow, valid)
        # Every existing output pixel's column takes part, also where g is 0 (stock's
        # dense product: a NaN in pooled1 reaches gw2 through 0 * NaN as there).
        cols = tl.load(pooled1_ptr + n * (_C1 * _P1 * _P1) + oh * _P1 + ow + j_offs,
                       mask=valid_j & valid, other=0.0)
        acc_w2 += g * cols
        acc_b2 += g
    tl.store(gw2_ptr + row * (_C2 * _C1 * 9) + co * (_C1 * 9) + j, tl.sum(acc_w2, axis=2)[:, :, None],
             mask=valid_j & (co < _C2))
    tl.store(gb2_ptr + row * _C2 + co, tl.sum(acc_b2, axis=2)[:, :, None])

    # conv2's input gradient (d pooled1), routed through code1 to conv1's output
    # gradient, then conv1's weight and bias gradients, one block of pooled1 pixels
    # (axis P: image, row, column) at a time, in [channel, m, P] tiles: m is conv2's
    # output channel for d pooled1, conv1's tap for its weight gradient.
    c = tl.arange(0, _C1_PAD)[:, None, None]
    valid_c = c < _C1
    m = tl.arange(0, 16)[None, :, None]
    valid_t = m < 9
    t_offs = (m // 3) * _H0 + m % 3
    acc_w1 = tl.zeros((_C1_PAD, 16, BLOCK_P), dtype=tl.float32)
    acc_b1 = tl.zeros((_C1_PAD, 1, BLOCK_P), dtype=tl.float32)
    for p0 in range(0, BLOCK_N * (_P1 * _P1), BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)[None, None, :]
        i = p // (_P1 * _P1)
        r = p - i * (_P1 * _P1)
        y = r // _P1
        x = r - y * _P1
        n = first + i
        valid = (p < BLOCK_N * (_P1 * _P1)) & (n < N)
        dp = tl.zeros((_C1_PAD, _C2, BLOCK_P), dtype=tl.float32)
        for tap in range(9):
            oh = y - tap // 3
            ow = x - tap % 3
            # Every conv2 output that exists takes part in stock's dense sum (also the
            # row and column pooling drops); taps off conv2's output add nothing, not
            # 0 * w2, which a NaN or inf weight would turn into NaN.
            exists = valid & (oh >= 0) & (oh < _O2) & (ow >= 0) & (ow < _O2)
            g = _conv2_out_grad(dfeat_ptr, code2_ptr, m, n, oh, ow, exists)
            w = tl.load(w2_ptr + m * (_C1 * 9) + c * 9 + tap, mask=valid_c, other=0.0)
            dp += tl.where(exists, w * g, 0.0)
        dp = tl.sum(dp, axis=1)[:, None, :]

        winner = tl.load(code1_ptr + n * (_C1 * _P1 * _P1) + c * (_P1 * _P1) + r,
                         mask=valid_c & valid, other=RELU_BLOCKED).to(tl.int32)
        # Each conv1 output is in exactly one window: the bias gradient is the sum of
        # the routed gradient, which code 4 (and the padding) leaves out.
        acc_b1 += tl.where(winner != RELU_BLOCKED, dp, 0.0)
        x_base = n * (_H0 * _H0) + (2 * y) * _H0 + 2 * x
        # The four window positions cover all 26x26 conv1 outputs once; every one takes
        # part (stock's dense product), with gradient 0 except at the winner.
        for k in tl.static_range(4):
            cols = tl.load(x_ptr + x_base + t_offs + ((k // 2) * _H0 + k % 2), mask=valid_t & valid, other=0.0)
            acc_w1 += tl.where(winner == k, dp, 0.0) * cols
    tl.store(gw1_ptr + row * (_C1 * 9) + c * 9 + m, tl.sum(acc_w1, axis=2)[:, :, None], mask=valid_c & valid_t)
    tl.store(gb1_ptr + row * _C1 + c, tl.sum(acc_b1, axis=2)[:, :, None], mask=valid_c)


# --------------------------------------------------------------------------- configuration


@functools.lru_cache(maxsize=64)  # a pure function of its arguments, asked every step
def features_config(N: int, on_gpu: bool = True) -> dict:
    """Launch parameters of both kernels at batch N: {"forward": {...}, "backward": {...}}.

    BLOCK_N (images per program) is the same for both, so a backward program
    owns the images its forward program did.  GPU: one image per program, so
    batch 64 runs 64 programs and 256 or 1024 as many as images.  CPU (the Triton
    interpreter, which pays per program and per operation, hardly per element):
    about four programs of up to 16 images, with large pixel blocks, so small
    batches still run several programs and a last, partial one.

    Forward, BLOCK_P1 / BLOCK_P2: pooled1 / features pixels per block (one block
    holds a whole image's 13x13 or 5x5 on a GPU).  Backward, BLOCK_Q / BLOCK_P:
    conv2 output / pooled1 pixels per block; they are the last axis of the 3-D
    accumulators ([16, 64, BLOCK_Q], [8, 16, BLOCK_P]), hence small on a GPU:
    larger ones spill (compile for sm_80/sm_90 with lenet_fast.compile_check's
    functions to see registers and spills).  Eight warps halve each thread's
    share of those accumulators.  num_stages 1: the backward's loops are
    gathers with no tl.dot to pipeline, and more stages only cost registers.
    """
    if on_gpu:
        block_n = 1
        fwd = {"BLOCK_P1": 256, "BLOCK_P2": 32, "num_warps": 8}
        bwd = {"BLOCK_Q": 8, "BLOCK_P": 32, "num_warps": 8, "num_stages": 1}
    else:
        block_n = pow2_clamp(cdiv(max(int(N), 1), 4), 1, 16)
        # The interpreter's tensors are capped at 2**20 elements; the 3-D
        # accumulators stay at 2**17, where numpy is still quick.
        fwd = {"BLOCK_P1": triton.next_power_of_2(block_n * 169), "BLOCK_P2": triton.next_power_of_2(block_n * 25),
               "num_warps": 4}
        bwd = {"BLOCK_Q": pow2_clamp(block_n * 121, 1, 128), "BLOCK_P": pow2_clamp(block_n * 169, 1, 1024),
               "num_warps": 4}
    return {"forward": {"BLOCK_N": block_n, **fwd}, "backward": {"BLOCK_N": block_n, **bwd}}


def features_programs(N: int, on_gpu: bool = True) -> int:
    """P, the number of programs of both kernels at batch N, and so the rows of the
    backward's partial buffers: cdiv(N, BLOCK_N); 0 for N == 0.  On a GPU, N."""
    return cdiv(int(N), features_config(N, on_gpu)["forward"]["BLOCK_N"])


# --------------------------------------------------------------------------- launch wrappers


def _input(t: torch.Tensor, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, not {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, not {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, not {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    return t.contiguous()


def _output(t: torch.Tensor | None, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A given output buffer is used as it is (a copy would not be the caller's
    buffer), so it must already be right; None allocates one."""
    if t is None:
        return torch.empty(shape, device=device, dtype=dtype)
    check_buffer(t, name, shape, dtype, device)
    return t


def _batch(x: torch.Tensor) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, not {type(x).__name__}")
    if x.dim() != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"x must have shape (N, {', '.join(map(str, IMAGE_SHAPE))}), not {tuple(x.shape)}")
    return x.shape[0]


def features_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                     pooled1: torch.Tensor | None = None, code1: torch.Tensor | None = None,
                     features: torch.Tensor | None = None, code2: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LeNet's conv stages on x (N, 1, 28, 28) fp32, in one launch.

    Returns (features (N, 16, 5, 5) fp32, pooled1 (N, 6, 13, 13) fp32,
    code1 (N, 6, 13, 13) uint8, code2 (N, 16, 5, 5) uint8).  Output buffers
    given are written in place and returned (contiguous, of exactly those
    shapes and dtypes, on x's device).  N == 0: nothing is launched.
    """
    N = _batch(x)
    dev, f32 = x.device, torch.float32
    x = _input(x, "x", (N, *IMAGE_SHAPE), f32, dev)
    w1 = _input(w1, "w1", W1_SHAPE, f32, dev)
    b1 = _input(b1, "b1", W1_SHAPE[:1], f32, dev)
    w2 = _input(w2, "w2", W2_SHAPE, f32, dev)
    b2 = _input(b2, "b2", W2_SHAPE[:1], f32, dev)
    pooled1 = _output(pooled1, "pooled1", (N, *POOLED1_SHAPE), f32, dev)
    code1 = _output(code1, "code1", (N, *POOLED1_SHAPE), torch.uint8, dev)
    features = _output(features, "features", (N, *FEATURES_SHAPE), f32, dev)
    code2 = _output(code2, "code2", (N, *FEATURES_SHAPE), torch.uint8, dev)
    if N == 0:
        return features, pooled1, code1, code2
    cfg = features_config(N, x.is_cuda)["forward"]
    launch(lenet_features_fwd_kernel, (cdiv(N, cfg["BLOCK_N"]),),
           x, w1, b1, w2, b2, pooled1, code1, features, code2, N, **cfg)
    return features, pooled1, code1, code2


def features_backward(dfeatures: torch.Tensor, x: torch.Tensor, pooled1: torch.Tensor, code1: torch.Tensor,
                      code2: torch.Tensor, w2: torch.Tensor,
                      gw1_part: torch.Tensor | None = None, gb1_part: torch.Tensor | None = None,
                      gw2_part: torch.Tensor | None = None, gb2_part: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial weight and bias gradients of LeNet's conv stages, in one launch.

    dfeatures: (N, 16, 5, 5) or (N, 400) fp32, the gradient of the features;
    x, pooled1, code1, code2: the images and what features_forward returned for
    them; w2: conv2's weight.  Returns fp32 partial sums, one row per program,
    P = features_programs(N, x.is_cuda): gw1_part (P, 6, 1, 3, 3), gb1_part
    (P, 6), gw2_part (P, 16, 6, 3, 3), gb2_part (P, 16).  Summed over axis 0
    they are the gradients of w1, b1, w2, b2.  Buffers given are overwritten
    whole.  N == 0: P == 0, nothing is launched.
    """
    N = _batch(x)
    dev, f32 = x.device, torch.float32
    x = _input(x, "x", (N, *IMAGE_SHAPE), f32, dev)
    if isinstance(dfeatures, torch.Tensor) and dfeatures.dim() == 2:
        dfeatures = _input(dfeatures, "dfeatures", (N, 400), f32, dev)
    else:
        dfeatures = _input(dfeatures, "dfeatures", (N, *FEATURES_SHAPE), f32, dev)
    pooled1 = _input(pooled1, "pooled1", (N, *POOLED1_SHAPE), f32, dev)
    code1 = _input(code1, "code1", (N, *POOLED1_SHAPE), torch.uint8, dev)
    code2 = _input(code2, "code2", (N, *FEATURES_SHAPE), torch.uint8, dev)
    w2 = _input(w2, "w2", W2_SHAPE, f32, dev)
    P = features_programs(N, x.is_cuda)
    gw1_part = _output(gw1_part, "gw1_part", (P, *W1_SHAPE), f32, dev)
    gb1_part = _output(gb1_part, "gb1_part", (P, W1_SHAPE[0]), f32, dev)
    gw2_part = _output(gw2_part, "gw2_part", (P, *W2_SHAPE), f32, dev)
    gb2_part = _output(gb2_part, "gb2_part", (P, W2_SHAPE[0]), f32, dev)
    if P == 0:
        return gw1_part, gb1_part, gw2_part, gb2_part
    cfg = features_config(N, x.is_cuda)["backward"]
    launch(lenet_features_bwd_kernel, (P,),
           dfeatures, x, pooled1, code1, code2, w2, gw1_part, gb1_part, gw2_part, gb2_part, N, **cfg)
    return gw1_part, gb1_part, gw2_part, gb2_part
