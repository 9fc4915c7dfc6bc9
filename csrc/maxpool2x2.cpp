// max-pool 2x2 stride 2 floor mode: torch-facing wrappers and CPU kernels, its C++
// autograd and its registration as lenet_fast::ext_maxpool2x2 (and _backward; schemas:
// lenet_fast/ops.py, MAXPOOL2X2).
// Forward writes the pooled value and a uint8 winner code (0..3, row-major in
// the window; stock rules: first maximum wins ties, the last NaN wins).
// Backward is a gather: each input element takes the gradient of its window
// when it is the window's winner, else 0 (floor mode: dropped rows/cols get 0).
#include <algorithm>
#include <cstring>

#include <ATen/Parallel.h>

#include "autograd.h"
#include "common.h"
#include "cpu_conv.h"

namespace lenet_fast {

#ifdef LENET_FAST_WITH_CUDA
// The launchers of maxpool2x2_cuda.cu, for float and double; each launches one kernel,
// checked here with C10_CUDA_KERNEL_LAUNCH_CHECK().
namespace cuda {
template <typename T>
void launch_maxpool_fwd(const T* x, T* out, uint8_t* idx, int64_t planes, int64_t H, int64_t W, cudaStream_t stream);
template <typename T>
void launch_maxpool_bwd(const T* g, const uint8_t* idx, T* gx, int64_t planes, int64_t H, int64_t W,
                        cudaStream_t stream);
}  // namespace cuda
#endif

namespace {

template <typename T>
void maxpool_fwd_cpu(const T* x, T* out, uint8_t* idx, int64_t planes, int64_t H, int64_t W) {
  const int64_t Hp = pool2x2_out_size(H), Wp = pool2x2_out_size(W);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * W));
  at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const T* xp = x + p * H * W;
      T* op = out + p * Hp * Wp;
      uint8_t* ip = idx + p * Hp * Wp;
      for (int64_t py = 0; py < Hp; ++py)
        cpu::pool_row<T, false>(xp + 2 * py * W, xp + (2 * py + 1) * W, op + py * Wp, ip + py * Wp, Wp);
    }
  });
}

template <typename T>
void maxpool_bwd_cpu(const T* g, const uint8_t* idx, T* gx, int64_t planes, int64_t H, int64_t W) {
  const int64_t Hp = pool2x2_out_size(H), Wp = pool2x2_out_size(W);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * W));
  at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const T* gp = g + p * Hp * Wp;
      const uint8_t* ip = idx + p * Hp * Wp;
      T* xp = gx + p * H * W;
      std::memset(xp, 0, sizeof(T) * H * W);
      for (int64_t py = 0; py < Hp; ++py) {
        for (int64_t px = 0; px < Wp; ++px) {
          const int code = ip[py * Wp + px];
          xp[(2 * py + pool_code_dy(code)) * W + 2 * px + pool_code_dx(code)] = gp[py * Wp + px];
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> maxpool2x2_fwd(const at::Tensor& x_) {
  TORCH_CHECK(x_.dim() == 4, "lenet_fast ext: x must be 4-D (N, C, H, W), got ", x_.sizes());
  check_float(x_, "x");
  const at::Tensor x = x_.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Hp = pool2x2_out_size(H), Wp = pool2x2_out_size(W);
  at::Tensor out = at::empty({N, C, Hp, Wp}, x.options());
  at::Tensor idx = at::empty({N, C, Hp, Wp}, x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, idx};
  require_cuda_build(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ext_maxpool2x2", [&] {
#ifdef LENET_FAST_WITH_CUDA
    if (x.is_cuda()) {
      const c10::cuda::CUDAGuard guard(x.device());
      cuda::launch_maxpool_fwd<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                         idx.mutable_data_ptr<uint8_t>(), N * C, H, W, LF_CUDA_STREAM());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
#endif
    maxpool_fwd_cpu<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                              idx.mutable_data_ptr<uint8_t>(), N * C, H, W);
  });
  return {out, idx};
}

at::Tensor maxpool2x2_bwd(const at::Tensor& g_, const at::Tensor& idx_, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "lenet_fast ext: x must be 4-D (N, C, H, W), got ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(g_.dim() == 4 && g_.sizes() == idx_.sizes() && g_.size(0) == N && g_.size(1) == C &&
                  g_.size(2) == pool2x2_out_size(H) && g_.size(3) == pool2x2_out_size(W),
              "lenet_fast ext: grad_out ", g_.sizes(), " / idx ", idx_.sizes(), " do not match x ", x.sizes());
  TORCH_CHECK(idx_.scalar_type() == at::kByte, "lenet_fast ext: idx must be uint8");
  check_float(g_, "grad_out");
  check_same(g_, x, "x");
  const at::Tensor g = g_.contiguous();
  const at::Tensor idx = idx_.contiguous();
  at::Tensor gx = at::empty({N, C, H, W}, g.options());
  if (gx.numel() == 0) return gx;
  require_cuda_build(g);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "ext_maxpool2x2_backward", [&] {
#ifdef LENET_FAST_WITH_CUDA
    if (g.is_cuda()) {
      const c10::cuda::CUDAGuard guard(g.device());
      cuda::launch_maxpool_bwd<scalar_t>(g.const_data_ptr<scalar_t>(), idx.const_data_ptr<uint8_t>(),
                                         gx.mutable_data_ptr<scalar_t>(), N * C, H, W, LF_CUDA_STREAM());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
#endif
    maxpool_bwd_cpu<scalar_t>(g.const_data_ptr<scalar_t>(), idx.const_data_ptr<uint8_t>(),
                              gx.mutable_data_ptr<scalar_t>(), N * C, H, W);
  });
  return gx;
}

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

}  // namespace

LENET_FAST_REGISTER_OP("maxpool2x2", &maxpool2x2_fwd, &maxpool2x2_bwd, &maxpool2x2_autograd)

}  // namespace lenet_fast
