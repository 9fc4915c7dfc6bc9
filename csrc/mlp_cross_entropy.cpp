// MLP classifier head + mean cross-entropy in one op:
//   h_0 = x,  h_l = relu(h_{l-1} W_l^T + b_l) for l < L,  logits = h_{L-1} W_L^T + b_L,
//   loss = mean_n(logsumexp(logits_n) - logits_n[target_n]) over the rows whose target is
//   not kIgnoreIndex (-100, stock cross_entropy's ignore_index: such a row adds nothing to the
//   loss or the gradients, and the mean is over the other rows; all rows ignored: NaN loss,
//   zero gradients, as in stock).
// The layers are linear.cpp's kernels (GEMMs + fused bias/ReLU passes); the loss pass also
// writes dlogits = d loss / d logits, so the backward is linear.cpp's backward run layer by
// layer from the top.  Why one op: in eager PyTorch every layer and the loss is its own
// Python call and autograd node, and for a small head like LeNet's that bookkeeping costs
// more than the GEMMs (docs/benchmarks.md).
// Here too: its C++ autograd and its registration as lenet_fast::ext_mlp_cross_entropy (and
// _backward; schemas: lenet_fast/ops.py, MLP_CROSS_ENTROPY).  The wrappers are in ops.h
// too: the one-op training step (lenet_sgd_step.cpp) calls them directly.
#include <cmath>
#include <vector>

#include <ATen/AccumulateType.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/log_softmax.h>
#include <ATen/ops/nll_loss.h>
#include <ATen/ops/scatter.h>
#include <ATen/ops/zeros_like.h>

#include "autograd.h"
#include "common.h"
#include "ops.h"

namespace lenet_fast {

namespace {

constexpr int64_t kIgnoreIndex = -100;

// Row-wise log-softmax cross-entropy on the CPU: returns the mean loss and writes dz.
// Serial over rows: a classifier's N x C is small, and the row losses are summed in
// row order in double (float64: in long double), so the loss is deterministic.
template <typename T>
T softmax_cross_entropy_cpu(const T* z, const int64_t* target, T* dz, int64_t N, int64_t C) {
  using acc_t = at::acc_type<T, /*is_cuda=*/false>;
  int64_t counted = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t t = target[n];
    TORCH_CHECK_INDEX(t == kIgnoreIndex || (t >= 0 && t < C), "lenet_fast ext: target[", n, "] = ", t,
                      " is not a class index in [0, ", C, ") nor the ignored index ", kIgnoreIndex);
    counted += t != kIgnoreIndex;
  }
  acc_t total = 0;
  const T inv_n = T(1) / static_cast<T>(counted);
  for (int64_t n = 0; n < N; ++n) {
    const T* zr = z + n * C;
    T* dr = dz + n * C;
    const int64_t t = target[n];
    if (t == kIgnoreIndex) {
      for (int64_t c = 0; c < C; ++c) dr[c] = T(0);
      continue;
    }
    T m = zr[0];
    for (int64_t c = 1; c < C; ++c) m = (zr[c] > m || std::isnan(zr[c])) ? zr[c] : m;  // NaN wins, as in stock
    acc_t s = 0;
    for (int64_t c = 0; c < C; ++c) {
      const T e = std::exp(zr[c] - m);
      dr[c] = e;
      s += e;
    }
    total += static_cast<acc_t>(m) + std::log(s) - static_cast<acc_t>(zr[t]);
    const T scale = inv_n / static_cast<T>(s);
    for (int64_t c = 0; c < C; ++c) dr[c] *= scale;
    dr[t] -= inv_n;
  }
  return static_cast<T>(total / static_cast<acc_t>(counted));  // nothing counted: 0 / 0 = NaN, as stock
}

// (loss, dlogits); CUDA tensors go through ATen's log_softmax / nll_loss.
std::tuple<at::Tensor, at::Tensor> softmax_cross_entropy(const at::Tensor& logits, const at::Tensor& target) {
  const int64_t N = logits.size(0), C = logits.size(1);
  if (!logits.is_cpu()) {
    // No host sync (a CUDA graph can capture it): nll_loss checks target on the device and
    // skips kIgnoreIndex rows (its default ignore_index); their gradient rows are zeroed.
    const at::Tensor logp = at::log_softmax(logits, 1);
    const at::Tensor loss = at::nll_loss(logp, target, {}, at::Reduction::Mean, kIgnoreIndex);
    const at::Tensor counted = target.ne(kIgnoreIndex);
    const at::Tensor one_hot = at::zeros_like(logits).scatter_(1, target.clamp_min(0).unsqueeze(1), 1.0);
    return {loss, logp.exp().sub_(one_hot).mul_(counted.unsqueeze(1)).div_(counted.sum().clamp_min(1))};
  }
  at::Tensor loss = at::empty({}, logits.options());
  at::Tensor dz = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "ext_mlp_cross_entropy", [&] {
    *loss.mutable_data_ptr<scalar_t>() = softmax_cross_entropy_cpu<scalar_t>(
        logits.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), dz.mutable_data_ptr<scalar_t>(), N, C);
  });
  return {loss, dz};
}

// Whether t is a CPU scalar equal to 1, the gradient loss.backward() sends: dlogits is then
// the logits' gradient as it is (bitwise what * 1 gives), without a pass over it.  A CUDA value is not read: that would wait for the device.
bool is_cpu_one(const at::Tensor& t) {
  if (!t.is_cpu() || t.numel() != 1) return false;
  if (t.scalar_type() == at::kFloat) return *t.const_data_ptr<float>() == 1.0f;
  if (t.scalar_type() == at::kDouble) return *t.const_data_ptr<double>() == 1.0;
  return false;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> mlp_cross_entropy_fwd(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, const at::Tensor& target) {
  const size_t L = weights.size();
  TORCH_CHECK(L >= 1 && biases.size() == L, "lenet_fast ext: mlp_cross_entropy needs one bias per weight and at ",
              "least one layer, got ", L, " weights and ", biases.size(), " biases");
  TORCH_CHECK(x.dim() >= 2, "lenet_fast ext: mlp_cross_entropy expects x (N, K) or (N, *), got ", x.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x.size(0) && target.scalar_type() == at::kLong,
              "lenet_fast ext: target must be int64 of shape (", x.size(0), ",), got ", target.scalar_type(), " ",
              target.sizes());
  TORCH_CHECK(target.device() == x.device(), "lenet_fast ext: target is on ", target.device(), " but x is on ",
              x.device());
  std::vector<at::Tensor> hidden;
  hidden.reserve(L - 1);
  at::Tensor h = x.flatten(1);  // a view (x itself when 2-D): a conv stack's output goes in as it is
  for (size_t l = 0; l + 1 < L; ++l) {
    h = linear_fwd(h, weights[l], biases[l], /*relu=*/true);
    hidden.push_back(h);
  }
  at::Tensor logits = linear_fwd(h, weights[L - 1], biases[L - 1], /*relu=*/false);
  TORCH_CHECK(logits.size(1) >= 1, "lenet_fast ext: the last layer must have at least one output (class)");
  auto [loss, dlogits] = softmax_cross_entropy(logits, target.contiguous());
  return {loss, logits, dlogits, hidden};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_cross_entropy_bwd(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_logits,
    const at::Tensor& dlogits, const at::Tensor& logits, const at::Tensor& x, at::TensorList weights,
    at::TensorList hidden, bool input_grad, bool weight_grad) {
  const size_t L = weights.size();
  TORCH_CHECK(L >= 1 && hidden.size() + 1 == L, "lenet_fast ext: mlp_cross_entropy_backward needs L weights and ",
              "L - 1 hidden activations, got ", L, " and ", hidden.size());
  // d loss_total / d logits: the loss's share (dlogits is per unit of grad_loss) plus any
  // gradient that reached the logits output directly.
  at::Tensor g;
  if (grad_loss.has_value() && grad_loss->defined()) g = is_cpu_one(*grad_loss) ? dlogits : dlogits * *grad_loss;
  if (grad_logits.has_value() && grad_logits->defined()) g = g.defined() ? g + *grad_logits : *grad_logits;
  if (!g.defined()) g = at::zeros_like(dlogits);
  std::vector<at::Tensor> grad_w(L), grad_b(L);
  const at::Tensor x2 = x.flatten(1);
  for (size_t l = L; l-- > 0;) {
    const at::Tensor& in = l == 0 ? x2 : hidden[l - 1];
    const at::Tensor& out = l + 1 == L ? logits : hidden[l];
    const bool want_in = l > 0 || input_grad;
    auto [gx, gw, gb] = linear_bwd(g, out, in, weights[l], /*relu=*/l + 1 < L, want_in, weight_grad);
    grad_w[l] = gw;
    grad_b[l] = gb;
    g = gx;
  }
  if (input_grad && x.dim() != 2) g = g.view(x.sizes());  // gx of linear_bwd is contiguous
  return {g, grad_w, grad_b};
}

namespace {

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

}  // namespace

LENET_FAST_REGISTER_OP("mlp_cross_entropy", &mlp_cross_entropy_fwd, &mlp_cross_entropy_bwd, &mlp_cross_entropy_autograd)

}  // namespace lenet_fast
