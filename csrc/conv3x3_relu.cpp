// conv3x3 + bias + ReLU (stride 1, padding 0 or 1): torch-facing wrappers and CPU kernels,
// its C++ autograd and its registration as lenet_fast::ext_conv3x3_relu (and _backward;
// schemas: lenet_fast/ops.py, CONV3X3_RELU).
// The conv engine is shared with the fused op (cpu_conv.h); only the epilogue
// (ReLU, write the activation) and the backward's gradient fill (ReLU mask
// from the saved output) differ.
#include "autograd.h"
#include "common.h"
#include "cpu_conv.h"

namespace lenet_fast {

#ifdef LENET_FAST_WITH_CUDA
// The launchers of conv3x3_relu_cuda.cu (kernels in conv_kernels.cuh), for float and
// double; each launches one kernel, checked here with C10_CUDA_KERNEL_LAUNCH_CHECK().
namespace cuda {
// out (N, Cout, Ho, Wo) = relu(conv(x, w) + b); b may be null.
template <typename T>
void launch_conv_relu_fwd(const T* x, const T* w, const T* b, T* out, const ConvDims& d, cudaStream_t stream);
// grad wrt x (gather form, no atomics); the conv-output gradient is g masked by relu_out.
template <typename T>
void launch_conv_relu_bwd_input(const T* g, const T* relu_out, const T* w, T* gx, const ConvDims& d,
                                cudaStream_t stream);
// Weight/bias partial sums per batch chunk (conv_cuda.h), reduced by cuda_weight_grad.
template <typename T>
void launch_conv_relu_bwd_weight_partial(const T* g, const T* relu_out, const T* x, T* partial, const ConvDims& d,
                                         int64_t nchunks, cudaStream_t stream);
}  // namespace cuda
#endif

namespace {

at::Tensor conv3x3_relu_fwd(const at::Tensor& x_, const at::Tensor& w_, const std::optional<at::Tensor>& b_,
                            int64_t pad) {
  const ConvArgs a = conv_args(x_, w_, b_, pad);
  at::Tensor out = at::empty({a.N, a.Cout, a.Ho, a.Wo}, a.x.options());
  if (a.N == 0) return out;
  require_cuda_build(a.x);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "ext_conv3x3_relu", [&] {
    const scalar_t* b = ptr_or_null<scalar_t>(a.b);
#ifdef LENET_FAST_WITH_CUDA
    if (a.x.is_cuda()) {
      const c10::cuda::CUDAGuard guard(a.x.device());
      cuda::launch_conv_relu_fwd<scalar_t>(a.x.const_data_ptr<scalar_t>(), a.w.const_data_ptr<scalar_t>(), b,
                                      out.mutable_data_ptr<scalar_t>(),
                                      {a.N, a.Cin, a.H, a.W, a.Cout, static_cast<int>(pad)}, LF_CUDA_STREAM());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
#endif
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t Cout = a.Cout, Ho = a.Ho, Wo = a.Wo;
    cpu::conv_forward<scalar_t>(a.x.const_data_ptr<scalar_t>(), a.w.const_data_ptr<scalar_t>(), b,
                                {a.N, a.Cin, a.Cout, a.H, a.W, pad},
                                [&](int64_t n, int64_t co0, int64_t nc, scalar_t* ob, int64_t M, int64_t S) {
                                  for (int64_t c = 0; c < nc; ++c) {
                                    scalar_t* oc = o + (n * Cout + co0 + c) * Ho * Wo;
                                    const scalar_t* p = ob + c * M;
                                    for (int64_t y = 0; y < Ho; ++y)
                                      for (int64_t xx = 0; xx < Wo; ++xx) oc[y * Wo + xx] = relu(p[y * S + xx]);
                                  }
                                });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv3x3_relu_bwd(const at::Tensor& g_, const at::Tensor& out_,
                                                                const at::Tensor& x_, const at::Tensor& w_, int64_t pad,
                                                                bool input_grad, bool weight_grad) {
  const ConvArgs a = conv_args(x_, w_, std::nullopt, pad);
  TORCH_CHECK(g_.sizes() == out_.sizes() && g_.dim() == 4 && g_.size(0) == a.N && g_.size(1) == a.Cout &&
                  g_.size(2) == a.Ho && g_.size(3) == a.Wo,
              "lenet_fast ext: grad_out ", g_.sizes(), " / out ", out_.sizes(), " do not match the conv output");
  check_same(a.x, g_, "grad_out");
  check_same(a.x, out_, "out");
  const at::Tensor g = g_.contiguous();
  const at::Tensor out = out_.contiguous();
  auto [gx, gw, gb] = conv_grad_buffers(a, input_grad, weight_grad);
  require_cuda_build(a.x);
  AT_DISPATCH_FLOATING_TYPES(a.x.scalar_type(), "ext_conv3x3_relu_backward", [&] {
#ifdef LENET_FAST_WITH_CUDA
    if (a.x.is_cuda()) {
      const c10::cuda::CUDAGuard guard(a.x.device());
      const cuda::ConvDims d{a.N, a.Cin, a.H, a.W, a.Cout, static_cast<int>(pad)};
      if (input_grad && a.N > 0) {
        cuda::launch_conv_relu_bwd_input<scalar_t>(g.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                                              a.w.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), d,
                                              LF_CUDA_STREAM());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (weight_grad) {
        cuda_weight_grad<scalar_t>(a, gw, gb, [&](scalar_t* partial, int64_t nchunks) {
          cuda::launch_conv_relu_bwd_weight_partial<scalar_t>(g.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                                                   a.x.const_data_ptr<scalar_t>(), partial, d, nchunks,
                                                   LF_CUDA_STREAM());
        });
      }
      return;
    }
#endif
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* op = out.const_data_ptr<scalar_t>();
    const int64_t Cout = a.Cout, Ho = a.Ho, Wo = a.Wo;
    cpu::conv_backward<scalar_t>(
        a.x.const_data_ptr<scalar_t>(), a.w.const_data_ptr<scalar_t>(),
        input_grad ? gx.mutable_data_ptr<scalar_t>() : nullptr, weight_grad ? gw.mutable_data_ptr<scalar_t>() : nullptr,
        weight_grad ? gb.mutable_data_ptr<scalar_t>() : nullptr, {a.N, a.Cin, a.Cout, a.H, a.W, pad},
        [&](int64_t n, scalar_t* G, int64_t S, int64_t F, int64_t Q, scalar_t* gbias) {
          for (int64_t co = 0; co < Cout; ++co) {
            const int64_t base = (n * Cout + co) * Ho * Wo;
            const scalar_t* gc = gp + base;
            const scalar_t* oc = op + base;
            scalar_t* Gc = G + co * Q + F;
            for (int64_t y = 0; y < Ho; ++y) {
              for (int64_t xx = 0; xx < Wo; ++xx)
                Gc[y * S + xx] = cpu::keep_if(gc[y * Wo + xx], relu_grad_passes(oc[y * Wo + xx]));
            }
            gbias[co] = cpu::lane_sum(Gc, Ho * S);  // the columns x >= Wo of G stay zero
          }
        });
  });
  return {gx, gw, gb};
}

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
    save_layer(ctx, x, w, out, b, pad);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<decltype(conv3x3_relu_bwd)>("lenet_fast::ext_conv3x3_relu_backward");
    return layer_backward<int64_t>(op, ctx, grads);
  }
};

at::Tensor conv3x3_relu_autograd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                                 int64_t pad) {
  return ConvReluFn::apply(x, w, b, pad);
}

}  // namespace

LENET_FAST_REGISTER_OP("conv3x3_relu", &conv3x3_relu_fwd, &conv3x3_relu_bwd, &conv3x3_relu_autograd)

}  // namespace lenet_fast
