// The C++ autograd glue shared by the ops' files (csrc/<name>.cpp).  Each op there
// registers its CPU/CUDA kernels and its Autograd kernel: a torch::autograd::Function
// whose forward calls the forward op below autograd and saves what the backward op
// needs, and whose backward calls the backward op through call_backward_op.
//
// The ops' schemas are not written in C++: lenet_fast/ops.py defines them (and their
// fakes) from Python when lenet_fast.ext_backend is imported.  The dispatcher binds
// kernels registered before their schema once it arrives, checking that the C++
// signature matches it; op_handle looks the op up at its first call (a function-local
// static), after that import.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <utility>

namespace lenet_fast {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

inline at::Tensor grad_or_undef(bool wanted, const at::Tensor& t) { return wanted ? t : at::Tensor(); }

inline bool has_tensor(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The backward ops have no autograd kernel of their own, so double backward is not
// supported: a backward run with create_graph=True (grad mode on inside it) raises
// NotImplementedError here, instead of torch's autograd fallback, which would only warn
// and treat the backward ops as constants, giving wrong second derivatives.  In a plain
// backward() (grad mode off) they skip the Autograd key: otherwise the dispatcher sends
// them through that boxed fallback, which packs every argument into a stack and unpacks
// it again only to find nothing to record.
template <typename Op, typename... Args>
auto call_backward_op(const Op& op, Args&&... args) {
  TORCH_CHECK_NOT_IMPLEMENTED(!at::GradMode::is_enabled(), "lenet_fast: double backward (a backward with ",
                              "create_graph=True, e.g. for a gradient penalty or a Hessian) is not supported by ",
                              op.schema().name(), "; use backend=\"torch\" for that computation");
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(std::forward<Args>(args)...);
}

// Every Function calls ctx->set_materialize_grads(false) in forward: otherwise the
// engine allocates and zero-fills a gradient for each output that received none (the
// winner codes, the head's logits and hidden activations: six tensors, ~400 KB of zeros
// per LeNet training step), only for backward to ignore them.  So backward sees undefined gradients instead, and an output gradient that is
// undefined means zero: the inputs get undefined (= zero) gradients too.
inline variable_list zero_grads(size_t inputs) { return variable_list(inputs); }

// needs_input_grad() counts only the tensor inputs that were given, so an absent
// bias has no slot: (x, weight[, bias]).
struct NeedGrads {
  bool x, w, b;
};
inline NeedGrads need_grads(AutogradContext* ctx) {
  const bool has_b = ctx->saved_data["has_bias"].toBool();
  return {ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_b && ctx->needs_input_grad(2)};
}

// The contract of a layer op (conv3x3_relu, conv3x3_relu_maxpool2x2, linear), as
// lenet_fast/ops.py's glue states it for Python: forward saves (x, weight, its output or
// pooling code) and its attribute (padding or relu); backward is one call of the backward
// op (grad_out, output or code, x, weight, attribute, input_grad, weight_grad).
template <typename Attr>
void save_layer(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, const at::Tensor& saved,
                const std::optional<at::Tensor>& b, Attr attr) {
  ctx->save_for_backward({x, w, saved});
  ctx->saved_data["attr"] = attr;
  ctx->saved_data["has_bias"] = has_tensor(b);
}

template <typename Attr, typename Op>
variable_list layer_backward(const Op& op, AutogradContext* ctx, const variable_list& grads) {
  if (!grads[0].defined()) return zero_grads(4);
  const auto s = ctx->get_saved_variables();
  const NeedGrads ng = need_grads(ctx);
  auto [dx, dw, db] =
      call_backward_op(op, grads[0], s[2], s[0], s[1], ctx->saved_data["attr"].to<Attr>(), ng.x, ng.w || ng.b);
  return {grad_or_undef(ng.x, dx), grad_or_undef(ng.w, dw), grad_or_undef(ng.b, db), at::Tensor()};
}

}  // namespace lenet_fast

// Registers the table op lenet_fast::ext_<name> (and ext_<name>_backward): the forward and
// backward kernels for CPU (and CUDA, when built with it), and the autograd kernel.  Use it
// once per op file, at namespace scope.  The kernels branch on the device themselves.
#ifdef LENET_FAST_WITH_CUDA
#define LENET_FAST_REGISTER_CUDA_(name, forward, backward) \
  TORCH_LIBRARY_IMPL(lenet_fast, CUDA, m) {               \
    m.impl("ext_" name, forward);                          \
    m.impl("ext_" name "_backward", backward);             \
  }
#else
#define LENET_FAST_REGISTER_CUDA_(name, forward, backward)
#endif
#define LENET_FAST_REGISTER_OP(name, forward, backward, autograd)                  \
  TORCH_LIBRARY_IMPL(lenet_fast, CPU, m) {                                         \
    m.impl("ext_" name, forward);                                                  \
    m.impl("ext_" name "_backward", backward);                                     \
  }                                                                                \
  LENET_FAST_REGISTER_CUDA_(name, forward, backward)                               \
  TORCH_LIBRARY_IMPL(lenet_fast, Autograd, m) { m.impl("ext_" name, autograd); }
