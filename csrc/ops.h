// The torch-facing kernels of the ops (forward and backward), one function
// per op serving both CPU and CUDA tensors; registered in register.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace lenet_fast {

at::Tensor conv3x3_relu_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t padding);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv3x3_relu_bwd(const at::Tensor& grad_out, const at::Tensor& out,
                                                                const at::Tensor& x, const at::Tensor& weight,
                                                                int64_t padding, bool input_grad, bool weight_grad);

std::tuple<at::Tensor, at::Tensor> maxpool2x2_fwd(const at::Tensor& x);
at::Tensor maxpool2x2_bwd(const at::Tensor& grad_out, const at::Tensor& idx, const at::Tensor& x);

std::tuple<at::Tensor, at::Tensor> conv3x3_relu_maxpool2x2_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                               const std::optional<at::Tensor>& bias, int64_t padding);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv3x3_relu_maxpool2x2_bwd(const at::Tensor& grad_out,
                                                                           const at::Tensor& idx, const at::Tensor& x,
                                                                           const at::Tensor& weight, int64_t padding,
                                                                           bool input_grad, bool weight_grad);

at::Tensor linear_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, bool relu);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd(const at::Tensor& grad_out, const at::Tensor& out,
                                                          const at::Tensor& x, const at::Tensor& weight, bool relu,
                                                          bool input_grad, bool weight_grad);

// Returns (loss, logits, dlogits, hidden activations); see mlp_cross_entropy.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> mlp_cross_entropy_fwd(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, const at::Tensor& target);
// Returns (grad_x, grad_weights, grad_biases).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_cross_entropy_bwd(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_logits,
    const at::Tensor& dlogits, const at::Tensor& logits, const at::Tensor& x, at::TensorList weights,
    at::TensorList hidden, bool input_grad, bool weight_grad);

// (logits.argmax(1) == target).sum(), an int64 scalar; see count_correct.cpp.
at::Tensor count_correct(const at::Tensor& logits, const at::Tensor& target);

// One SGD step of LeNet without autograd; returns (loss, correct count); see lenet_sgd_step.cpp.
std::tuple<at::Tensor, at::Tensor> lenet_sgd_step(const at::Tensor& x, const at::Tensor& target,
                                                  at::TensorList params, at::TensorList momentum_buffers, double lr,
                                                  double momentum, double weight_decay, double dampening,
                                                  bool nesterov, bool maximize);

}  // namespace lenet_fast
