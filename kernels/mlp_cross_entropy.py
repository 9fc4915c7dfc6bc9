"""The classifier head and its loss: an MLP, then mean cross-entropy against class indices.

    forward(x, weights, biases, target) -> (loss, logits, dlogits, hidden)
    backward(grad_loss, grad_logits, dlogits, logits, x, weights, hidden, input_grad, weight_grad)
        -> (grad_x, grad_weights, grad_biases)

The layers are kernels/linear.py's (ReLU after every layer but the last); hidden[i]
is layer i's output, saved for the backward (its input and ReLU's mask), and x is
(N, *) flattened from dim 1.  The loss, and with it dlogits = d loss / d logits,
comes from one kernel here:

    loss = mean_n (logsumexp(z[n]) - z[n, t[n]])        dz = (softmax(z) - onehot(t)) / N

over the rows whose target is not IGNORE_INDEX (-100, stock cross_entropy's
ignore_index): such a row adds nothing to the loss or the gradient, and N counts
the other rows (none: NaN loss, zero gradient, as in stock).

One program per block of rows: each row's max, exp, sum and log stay in
registers, and the row losses and dz are written in the same pass, so the
backward starts from dz times the loss's gradient (no second read of the logits,
no separate log_softmax / nll_loss and their two backward kernels).  The mean is
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

from . import linear
from ._common import IGNORE_INDEX, NUM_WARPS, cdiv, check_targets, launch, pow2_clamp



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
    check_targets(target, C)
    row_loss = torch.empty((N,), device=logits.device, dtype=logits.dtype)
    dz = torch.empty_like(logits)
    counted = (target != IGNORE_INDEX).sum().to(logits.dtype)
    if N > 0:
        cfg = softmax_cross_entropy_config(N, C, logits.is_cuda)
        launch(softmax_cross_entropy_kernel, (cdiv(N, cfg["BLOCK_R"]),),
               logits, target, row_loss, dz, counted, N, C, IGNORE=IGNORE_INDEX, **cfg)
    return row_loss.sum() / counted, dz  # nothing counted: 0 / 0 = NaN, as stock's mean over nothing


# --------------------------------------------------------------------------- the op's two entry points


def forward(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
            target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(mean loss, logits, d loss / d logits, the hidden layers' ReLU outputs)."""
    h = torch.flatten(x, 1)  # (N, *) -> (N, features); x itself when already 2-D
    hidden = []
    for weight, bias in zip(weights[:-1], biases[:-1]):
        h = linear.forward(h, weight, bias, True)
        hidden.append(h)
    logits = linear.forward(h, weights[-1], biases[-1], False)
    loss, dlogits = softmax_cross_entropy(logits, target)
    return loss, logits, dlogits, hidden


def backward(grad_loss: torch.Tensor | None, grad_logits: torch.Tensor | None, dlogits: torch.Tensor,
             logits: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor], hidden: list[torch.Tensor],
             input_grad: bool, weight_grad: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(grad_x of x's shape, [grad_weight per layer], [grad_bias per layer]); those not asked
    for come back empty.  A gradient of None (loss or logits) counts as zero."""
    grad = None if grad_loss is None else dlogits * grad_loss
    if grad_logits is not None:
        grad = grad_logits if grad is None else grad + grad_logits
    if grad is None:
        grad = torch.zeros_like(logits)
    layers = len(weights)
    inputs, outputs = [torch.flatten(x, 1), *hidden], [*hidden, logits]
    grad_w, grad_b = [None] * layers, [None] * layers
    for i in reversed(range(layers)):
        # Layer 0's input gradient only when x's is wanted: the others feed the layer below.
        grad, grad_w[i], grad_b[i] = linear.backward(grad, outputs[i], inputs[i], weights[i], i < layers - 1,
                                                     i > 0 or input_grad, weight_grad)
    return (grad.view(x.shape) if input_grad else x.new_empty(0)), grad_w, grad_b
