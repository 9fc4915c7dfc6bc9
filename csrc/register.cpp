// Operator registration of lenet_fast._C: schemas (TORCH_LIBRARY), CPU and CUDA
// kernels (TORCH_LIBRARY_IMPL), C++ autograd (Autograd key) and the Python
// module entry point.  The fake (meta) implementations are registered in Python
// (lenet_fast/ext_backend.py, torch.library.register_fake); impl_abstract_pystub
// tells torch to import that module when it needs them.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "ops.h"

namespace lenet_fast {
namespace {

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

// Every Function below calls ctx->set_materialize_grads(false) in forward: otherwise the
// engine allocates and zero-fills a gradient for each output that received none (the
// winner codes, the head's logits and hidden activations: six tensors, ~400 KB of zeros
// per LeNet training step), only for backward to ignore them.  So backward sees
// undefined gradients instead, and an output gradient that is undefined means zero:
// the inputs get undefined (= zero) gradients too.
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

// --- conv3x3 + bias + ReLU ------------------------------------------------------
struct ConvReluFn : public torch::autograd::Function<ConvReluFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const std::optional<at::Tensor>& b, int64_t pad) {
    static const auto op = op_handle<decltype(conv3x3_relu_fwd)>("lenet_fast::ext_conv3x3_relu");
    ctx->set_materialize_grads(false);
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(x, w, b, pad);
    }
    ctx->save_for_backward({x, w, out});
    ctx->saved_data["pad"] = pad;
    ctx->saved_data["has_bias"] = has_tensor(b);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<decltype(conv3x3_relu_bwd)>("lenet_fast::ext_conv3x3_relu_backward");
    if (!grads[0].defined()) return zero_grads(4);
    const auto s = ctx->get_saved_variables();
    const NeedGrads ng = need_grads(ctx);
    auto [dx, dw, db] =
        call_backward_op(op, grads[0], s[2], s[0], s[1], ctx->saved_data["pad"].toInt(), ng.x, ng.w || ng.b);
    return {grad_or_undef(ng.x, dx), grad_or_undef(ng.w, dw), grad_or_undef(ng.b, db), at::Tensor()};
  }
};

at::Tensor conv3x3_relu_autograd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                                 int64_t pad) {
  return ConvReluFn::apply(x, w, b, pad);
}

// --- max-pool 2x2 --------------------------------------------------------------------
struct MaxPoolFn : public torch::autograd::Function<MaxPoolFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x) {
    static const auto op = op_handle<decltype(maxpool2x2_fwd)>("lenet_fast::ext_maxpool2x2");
    ctx->set_materialize_grads(false);
    at::Tensor out, idx;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, idx) = op.call(x);
    }
    ctx->save_for_backward({x, idx});
    ctx->mark_non_differentiable({idx});
    return {out, idx};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<decltype(maxpool2x2_bwd)>("lenet_fast::ext_maxpool2x2_backward");
    if (!grads[0].defined()) return zero_grads(1);
    const auto s = ctx->get_saved_variables();
    return {call_backward_op(op, grads[0], s[1], s[0])};
  }
};

std::tuple<at::Tensor, at::Tensor> maxpool2x2_autograd(const at::Tensor& x) {
  auto r = MaxPoolFn::apply(x);
  return {r[0], r[1]};
}

// --- conv3x3 + bias + ReLU + max-pool 2x2 -------------------------------------------
struct ConvReluPoolFn : public torch::autograd::Function<ConvReluPoolFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                               const std::optional<at::Tensor>& b, int64_t pad) {
    static const auto op =
        op_handle<decltype(conv3x3_relu_maxpool2x2_fwd)>("lenet_fast::ext_conv3x3_relu_maxpool2x2");
    ctx->set_materialize_grads(false);
    at::Tensor out, idx;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, idx) = op.call(x, w, b, pad);
    }
    ctx->save_for_backward({x, w, idx});
    ctx->saved_data["pad"] = pad;
    ctx->saved_data["has_bias"] = has_tensor(b);
    ctx->mark_non_differentiable({idx});
    return {out, idx};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle<decltype(conv3x3_relu_maxpool2x2_bwd)>("lenet_fast::ext_conv3x3_relu_maxpool2x2_backward");
    if (!grads[0].defined()) return zero_grads(4);
    const auto s = ctx->get_saved_variables();
    const NeedGrads ng = need_grads(ctx);
    auto [dx, dw, db] =
        call_backward_op(op, grads[0], s[2], s[0], s[1], ctx->saved_data["pad"].toInt(), ng.x, ng.w || ng.b);
    return {grad_or_undef(ng.x, dx), grad_or_undef(ng.w, dw), grad_or_undef(ng.b, db), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> conv3x3_relu_maxpool2x2_autograd(const at::Tensor& x, const at::Tensor& w,
                                                                    const std::optional<at::Tensor>& b, int64_t pad) {
  auto r = ConvReluPoolFn::apply(x, w, b, pad);
  return {r[0], r[1]};
}

// --- linear + bias (+ ReLU) ------------------------------------------------------
struct LinearFn : public torch::autograd::Function<LinearFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const std::optional<at::Tensor>& b, bool relu) {
    static const auto op = op_handle<decltype(linear_fwd)>("lenet_fast::ext_linear");
    ctx->set_materialize_grads(false);
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(x, w, b, relu);
    }
    ctx->save_for_backward({x, w, out});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["has_bias"] = has_tensor(b);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<decltype(linear_bwd)>("lenet_fast::ext_linear_backward");
    if (!grads[0].defined()) return zero_grads(4);
    const auto s = ctx->get_saved_variables();
    const NeedGrads ng = need_grads(ctx);
    auto [dx, dw, db] =
        call_backward_op(op, grads[0], s[2], s[0], s[1], ctx->saved_data["relu"].toBool(), ng.x, ng.w || ng.b);
    return {grad_or_undef(ng.x, dx), grad_or_undef(ng.w, dw), grad_or_undef(ng.b, db), at::Tensor()};
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, bool relu) {
  return LinearFn::apply(x, w, b, relu);
}

// --- MLP classifier head + mean cross-entropy -------------------------------------
// Inputs flatten to (x, weights..., biases..., target) for needs_input_grad and for the
// gradients backward returns; outputs are (loss, logits, dlogits, hidden...), of which only
// loss and logits are differentiable.
struct MlpCrossEntropyFn : public torch::autograd::Function<MlpCrossEntropyFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, const at::Tensor& target) {
    static const auto op = op_handle<decltype(mlp_cross_entropy_fwd)>("lenet_fast::ext_mlp_cross_entropy");
    ctx->set_materialize_grads(false);
    at::Tensor loss, logits, dlogits;
    std::vector<at::Tensor> hidden;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(loss, logits, dlogits, hidden) = op.call(x, weights, biases, target);
    }
    variable_list saved{x, logits, dlogits};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), hidden.begin(), hidden.end());
    ctx->save_for_backward(saved);
    variable_list outputs{loss, logits, dlogits};
    outputs.insert(outputs.end(), hidden.begin(), hidden.end());
    ctx->mark_non_differentiable(variable_list(outputs.begin() + 2, outputs.end()));
    return outputs;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle<decltype(mlp_cross_entropy_bwd)>("lenet_fast::ext_mlp_cross_entropy_backward");
    const auto s = ctx->get_saved_variables();
    const size_t L = (s.size() - 2) / 2;  // x, logits, dlogits, L weights, L - 1 hidden
    if (!grads[0].defined() && !grads[1].defined()) return zero_grads(2 + 2 * L);  // x, weights, biases, target
    const at::TensorList weights(s.data() + 3, L), hidden(s.data() + 3 + L, L - 1);
    bool weight_grad = false;
    for (size_t i = 1; i <= 2 * L; ++i) weight_grad = weight_grad || ctx->needs_input_grad(i);
    const bool input_grad = ctx->needs_input_grad(0);
    auto [gx, gw, gb] =
        call_backward_op(op, grads[0], grads[1], s[2], s[1], s[0], weights, hidden, input_grad, weight_grad);
    variable_list result{grad_or_undef(input_grad, gx)};
    for (size_t l = 0; l < L; ++l) result.push_back(grad_or_undef(ctx->needs_input_grad(1 + l), gw[l]));
    for (size_t l = 0; l < L; ++l) result.push_back(grad_or_undef(ctx->needs_input_grad(1 + L + l), gb[l]));
    result.emplace_back();  // target
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> mlp_cross_entropy_autograd(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, const at::Tensor& target) {
  auto r = MlpCrossEntropyFn::apply(x, weights, biases, target);
  return {r[0], r[1], r[2], std::vector<at::Tensor>(r.begin() + 3, r.end())};
}

// loss.backward() without the Python around it.  torch.autograd.backward runs Python per
// call (argument normalisation, the implicit ones_like gradient, a context stashed for
// compiled autograd) before the C++ engine starts, a few percent of a LeNet training step
// on a CPU (docs/measurements-behind-the-code.md).  The engine run is the same one.  torch.ops
// calls release the GIL, which the engine requires.
void run_backward(const at::Tensor& loss) { torch::autograd::backward({loss}); }

}  // namespace

TORCH_LIBRARY(lenet_fast, m) {
  m.impl_abstract_pystub("lenet_fast.ext_backend");
  m.def("run_backward(Tensor loss) -> ()", &run_backward);
  m.def("ext_conv3x3_relu(Tensor x, Tensor weight, Tensor? bias, int padding) -> Tensor");
  m.def(
      "ext_conv3x3_relu_backward(Tensor grad_out, Tensor out, Tensor x, Tensor weight, int padding, "
      "bool input_grad, bool weight_grad) -> (Tensor, Tensor, Tensor)");
  m.def("ext_maxpool2x2(Tensor x) -> (Tensor, Tensor)");
  m.def("ext_maxpool2x2_backward(Tensor grad_out, Tensor idx, Tensor x) -> Tensor");
  m.def("ext_conv3x3_relu_maxpool2x2(Tensor x, Tensor weight, Tensor? bias, int padding) -> (Tensor, Tensor)");
  m.def(
      "ext_conv3x3_relu_maxpool2x2_backward(Tensor grad_out, Tensor idx, Tensor x, Tensor weight, int padding, "
      "bool input_grad, bool weight_grad) -> (Tensor, Tensor, Tensor)");
  m.def("ext_linear(Tensor x, Tensor weight, Tensor? bias, bool relu) -> Tensor");
  m.def(
      "ext_linear_backward(Tensor grad_out, Tensor out, Tensor x, Tensor weight, bool relu, bool input_grad, "
      "bool weight_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ext_mlp_cross_entropy(Tensor x, Tensor[] weights, Tensor[] biases, Tensor target) "
      "-> (Tensor, Tensor, Tensor, Tensor[])");
  m.def(
      "ext_mlp_cross_entropy_backward(Tensor? grad_loss, Tensor? grad_logits, Tensor dlogits, Tensor logits, "
      "Tensor x, Tensor[] weights, Tensor[] hidden, bool input_grad, bool weight_grad) "
      "-> (Tensor, Tensor[], Tensor[])");
  m.def("ext_count_correct(Tensor logits, Tensor target) -> Tensor");
  // Mutates the parameters and buffers in place and sets each parameter's .grad (a side
  // effect a schema cannot state): for eager training only, CPU only.
  m.def(
      "ext_lenet_sgd_step(Tensor x, Tensor target, Tensor(a!)[] params, Tensor(b!)[] momentum_buffers, float lr, "
      "float momentum, float weight_decay, float dampening, bool nesterov, bool maximize) -> (Tensor, Tensor)");
}

#define LF_REGISTER_KERNELS(m)                                                                \
  m.impl("ext_conv3x3_relu", &conv3x3_relu_fwd);                                              \
  m.impl("ext_conv3x3_relu_backward", &conv3x3_relu_bwd);                                     \
  m.impl("ext_maxpool2x2", &maxpool2x2_fwd);                                                  \
  m.impl("ext_maxpool2x2_backward", &maxpool2x2_bwd);                                         \
  m.impl("ext_conv3x3_relu_maxpool2x2", &conv3x3_relu_maxpool2x2_fwd);                        \
  m.impl("ext_conv3x3_relu_maxpool2x2_backward", &conv3x3_relu_maxpool2x2_bwd);               \
  m.impl("ext_linear", &linear_fwd);                                                          \
  m.impl("ext_linear_backward", &linear_bwd);                                                 \
  m.impl("ext_mlp_cross_entropy", &mlp_cross_entropy_fwd);                                    \
  m.impl("ext_mlp_cross_entropy_backward", &mlp_cross_entropy_bwd);                           \
  m.impl("ext_count_correct", &count_correct);

TORCH_LIBRARY_IMPL(lenet_fast, CPU, m) {
  LF_REGISTER_KERNELS(m)
  m.impl("ext_lenet_sgd_step", &lenet_sgd_step);
}

#ifdef LENET_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(lenet_fast, CUDA, m) { LF_REGISTER_KERNELS(m) }
#endif

TORCH_LIBRARY_IMPL(lenet_fast, Autograd, m) {
  m.impl("ext_conv3x3_relu", &conv3x3_relu_autograd);
  m.impl("ext_maxpool2x2", &maxpool2x2_autograd);
  m.impl("ext_conv3x3_relu_maxpool2x2", &conv3x3_relu_maxpool2x2_autograd);
  m.impl("ext_linear", &linear_autograd);
  m.impl("ext_mlp_cross_entropy", &mlp_cross_entropy_autograd);
  // An integer count has no gradient: the dispatcher goes straight to the kernel (without
  // this, logits that require grad send every call through torch's boxed fallback).
  m.impl("ext_count_correct", torch::CppFunction::makeFallthrough());
  // Records no graph by design (it runs the backward itself, below autograd).
  m.impl("ext_lenet_sgd_step", torch::CppFunction::makeFallthrough());
}

}  // namespace lenet_fast

// `import lenet_fast._C` loads this library (running the registrations above)
// and gives a tiny module: HAS_CUDA says whether CUDA kernels were compiled in.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "lenet_fast C++/CUDA kernels; the ops are torch.ops.lenet_fast.ext_*",
      -1,
      nullptr,
  };
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef LENET_FAST_WITH_CUDA
  const long has_cuda = 1;
#else
  const long has_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "HAS_CUDA", has_cuda) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
