// The torch-facing kernels that more than one file calls, each serving CPU and CUDA
// tensors: the fused conv stage and the head, which the one-op training step
// (lenet_sgd_step.cpp) runs directly; linear, on which the head runs its layers; and the
// ext-only ops that register.cpp registers.  Every op's own file (csrc/<name>.cpp)
// registers its kernels and its autograd; an op that no other file calls is not here.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace lenet_fast {

// conv3x3_relu_maxpool2x2.cpp: returns (pooled output, winner codes).
std::tuple<at::Tensor, at::Tensor> conv3x3_relu_maxpool2x2_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& bias, int64_t padding);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv3x3_relu_maxpool2x2_bwd(const at::Tensor& grad_out,
                                                                           const at::Tensor& idx, const at::Tensor& x,
                                                                           const at::Tensor& weight, int64_t padding,
                                                                           bool input_grad, bool weight_grad);

// linear.cpp.
at::Tensor linear_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, bool relu);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd(const at::Tensor& grad_out, const at::Tensor& out,
                                                          const at::Tensor& x, const at::Tensor& weight, bool relu,
                                                          bool input_grad, bool weight_grad);

// mlp_cross_entropy.cpp: returns (loss, logits, dlogits, hidden activations).
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> mlp_cross_entropy_fwd(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, const at::Tensor& target);
// Returns (grad_x, grad_weights, grad_biases).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_cross_entropy_bwd(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_logits,
    const at::Tensor& dlogits, const at::Tensor& logits, const at::Tensor& x, at::TensorList weights,
    at::TensorList hidden, bool input_grad, bool weight_grad);

// count_correct.cpp: (logits.argmax(1) == target).sum(), an int64 scalar.
at::Tensor count_correct(const at::Tensor& logits, const at::Tensor& target);

// lenet_sgd_step.cpp: one SGD step of LeNet without autograd; returns (loss, correct count).
std::tuple<at::Tensor, at::Tensor> lenet_sgd_step(const at::Tensor& x, const at::Tensor& target,
                                                  at::TensorList params, at::TensorList momentum_buffers, double lr,
                                                  double momentum, double weight_decay, double dampening,
                                                  bool nesterov, bool maximize);

}  // namespace lenet_fast
