"""The end of a fused training step: every parameter's gradient from its partial sums,
then the SGD update with momentum, and the step's mean loss and correct count, in one launch.

    sgd_update(params, grads_out, momentum_buffers, partials, lr, momentum, dampening,
               weight_decay, nesterov, maximize, loss_part, count_part, correct_part,
               loss_out, correct_out, grad_scale=None)

For parameter i (any fp32 contiguous tensor) partials[i] is a (P_i, *params[i].shape)
tensor of per-program partial sums of its gradient, as the fused kernels write them
(kernels/lenet_head.py; P_i differs between kernels and may be 0: a zero gradient).
For every element:

    g    = (partials[i][0] + partials[i][1] + ... + partials[i][P_i - 1]) * scale
    grads_out[i] = g                                  (so the caller can keep it as p.grad)
    g'   = (-g if maximize else g) + weight_decay * p
    buf  = momentum * buf + (1 - dampening) * g'
    d    = g' + momentum * buf  if nesterov else  buf
    p    = p - lr * d

which is torch.optim.SGD's step (fused or not) for a step whose momentum buffers
already exist (with momentum == 0: d = g', and no buffers are read or written; the
step that creates the buffers, buf = g', is not done here: take it with
torch.optim).  The partials are summed in index order, one after the other, never
with atomics, so two runs are bitwise the same.

Scaling: the fused kernels write gradients of the SUM of the counted rows' losses
(see kernels/lenet_head.py), so by default scale = 1 / max(count, 1) with count =
sum(count_part), the number of counted rows of the batch: g is then the gradient of
the mean loss, and a batch with no counted row gets zero gradients, as stock.
`grad_scale` (a float, or a 0-d fp32 tensor on the device read at run time) replaces
that scale, e.g. 1.0 for partials of a mean loss.

The loss and accuracy of the step come from the same launch, from one more program:
loss_out (0-d fp32) = sum(loss_part) / count (NaN when count is 0, as stock's mean
over no rows) and correct_out (0-d int64) = sum(correct_part).

`lr` is a float, or a 0-d fp32 tensor on the device that the kernel reads when it
runs, so that a captured CUDA graph follows a learning-rate schedule that refills
the tensor.

How one launch covers separate tensors: the kernel takes the pointers of up to
MAX_PARAMS parameters as separate arguments (a slot per parameter: parameter,
gradient out, momentum buffer, partials, numel, P_i), and a 1-D grid over the
concatenated elements, BLOCK per program: parameter i takes cdiv(numel_i, BLOCK)
programs after those of parameters 0..i-1, and each program finds its slot by
comparing its id with those running counts (scalar arithmetic on arguments, so no
table has to be built or copied to the device, which a CUDA graph capture could
not do).  Slots past len(params) are compiled out (NUM_PARAMS is a constexpr).
More than MAX_PARAMS parameters take one launch per MAX_PARAMS (the first also
reduces the loss).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import NUM_WARPS, cdiv, check_buffer, launch, pow2_clamp

# Slots of the kernel: LeNet has 10 parameters; the rest is room for a slightly larger net.
MAX_PARAMS = 16


@triton.jit
def _count(count_part_ptr, P_rows, BLOCK_R: tl.constexpr):
    """sum(count_part): the counted rows of the batch (int32, exact in any order)."""
    count = 0
    for r0 in range(0, P_rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        count += tl.sum(tl.load(count_part_ptr + r, mask=r < P_rows, other=0), axis=0)
    return count


@triton.jit
def _write_loss(loss_part_ptr, count_part_ptr, correct_part_ptr, P_rows, loss_out_ptr, correct_out_ptr,
                BLOCK_R: tl.constexpr):
    """loss_out = sum(loss_part) / sum(count_part), correct_out = sum(correct_part); the sums
    in a fixed order, BLOCK_R partials at a time."""
    loss = 0.0
    count = 0
    correct = tl.zeros((BLOCK_R,), dtype=tl.int64)
    for r0 in range(0, P_rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        valid = r < P_rows
        loss += tl.sum(tl.load(loss_part_ptr + r, mask=valid, other=0.0), axis=0)
        count += tl.sum(tl.load(count_part_ptr + r, mask=valid, other=0), axis=0)
        correct += tl.load(correct_part_ptr + r, mask=valid, other=0).to(tl.int64)
    tl.store(loss_out_ptr, loss / count.to(tl.float32))  # no row counted: 0 / 0 = NaN, as stock's mean
    tl.store(correct_out_ptr, tl.sum(correct, axis=0))


@triton.jit
def _slot(pid, first, p_ptr, g_ptr, m_ptr, q_ptr, n, P, lr, scale, momentum, one_minus_dampening, weight_decay,
          HAS_MOMENTUM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, NESTEROV: tl.constexpr,
          MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Elements [(pid - first) * BLOCK, + BLOCK) of one parameter, when pid is one of its
    cdiv(n, BLOCK) programs; returns `first` moved past them."""
    programs = tl.cdiv(n, BLOCK)
    if (pid >= first) & (pid < first + programs):
        offs = (pid - first) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        # The partials one after the other in index order, four loads in flight at a time.
        # The row pointer moves by n per partial: 64-bit, so P_i * n_i may pass 2**31.
        g = tl.zeros((BLOCK,), dtype=tl.float32)
        row = q_ptr + offs
        P4 = P - P % 4
        for _ in range(0, P4, 4):
            g0 = tl.load(row, mask=mask, other=0.0)
            g1 = tl.load(row + n, mask=mask, other=0.0)
            row += 2 * n
            g2 = tl.load(row, mask=mask, other=0.0)
            g3 = tl.load(row + n, mask=mask, other=0.0)
            row += 2 * n
            g = (((g + g0) + g1) + g2) + g3
        for _ in range(P4, P):
            g += tl.load(row, mask=mask, other=0.0)
            row += n
        g = g * scale
        tl.store(g_ptr + offs, g, mask=mask)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        if MAXIMIZE:
            g = -g
        if HAS_WEIGHT_DECAY:
            g = g + weight_decay * p
        if HAS_MOMENTUM:
            buf = tl.load(m_ptr + offs, mask=mask, other=0.0)
            buf = buf * momentum + one_minus_dampening * g
            tl.store(m_ptr + offs, buf, mask=mask)
            if NESTEROV:
                g = g + momentum * buf
            else:
                g = buf
        tl.store(p_ptr + offs, p - lr * g, mask=mask)
    return first + programs


@triton.jit
def lenet_sgd_kernel(
    p0, g0, m0, q0, n0, P0, p1, g1, m1, q1, n1, P1, p2, g2, m2, q2, n2, P2, p3, g3, m3, q3, n3, P3,
    p4, g4, m4, q4, n4, P4, p5, g5, m5, q5, n5, P5, p6, g6, m6, q6, n6, P6, p7, g7, m7, q7, n7, P7,
    p8, g8, m8, q8, n8, P8, p9, g9, m9, q9, n9, P9, p10, g10, m10, q10, n10, P10, p11, g11, m11, q11, n11, P11,
    p12, g12, m12, q12, n12, P12, p13, g13, m13, q13, n13, P13, p14, g14, m14, q14, n14, P14, p15, g15, m15, q15, n15, P15,
    loss_part_ptr, count_part_ptr, correct_part_ptr, P_rows, loss_out_ptr, correct_out_ptr,
    lr_ptr, lr_value, scale_ptr, scale_value, momentum, one_minus_dampening, weight_decay,
    NUM_PARAMS: tl.constexpr, LR_IN_TENSOR: tl.constexpr, SCALE_FROM: tl.constexpr, REDUCE_LOSS: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Slot i: parameter p_i, gradient out g_i, momentum buffer m_i, partials q_i (P_i, n_i).
    Programs 0.. : BLOCK elements of one parameter each, slot 0's programs first, then slot 1's,
    ...; with REDUCE_LOSS one program after them writes loss_out and correct_out.
    SCALE_FROM: 0 = 1 / max(count, 1), 1 = scale_value, 2 = the fp32 at scale_ptr."""
    pid = tl.program_id(0)
    if SCALE_FROM == 0:
        scale = 1.0 / tl.maximum(_count(count_part_ptr, P_rows, BLOCK_R), 1).to(tl.float32)
    elif SCALE_FROM == 1:
        scale = scale_value
    else:
        scale = tl.load(scale_ptr)
    if LR_IN_TENSOR:
        lr = tl.load(lr_ptr)
    else:
        lr = lr_value
    first = 0
    if NUM_PARAMS > 0:
        first = _slot(pid, first, p0, g0, m0, q0, n0, P0, lr, scale, momentum, one_minus_dampening,
                      weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, BLOCK)
    if NUM_PARAMS > 1:
        first = _slot(pid, first, p1, g1, m1, q1, n1, P1, lr, scale, momentum, one_minus_dampening,
                      weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, BLOCK)
    if NUM_PARAMS > 2:
        first = _slot(pid, first, p2, g2, m2, q2, n2, P2, lr, scale, momentum, one_minus_dampening,
                      weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, BLOCK)
    if NUM_PARAMS > 3:
        first = _slot(pid, first, p3, g3, m3, q3, n3, P3, lr, scale, momentum, one_minus_dampening,
                      weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, BLOCK)
    if NUM_PARAMS > 4:
        first = _slot(pid, first, p4, g4, m4, q4, n4, P4, lr, scale, momentum, one_minus_dampening,
                      weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, BLOCK)
    if NUM_PARAMS > 5:
        first = _slot(pid, first, p5, g5, m5, q5, n5, P5, lr, scale, momentum, one_minus_dampening,
                      weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, BLOCK)
    if NUM_PARAMS > 6:
        first = _slot(pid, first, p6, g6, m6, q6, n6, P6, lr, scale, momentum, one_minus_dampening,
                      weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, BLOCK)
    if NUM_PARAMS > 7:
        first = _slot(pid, first, p7, g7, m7, q7, n7, P7, lr, scale, momentum, one_minus_dampening,
                      weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, BLOCK)
    if NUM_PARAMS > 8:
        first = _slot(pid, first, p8, g8, m8, q8, n8, P8, lr, scale, momentum, one_minus_dampening,
                      weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, BLOCK)
    if NUM_PARAMS > 9:
        first = _slot(pid, first, p9, g9, m9, q9, n9, P9, lr, scale, momentum, one_minus_dampening,
                      weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, BLOCK)
    if NUM_PARAMS > 10:
        first = _slot(pid, first, p10, g10, m10, q10, n10, P10, lr, scale, momentum, one_minus_dampening,
                      weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, BLOCK)
    if NUM_PARAMS > 11:
        first = _slot(pid, first, p11, g11, m11, q11, n11, P11, lr, scale, momentum, one_minus_dampening,
                      weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, BLOCK)
    if NUM_PARAMS > 12:
        first = _slot(pid, first, p12, g12, m12, q12, n12, P12, lr, scale, momentum, one_minus_dampening,
                      weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, BLOCK)
    if NUM_PARAMS > 13:
        first = _slot(pid, first, p13, g13, m13, q13, n13, P13, lr, scale, momentum, one_minus_dampening,
                      weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, BLOCK)
    if NUM_PARAMS > 14:
        first = _slot(pid, first, p14, g14, m14, q14, n14, P14, lr, scale, momentum, one_minus_dampening,
                      weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, BLOCK)
    if NUM_PARAMS > 15:
        first = _slot(pid, first, p15, g15, m15, q15, n15, P15, lr, scale, momentum, one_minus_dampening,
                      weight_decay, HAS_MOMENTUM, HAS_WEIGHT_DECAY, NESTEROV, MAXIMIZE, BLOCK)
    if REDUCE_LOSS:  # noqa: SIM102 (a compile-time test around a run-time one)
        if pid == first:
            _write_loss(loss_part_ptr, count_part_ptr, correct_part_ptr, P_rows, loss_out_ptr, correct_out_ptr,
                        BLOCK_R)


# --------------------------------------------------------------------------- block sizes


@functools.lru_cache(maxsize=64)  # a pure function of its arguments, asked every step
def sgd_config(numels: tuple[int, ...], on_gpu: bool = True) -> dict:
    """Elements per program (BLOCK) and head partials per step of the loss sums (BLOCK_R).

    GPU: 512 elements on four warps, so LeNet's ~62k elements make ~125 programs (about one
    per SM of a large GPU) and each program's reads of its partials stay short.  The interpreter
    (CPU) pays per program, hardly per element: blocks of up to 16k elements.
    """
    if on_gpu:
        return {"BLOCK": 512, "BLOCK_R": 128, "num_warps": NUM_WARPS}
    return {"BLOCK": pow2_clamp(max(numels, default=1), 512, 1 << 14), "BLOCK_R": 128, "num_warps": NUM_WARPS}


# --------------------------------------------------------------------------- launch wrapper


def _device_scalar(value, name: str, device: torch.device) -> torch.Tensor | None:
    """value itself when it is a tensor the kernel may read (0-d or one element, fp32, on
    `device`); None for a number."""
    if not isinstance(value, torch.Tensor):
        return None
    if value.numel() != 1 or value.dtype != torch.float32 or value.device != device:
        raise ValueError(f"sgd_update: {name} as a tensor must be one fp32 element on {device}, got "
                         f"{value.dtype} of shape {tuple(value.shape)} on {value.device}")
    return value


def sgd_update(params: list[torch.Tensor], grads_out: list[torch.Tensor], momentum_buffers: list[torch.Tensor] | None,
               partials: list[torch.Tensor], lr: float | torch.Tensor, momentum: float, dampening: float,
               weight_decay: float, nesterov: bool, maximize: bool, loss_part: torch.Tensor,
               count_part: torch.Tensor, correct_part: torch.Tensor, loss_out: torch.Tensor,
               correct_out: torch.Tensor, grad_scale: float | torch.Tensor | None = None) -> None:
    """Gradients from partial sums, the SGD update and the step's loss and correct count, in
    place, in one launch (one per MAX_PARAMS parameters).  See the module docstring.

    params, grads_out, momentum_buffers: fp32 contiguous tensors of the same shapes, on one
    device (momentum_buffers may be None when momentum == 0); partials[i]: fp32 contiguous
    (P_i, *params[i].shape).  loss_part (P,) fp32, count_part and correct_part (P,) int32, as
    kernels/lenet_head.py writes them; loss_out: 0-d fp32, correct_out: 0-d int64.
    """
    L = len(params)
    if momentum_buffers is None:
        if momentum != 0:
            raise ValueError("sgd_update: momentum buffers are needed when momentum != 0")
        momentum_buffers = list(params)  # never read or written (HAS_MOMENTUM is off)
    if not (len(grads_out) == len(momentum_buffers) == len(partials) == L):
        raise ValueError(f"sgd_update: {L} params but {len(grads_out)} grads_out, {len(momentum_buffers)} momentum "
                         f"buffers and {len(partials)} partials")
    device = loss_out.device
    for i, (p, g, m, q) in enumerate(zip(params, grads_out, momentum_buffers, partials)):
        for name, t, shape in (("param", p, p.shape), ("grads_out", g, p.shape), ("momentum buffer", m, p.shape),
                               ("partials", q, (q.shape[0] if q.dim() else -1, *p.shape))):
            check_buffer(t, f"sgd_update: {name} {i}", shape, torch.float32, device)
        if p.numel() >= 2**31:
            raise ValueError(f"sgd_update: param {i} has {p.numel()} elements, more than a program index reaches")
    P = loss_part.shape[0] if loss_part.dim() == 1 else -1
    for name, t, dtype, shape in (("loss_part", loss_part, torch.float32, (P,)),
                                  ("count_part", count_part, torch.int32, (P,)),
                                  ("correct_part", correct_part, torch.int32, (P,)),
                                  ("loss_out", loss_out, torch.float32, ()),
                                  ("correct_out", correct_out, torch.int64, ())):
        check_buffer(t, f"sgd_update: {name}", shape, dtype, device)
    lr_tensor = _device_scalar(lr, "lr", device)
    scale_tensor = _device_scalar(grad_scale, "grad_scale", device)
    cfg = sgd_config(tuple(p.numel() for p in params), device.type == "cuda")
    # A tensor argument the kernel does not read (lr or grad_scale given as a number) gets loss_out.
    scalars = {
        "lr_ptr": loss_out if lr_tensor is None else lr_tensor,
        "lr_value": 0.0 if lr_tensor is not None else float(lr),
        "scale_ptr": loss_out if scale_tensor is None else scale_tensor,
        "scale_value": float(grad_scale) if grad_scale is not None and scale_tensor is None else 0.0,
        "momentum": float(momentum),
        # 1 - dampening in double, then fp32, as torch.optim passes alpha=1 - dampening to add_.
        "one_minus_dampening": 1.0 - float(dampening),
        "weight_decay": float(weight_decay),
    }
    flags = {
        "LR_IN_TENSOR": lr_tensor is not None,
        "SCALE_FROM": 0 if grad_scale is None else (2 if scale_tensor is not None else 1),
        "HAS_MOMENTUM": momentum != 0,
        "HAS_WEIGHT_DECAY": weight_decay != 0,
        "NESTEROV": bool(nesterov),
        "MAXIMIZE": bool(maximize),
    }
    for start in range(0, max(L, 1), MAX_PARAMS):
        group = range(start, min(L, start + MAX_PARAMS))
        slots = []
        for i in group:
            slots += [params[i], grads_out[i], momentum_buffers[i], partials[i], params[i].numel(), partials[i].shape[0]]
        filler = slots[:4] if slots else [loss_out] * 4
        slots += [*filler, 0, 0] * (MAX_PARAMS - len(group))
        reduce_loss = start == 0
        programs = sum(cdiv(params[i].numel(), cfg["BLOCK"]) for i in group) + reduce_loss
        if programs == 0:
            continue
        launch(lenet_sgd_kernel, (programs,), *slots,
               loss_part, count_part, correct_part, P, loss_out, correct_out, **scalars,
               NUM_PARAMS=len(group), REDUCE_LOSS=reduce_loss, **flags, **cfg)
