"""A whole LeNet SGD training step in four Triton launches.

    sgd_train_step(x, target, params, momentum_buffers, lr, momentum, dampening, weight_decay,
                   nesterov, maximize) -> (loss, correct)

At LeNet's size a GPU training step is a string of tiny kernels, and inside a CUDA
graph each one still costs a launch and a pass over memory; so the step is four:

1. lenet_features.features_forward: conv1 + ReLU + pool, then conv2 + ReLU + pool,
   per image; writes the 400 features and what backward needs (pooled conv1 output,
   both uint8 winner codes); the conv outputs never reach memory.
2. lenet_head.head_step: fc1 + ReLU, fc2 + ReLU, fc3, softmax cross-entropy, the
   backward through the three layers to d features, per-program partial sums of the
   head's gradients, the loss and the correct count.
3. lenet_features.features_backward: conv2's and conv1's weight and bias partial sums.
4. lenet_sgd.sgd_update: every partial sum reduced in a fixed order and scaled to the
   mean loss, left in the gradient buffers, the SGD update of all ten parameters, the
   mean loss and the correct count.

Nothing else runs: the intermediate buffers are allocated once per (batch size,
device) and reused, so a step is exactly these launches (and a CUDA graph of it
replays exactly these kernels); the learning rate may be a device tensor the
update reads when it runs.  No float atomics anywhere: two runs give the same bits.

params are LeNet's (lenet_fast.model.STAGES: weight and bias of conv1, conv2, fc1,
fc2, fc3), fp32 contiguous; the update is torch.optim.SGD's for a step whose
momentum buffers exist.  The gradients come back as new tensors (allocated, not
computed: no kernel), in parameter order, for the caller to leave in `.grad`.
"""

from __future__ import annotations

import torch

from .lenet_features import (FEATURES_SHAPE, POOLED1_SHAPE, W1_SHAPE, W2_SHAPE, features_backward,
                             features_forward, features_programs)
from .lenet_head import HeadStep, empty_outputs, head_step
from .lenet_sgd import sgd_update

# (batch size, device) -> the step's intermediate buffers, reused by every step of that size.
_WORKSPACES: dict[tuple[int, torch.device], tuple] = {}


def supports(params: list[torch.Tensor]) -> bool:
    """Whether params are those of the LeNet these kernels are written for: the conv stages'
    shapes are fixed in lenet_features.py, the head (three linear layers) is any size."""
    return (len(params) == 10 and tuple(params[0].shape) == W1_SHAPE and tuple(params[2].shape) == W2_SHAPE
            and params[4].shape[1] == FEATURES_SHAPE[0] * FEATURES_SHAPE[1] * FEATURES_SHAPE[2]
            and all(p.dtype == torch.float32 and p.is_contiguous() for p in params))


def make_workspace(n: int, device: torch.device,
                   params: list[torch.Tensor]) -> tuple[list[torch.Tensor], HeadStep, list[torch.Tensor]]:
    """(features_forward's outputs, head_step's, features_backward's) for batches of n on device."""
    def empty(*shape, dtype=torch.float32):
        return torch.empty(shape, device=device, dtype=dtype)

    forward = [empty(n, *POOLED1_SHAPE), empty(n, *POOLED1_SHAPE, dtype=torch.uint8), empty(n, *FEATURES_SHAPE),
               empty(n, *FEATURES_SHAPE, dtype=torch.uint8)]
    fc1, fc2, fc3 = params[4], params[6], params[8]
    head = empty_outputs(n, fc1.shape[1], fc1.shape[0], fc2.shape[0], fc3.shape[0], device)
    P = features_programs(n, device.type == "cuda")
    conv_partials = [empty(P, *W1_SHAPE), empty(P, W1_SHAPE[0]), empty(P, *W2_SHAPE), empty(P, W2_SHAPE[0])]
    return forward, head, conv_partials


def sgd_train_step(x: torch.Tensor, target: torch.Tensor, params: list[torch.Tensor],
                   momentum_buffers: list[torch.Tensor], lr: float | torch.Tensor, momentum: float,
                   dampening: float, weight_decay: float, nesterov: bool,
                   maximize: bool, workspace=None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One SGD training step of LeNet on (x (N, 1, 28, 28) fp32, target (N,) int64; -100
    ignored): (mean loss (0-d fp32), correct predictions (0-d int64), the gradients).
    workspace: make_workspace's buffers; default: kept per (batch size, device) and reused."""
    if workspace is None:
        key = (x.shape[0], x.device)
        if key not in _WORKSPACES:
            _WORKSPACES[key] = make_workspace(*key, params)
        workspace = _WORKSPACES[key]
    (pooled1, code1, features, code2), head, conv_partials = workspace
    features_forward(x, *params[:4], pooled1=pooled1, code1=code1, features=features, code2=code2)
    head_step(features.view(x.shape[0], -1), *params[4:], target, out=head)
    features_backward(head.dfeatures, x, pooled1, code1, code2, params[2], *conv_partials)
    grads = [torch.empty_like(p) for p in params]
    loss = torch.empty((), device=x.device, dtype=torch.float32)
    correct = torch.empty((), device=x.device, dtype=torch.int64)
    sgd_update(params, grads, momentum_buffers, [*conv_partials, *head.partials()], lr, momentum, dampening,
               weight_decay, nesterov, maximize, head.loss_part, head.count_part, head.correct_part, loss, correct)
    return loss, correct, grads
