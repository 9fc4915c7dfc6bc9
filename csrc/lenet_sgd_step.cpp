// One SGD training step of LeNet on the CPU, without autograd: the CPU's counterpart of
// replaying a CUDA graph (lenet_fast/cuda_graph.py).
//
// An eager step records an autograd node per stage op, runs them and an AccumulateGrad
// node per parameter through the engine, and crosses into Python for every op, the loss
// and the optimizer, a sixth of a LeNet step on a CPU (docs/measurements-behind-the-code.md).
// Here the same kernels run in the order the engine runs them, with the same arguments (the
// op's forward, then its backward with the gradient the engine would pass), and the
// parameters are updated by the kernel FusedSGD calls (aten::_fused_sgd_), so loss,
// gradients and parameters are bitwise those of the eager step
// (tests/test_lenet_sgd_step.py).  lenet_fast/fused_step.py decides when it may run.
//
// params: the weight and bias of every stage of lenet_fast.model.STAGES, in stage order
// (LeNet.stage_parameters()).  The leading stages whose weight is 4-D are conv3x3 + ReLU +
// max-pool 2x2 stages with padding 0 (ops.conv3x3_relu_maxpool2x2); the rest, 2-D, form
// the head, run with its loss as one mlp_cross_entropy, as LeNet.forward_with_loss does.
// Each parameter's .grad is set to its gradient, as backward() with set_to_none leaves it.
#include <ATen/ops/_fused_sgd.h>
#include <ATen/ops/ones.h>

#include <vector>

#include "common.h"
#include "ops.h"

namespace lenet_fast {

std::tuple<at::Tensor, at::Tensor> lenet_sgd_step(const at::Tensor& x, const at::Tensor& target,
                                                  at::TensorList params, at::TensorList momentum_buffers, double lr,
                                                  double momentum, double weight_decay, double dampening,
                                                  bool nesterov, bool maximize) {
  const size_t P = params.size();
  TORCH_CHECK(P >= 2 && P % 2 == 0 && momentum_buffers.size() == P, "lenet_fast ext: lenet_sgd_step takes a ",
              "weight and a bias per stage (lenet_fast.model.STAGES) and their momentum buffers, got ", P,
              " parameters and ", momentum_buffers.size(), " buffers");
  size_t convs = 0;  // the leading stages whose weight is 4-D
  while (2 * convs < P && params[2 * convs].dim() == 4) ++convs;
  std::vector<at::Tensor> head_w, head_b;
  for (size_t s = convs; 2 * s < P; ++s) {
    TORCH_CHECK(params[2 * s].dim() == 2, "lenet_fast ext: lenet_sgd_step expects the conv stages (4-D weights) ",
                "then the linear ones (2-D weights), but stage ", s, "'s weight is ", params[2 * s].sizes());
    head_w.push_back(params[2 * s]);
    head_b.push_back(params[2 * s + 1]);
  }
  TORCH_CHECK(!head_w.empty(), "lenet_fast ext: lenet_sgd_step needs at least one linear stage after the conv stages");
  // A kernel, not a graph: nothing below records autograd history, and the in-place
  // update of leaf parameters is allowed (as under FusedSGD's torch.no_grad()).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;

  // Forward: LeNet.forward_with_loss.  inputs[s] is stage s's input; inputs[convs] the head's.
  std::vector<at::Tensor> inputs{x}, codes;
  for (size_t s = 0; s < convs; ++s) {
    auto [out, code] = conv3x3_relu_maxpool2x2_fwd(inputs[s], params[2 * s], params[2 * s + 1], 0);
    inputs.push_back(std::move(out));
    codes.push_back(std::move(code));
  }
  const auto [loss, logits, dlogits, hidden] = mlp_cross_entropy_fwd(inputs[convs], head_w, head_b, target);

  // Backward: loss.backward() seeds d loss = 1 and the engine calls the nodes' backward
  // ops top down; x needs no gradient, so neither does the first stage's input.
  const at::Tensor one = at::ones({}, loss.options());
  std::vector<at::Tensor> grads(P);
  auto head_grads = mlp_cross_entropy_bwd(one, std::nullopt, dlogits, logits, inputs[convs], head_w, hidden,
                                          /*input_grad=*/convs > 0, /*weight_grad=*/true);
  for (size_t l = 0; l < head_w.size(); ++l) {
    grads[2 * (convs + l)] = std::get<1>(head_grads)[l];
    grads[2 * (convs + l) + 1] = std::get<2>(head_grads)[l];
  }
  at::Tensor grad_out = std::get<0>(head_grads);  // d loss / d (the stage's output)
  for (size_t s = convs; s-- > 0;) {
    auto [grad_in, grad_w, grad_b] =
        conv3x3_relu_maxpool2x2_bwd(grad_out, codes[s], inputs[s], params[2 * s], 0, /*input_grad=*/s > 0, true);
    grads[2 * s] = std::move(grad_w);
    grads[2 * s + 1] = std::move(grad_b);
    grad_out = std::move(grad_in);
  }
  for (size_t i = 0; i < P; ++i) params[i].mutable_grad() = grads[i];

  // FusedSGD.step(): its fast path's one kernel call on buffers it already holds.
  at::_fused_sgd_(params, grads, momentum_buffers, weight_decay, momentum, lr, dampening, nesterov, maximize,
                  /*is_first_step=*/false);
  return {loss, count_correct(logits, target)};
}

}  // namespace lenet_fast
