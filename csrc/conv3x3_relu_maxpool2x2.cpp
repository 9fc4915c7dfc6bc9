// conv3x3 + bias + ReLU + max-pool 2x2 in one pass: torch-facing wrappers and CPU kernels,
// its C++ autograd and its registration as lenet_fast::ext_conv3x3_relu_maxpool2x2 (and
// _backward; schemas: lenet_fast/ops.py, CONV3X3_RELU_MAXPOOL2X2).  The wrappers are in
// ops.h too: the one-op training step (lenet_sgd_step.cpp) calls them directly.
//
// Forward writes only the pooled output and a uint8 winner code per pooled
// element (index_math.h: 0..3 = row-major position in the window, kPoolMasked
// when ReLU blocks the gradient); its conv runs on the engine of cpu_fused.h.
// Backward: the winners-only engine of cpu_fused.h where it applies (float,
// 1..8 input channels, finite x and w); otherwise it scatters the pooled
// gradient through the codes into a per-image (thread-local) dense conv-gradient
// tile and computes grad_input, grad_weight and grad_bias from it (cpu_conv.h).
#include "autograd.h"
#include "common.h"
#include "cpu_fused.h"
#include "ops.h"

namespace lenet_fast {

#ifdef LENET_FAST_WITH_CUDA
// The launchers of conv3x3_relu_maxpool2x2_cuda.cu (kernels in conv_kernels.cuh), for
// float and double; each launches one kernel, checked here with C10_CUDA_KERNEL_LAUNCH_CHECK().
namespace cuda {
// out/idx (N, Cout, Ho/2, Wo/2); idx holds the fused winner code (index_math.h).
template <typename T>
void launch_conv_relu_pool_fwd(const T* x, const T* w, const T* b, T* out, uint8_t* idx, const ConvDims& d,
                               cudaStream_t stream);
template <typename T>
void launch_conv_relu_pool_bwd_input(const T* g, const uint8_t* idx, const T* w, T* gx, const ConvDims& d,
                                     cudaStream_t stream);
// Weight/bias partial sums per batch chunk (conv_cuda.h), reduced by cuda_weight_grad.
template <typename T>
void launch_conv_relu_pool_bwd_weight_partial(const T* g, const uint8_t* idx, const T* x, T* partial,
                                              const ConvDims& d, int64_t nchunks, cudaStream_t stream);
}  // namespace cuda
#endif

std::tuple<at::Tensor, at::Tensor> conv3x3_relu_maxpool2x2_fwd(const at::Tensor& x_, const at::Tensor& w_,
                                                               const std::optional<at::Tensor>& b_, int64_t pad) {
  const ConvArgs a = conv_args(x_, w_, b_, pad);
  const int64_t Hp = pool2x2_out_size(a.Ho), Wp = pool2x2_out_size(a.Wo);
  TORCH_CHECK(Hp >= 1 && Wp >= 1, "lenet_fast ext: conv output ", a.Ho, "x", a.Wo, " is smaller than the 2x2 pool");
  at::Tensor out = at::empty({a.N, a.Cout, Hp, Wp}, a.x.options());
  at::Tensor idx = at::empty({a.N, a.Cout, Hp, Wp}, a.x.options().dtype(at::kByte));
  if (a.N == 0) return {out, idx};
  require_cuda_build(a.x);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "ext_conv3x3_relu_maxpool2x2", [&] {
    const scalar_t* b = ptr_or_null<scalar_t>(a.b);
#ifdef LENET_FAST_WITH_CUDA
    if (a.x.is_cuda()) {
      const c10::cuda::CUDAGuard guard(a.x.device());
      cuda::launch_conv_relu_pool_fwd<scalar_t>(a.x.const_data_ptr<scalar_t>(), a.w.const_data_ptr<scalar_t>(), b,
                                      out.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<uint8_t>(),
                                      {a.N, a.Cin, a.H, a.W, a.Cout, static_cast<int>(pad)}, LF_CUDA_STREAM());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
#endif
    cpu::fused_forward<scalar_t>(a.x.const_data_ptr<scalar_t>(), a.w.const_data_ptr<scalar_t>(), b,
                                 out.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<uint8_t>(),
                                 {a.N, a.Cin, a.Cout, a.H, a.W, pad});
  });
  return {out, idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv3x3_relu_maxpool2x2_bwd(const at::Tensor& g_, const at::Tensor& idx_,
                                                                           const at::Tensor& x_, const at::Tensor& w_,
                                                                           int64_t pad, bool input_grad,
                                                                           bool weight_grad) {
  const ConvArgs a = conv_args(x_, w_, std::nullopt, pad);
  const int64_t Hp = pool2x2_out_size(a.Ho), Wp = pool2x2_out_size(a.Wo);
  TORCH_CHECK(g_.sizes() == idx_.sizes() && g_.dim() == 4 && g_.size(0) == a.N && g_.size(1) == a.Cout &&
                  g_.size(2) == Hp && g_.size(3) == Wp,
              "lenet_fast ext: grad_out ", g_.sizes(), " / idx ", idx_.sizes(), " do not match the pooled output");
  TORCH_CHECK(idx_.scalar_type() == at::kByte, "lenet_fast ext: idx must be uint8");
  check_same(a.x, g_, "grad_out");
  const at::Tensor g = g_.contiguous();
  const at::Tensor idx = idx_.contiguous();
  auto [gx, gw, gb] = conv_grad_buffers(a, input_grad, weight_grad);
  require_cuda_build(a.x);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "ext_conv3x3_relu_maxpool2x2_backward", [&] {
#ifdef LENET_FAST_WITH_CUDA
    if (a.x.is_cuda()) {
      const c10::cuda::CUDAGuard guard(a.x.device());
      const cuda::ConvDims d{a.N, a.Cin, a.H, a.W, a.Cout, static_cast<int>(pad)};
      if (input_grad && a.N > 0) {
        cuda::launch_conv_relu_pool_bwd_input<scalar_t>(g.const_data_ptr<scalar_t>(), idx.const_data_ptr<uint8_t>(),
                                              a.w.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), d,
                                              LF_CUDA_STREAM());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (weight_grad) {
        cuda_weight_grad<scalar_t>(a, gw, gb, [&](scalar_t* partial, int64_t nchunks) {
          cuda::launch_conv_relu_pool_bwd_weight_partial<scalar_t>(g.const_data_ptr<scalar_t>(), idx.const_data_ptr<uint8_t>(),
                                                   a.x.const_data_ptr<scalar_t>(), partial, d, nchunks,
                                                   LF_CUDA_STREAM());
        });
      }
      return;
    }
#endif
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const uint8_t* ip = idx.const_data_ptr<uint8_t>();
    const cpu::ConvShape shape{a.N, a.Cin, a.Cout, a.H, a.W, pad};
    const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
    const scalar_t* wp = a.w.const_data_ptr<scalar_t>();
    // Winners only, unless a NaN/inf must reach the gradients through 0 * NaN
    // (cpu_fused.h): x feeds grad_weight, w feeds grad_input.
    if (cpu::fused_backward_winners_ok<scalar_t>(shape) && (!weight_grad || cpu::all_finite(xp, a.x.numel())) &&
        (!input_grad || cpu::all_finite(wp, a.w.numel()))) {
      cpu::fused_backward_winners<scalar_t>(xp, wp, gp, ip,
                                            input_grad ? gx.mutable_data_ptr<scalar_t>() : nullptr,
                                            weight_grad ? gw.mutable_data_ptr<scalar_t>() : nullptr,
                                            weight_grad ? gb.mutable_data_ptr<scalar_t>() : nullptr, shape);
      return;
    }
    // General path: densify the conv-output gradient, then the dense engine.
    const int64_t Cout = a.Cout;
    cpu::conv_backward<scalar_t>(
        xp, wp,
        input_grad ? gx.mutable_data_ptr<scalar_t>() : nullptr, weight_grad ? gw.mutable_data_ptr<scalar_t>() : nullptr,
        weight_grad ? gb.mutable_data_ptr<scalar_t>() : nullptr, {a.N, a.Cin, a.Cout, a.H, a.W, pad},
        [&](int64_t n, scalar_t* G, int64_t S, int64_t F, int64_t Q, scalar_t* gbias) {
          for (int64_t co = 0; co < Cout; ++co) {
            const int64_t base = (n * Cout + co) * Hp * Wp;
            const scalar_t* gc = gp + base;
            const uint8_t* ic = ip + base;
            scalar_t* Gc = G + co * Q + F;
            scalar_t bsum = scalar_t(0);
            for (int64_t py = 0; py < Hp; ++py) {
              scalar_t* row = Gc + 2 * py * S;
              for (int64_t px = 0; px < Wp; ++px) {
                // Branch-free: a masked window writes 0 at its first position.
                const int code = ic[py * Wp + px];
                const scalar_t v = code < kPoolMasked ? gc[py * Wp + px] : scalar_t(0);
                row[pool_code_dy(code & 3) * S + 2 * px + pool_code_dx(code & 3)] = v;
                bsum += v;
              }
            }
            gbias[co] = bsum;
          }
        });
  });
  return {gx, gw, gb};
}

namespace {

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
    save_layer(ctx, x, w, idx, b, pad);
    ctx->mark_non_differentiable({idx});
    return {out, idx};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle<decltype(conv3x3_relu_maxpool2x2_bwd)>("lenet_fast::ext_conv3x3_relu_maxpool2x2_backward");
    return layer_backward<int64_t>(op, ctx, grads);
  }
};

std::tuple<at::Tensor, at::Tensor> conv3x3_relu_maxpool2x2_autograd(const at::Tensor& x, const at::Tensor& w,
                                                                    const std::optional<at::Tensor>& b, int64_t pad) {
  auto r = ConvReluPoolFn::apply(x, w, b, pad);
  return {r[0], r[1]};
}

}  // namespace

LENET_FAST_REGISTER_OP("conv3x3_relu_maxpool2x2", &conv3x3_relu_maxpool2x2_fwd, &conv3x3_relu_maxpool2x2_bwd,
                       &conv3x3_relu_maxpool2x2_autograd)

}  // namespace lenet_fast
