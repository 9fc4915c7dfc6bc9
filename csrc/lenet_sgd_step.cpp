// One SGD training step of LeNet on the CPU, without autograd: the CPU's counterpart of
// replaying a CUDA graph (lenet_fast/cuda_graph.py).
//
// An eager step records three autograd nodes, runs them and ten AccumulateGrad nodes
// through the engine, and crosses into Python for every op, the loss and the optimizer,
// a sixth of a LeNet step on a CPU (docs/measurements-behind-the-code.md).  Here the same kernels run in the order the engine runs
// them, with the same arguments (the op's forward, then its backward with the gradient
// the engine would pass), and the parameters are updated by the kernel FusedSGD calls
// (aten::_fused_sgd_), so loss, gradients and parameters are bitwise those of the eager
// step (tests/test_lenet_sgd_step.py).  lenet_fast/fused_step.py decides when it may run.
//
// params: conv1.weight, conv1.bias, conv2.weight, conv2.bias, fc1..fc3 weight, bias.
// Each parameter's .grad is set to its gradient, as backward() with set_to_none leaves it.
#include <ATen/ops/_fused_sgd.h>
#include <ATen/ops/ones.h>

#include "common.h"
#include "ops.h"

namespace lenet_fast {

std::tuple<at::Tensor, at::Tensor> lenet_sgd_step(const at::Tensor& x, const at::Tensor& target,
                                                  at::TensorList params, at::TensorList momentum_buffers, double lr,
                                                  double momentum, double weight_decay, double dampening,
                                                  bool nesterov, bool maximize) {
  TORCH_CHECK(params.size() == 10 && momentum_buffers.size() == 10, "lenet_fast ext: lenet_sgd_step takes LeNet's ",
              "10 parameters and their momentum buffers, got ", params.size(), " and ", momentum_buffers.size());
  TORCH_CHECK(x.dim() == 4 && x.size(1) == 1, "lenet_fast ext: lenet_sgd_step expects x (N, 1, H, W), got ",
              x.sizes());
  // A kernel, not a graph: nothing below records autograd history, and the in-place
  // update of leaf parameters is allowed (as under FusedSGD's torch.no_grad()).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor &w1 = params[0], &b1 = params[1], &w2 = params[2], &b2 = params[3];
  const std::vector<at::Tensor> head_w{params[4], params[6], params[8]}, head_b{params[5], params[7], params[9]};

  // Forward: LeNet.forward_with_loss.
  const auto [a1, codes1] = conv3x3_relu_maxpool2x2_fwd(x, w1, b1, 0);
  const auto [a2, codes2] = conv3x3_relu_maxpool2x2_fwd(a1, w2, b2, 0);
  const auto [loss, logits, dlogits, hidden] = mlp_cross_entropy_fwd(a2, head_w, head_b, target);

  // Backward: loss.backward() seeds d loss = 1 and the engine calls the nodes' backward
  // ops top down; x needs no gradient.
  const at::Tensor one = at::ones({}, loss.options());
  const auto [grad_a2, grad_head_w, grad_head_b] =
      mlp_cross_entropy_bwd(one, std::nullopt, dlogits, logits, a2, head_w, hidden, true, true);
  const auto [grad_a1, grad_w2, grad_b2] = conv3x3_relu_maxpool2x2_bwd(grad_a2, codes2, a1, w2, 0, true, true);
  const auto [unused, grad_w1, grad_b1] = conv3x3_relu_maxpool2x2_bwd(grad_a1, codes1, x, w1, 0, false, true);
  const std::vector<at::Tensor> grads{grad_w1,          grad_b1,          grad_w2,          grad_b2,
                                      grad_head_w[0], grad_head_b[0], grad_head_w[1], grad_head_b[1],
                                      grad_head_w[2], grad_head_b[2]};
  for (size_t i = 0; i < grads.size(); ++i) params[i].mutable_grad() = grads[i];

  // FusedSGD.step(): its fast path's one kernel call on buffers it already holds.
  at::_fused_sgd_(params, grads, momentum_buffers, weight_decay, momentum, lr, dampening, nesterov, maximize,
                  /*is_first_step=*/false);
  return {loss, count_correct(logits, target)};
}

}  // namespace lenet_fast
