// linear + bias (+ ReLU): torch-facing wrappers and CPU kernels.
// The GEMMs go to at::mm / at::addmm (MKL / cuBLAS).  Forward: bias + ReLU is one fused
// pass over the GEMM output (without ReLU the bias rides in the GEMM, as in stock addmm).
// Backward: the ReLU mask + bias gradient is one fused pass (column sums in row order:
// deterministic); on the CPU the two GEMMs then run side by side, one per thread.
#include <algorithm>

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>

#include "common.h"
#include "ops.h"

namespace lenet_fast {

namespace {

template <typename T>
void bias_relu_cpu(T* y, const T* b, int64_t N, int64_t O, bool do_relu) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, O));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      T* row = y + n * O;
      if (b != nullptr && do_relu) {
        for (int64_t o = 0; o < O; ++o) row[o] = relu(row[o] + b[o]);
      } else if (b != nullptr) {
        for (int64_t o = 0; o < O; ++o) row[o] = row[o] + b[o];
      } else {
        for (int64_t o = 0; o < O; ++o) row[o] = relu(row[o]);
      }
    }
  });
}

// Columns [o0, o1) of gm = mask(g) and gb = column sums, rows in order.
template <typename T>
void relu_mask_bias_grad_cpu(const T* g, const T* out, T* gm, T* gb, int64_t N, int64_t O, bool do_relu) {
  constexpr int64_t kCols = 32;
  const int64_t nblocks = ceil_div(O, kCols);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, N * kCols));
  at::parallel_for(0, nblocks, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t o0 = k * kCols, o1 = std::min(O, o0 + kCols);
      T acc[kCols];
      for (int64_t o = 0; o < kCols; ++o) acc[o] = T(0);
      for (int64_t n = 0; n < N; ++n) {
        const T* gr = g + n * O;
        const T* orow = out + n * O;
        T* mr = gm + n * O;
        if (do_relu) {
          for (int64_t o = o0; o < o1; ++o) {
            const T v = relu_grad_passes(orow[o]) ? gr[o] : T(0);
            mr[o] = v;
            acc[o - o0] += v;
          }
        } else {
          for (int64_t o = o0; o < o1; ++o) acc[o - o0] += gr[o];
        }
      }
      for (int64_t o = o0; o < o1; ++o) gb[o] = acc[o - o0];
    }
  });
}

}  // namespace

at::Tensor linear_fwd(const at::Tensor& x_, const at::Tensor& w_, const std::optional<at::Tensor>& b_, bool do_relu) {
  TORCH_CHECK(x_.dim() == 2 && w_.dim() == 2 && x_.size(1) == w_.size(1), "lenet_fast ext: linear expects x (N, K) and ",
              "weight (O, K), got ", x_.sizes(), " and ", w_.sizes());
  check_float(x_, "x");
  check_same(x_, w_, "weight");
  const bool has_b = b_.has_value() && b_->defined();
  if (has_b) {
    TORCH_CHECK(b_->dim() == 1 && b_->size(0) == w_.size(0), "lenet_fast ext: bias must be (", w_.size(0), ",), got ",
                b_->sizes());
    check_same(x_, *b_, "bias");
  }
  if (has_b && !do_relu) return at::addmm(*b_, x_, w_.t());
  const int64_t N = x_.size(0), O = w_.size(0);
  at::Tensor y = at::mm(x_, w_.t());
  if (N == 0 || O == 0 || (!has_b && !do_relu)) return y;
  const at::Tensor b = has_b ? b_->contiguous() : at::Tensor();
  require_cuda_build(y);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "ext_linear", [&] {
#ifdef LENET_FAST_WITH_CUDA
    if (y.is_cuda()) {
      const c10::cuda::CUDAGuard guard(y.device());
      cuda::launch_bias_relu<scalar_t>(y.mutable_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(b), N, O, do_relu,
                                       LF_CUDA_STREAM());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
#endif
    bias_relu_cpu<scalar_t>(y.mutable_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(b), N, O, do_relu);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd(const at::Tensor& g_, const at::Tensor& out_,
                                                          const at::Tensor& x, const at::Tensor& w, bool do_relu,
                                                          bool input_grad, bool weight_grad) {
  TORCH_CHECK(g_.dim() == 2 && g_.sizes() == out_.sizes() && g_.size(0) == x.size(0) && g_.size(1) == w.size(0),
              "lenet_fast ext: grad_out ", g_.sizes(), " / out ", out_.sizes(), " do not match x ", x.sizes(),
              " and weight ", w.sizes());
  check_float(g_, "grad_out");
  check_same(x, g_, "grad_out");
  check_same(x, w, "weight");
  const int64_t N = g_.size(0), O = g_.size(1);
  const at::Tensor g = g_.contiguous();
  at::Tensor gm = g;
  at::Tensor gb = weight_grad ? at::empty({O}, g.options()) : empty0(g);
  if (do_relu || weight_grad) {
    const at::Tensor out = out_.contiguous();
    if (do_relu) gm = at::empty_like(g);
    if (!weight_grad) gb = at::empty({O}, g.options());  // scratch: the fused pass always sums
    require_cuda_build(g);
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "ext_linear_backward", [&] {
#ifdef LENET_FAST_WITH_CUDA
      if (g.is_cuda()) {
        const c10::cuda::CUDAGuard guard(g.device());
        cuda::launch_relu_mask_bias_grad<scalar_t>(g.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                                                   gm.mutable_data_ptr<scalar_t>(), gb.mutable_data_ptr<scalar_t>(), N,
                                                   O, do_relu, LF_CUDA_STREAM());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
#endif
      relu_mask_bias_grad_cpu<scalar_t>(g.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
                                        gm.mutable_data_ptr<scalar_t>(), gb.mutable_data_ptr<scalar_t>(), N, O, do_relu);
    });
    if (!weight_grad) gb = empty0(g);
  }
  // Both GEMMs at once, one per thread: for layers as small as LeNet's, MKL splitting
  // each GEMM over both threads waits more than it computes (interleaved A/B, 2-core
  // EPYC, batch 64: a training step 2-5% faster).  Inside the parallel region MKL runs
  // serially; the bits are the same run after run for a given thread count, but may differ
  // between thread counts: they did at 1024x400x120 on a 16-core GPU host, most likely
  // MKL splitting a GEMM's reduction for the global thread count (torch turns MKL's
  // dynamic threading off).
  if (input_grad && weight_grad && g.is_cpu() && at::get_num_threads() > 1) {
    at::Tensor gx = at::empty({N, w.size(1)}, g.options());
    at::Tensor gw = at::empty({O, x.size(1)}, g.options());
    at::parallel_for(0, 2, 1, [&](int64_t i0, int64_t i1) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // a kernel: no graph to record
      for (int64_t i = i0; i < i1; ++i) {
        if (i == 0) at::mm_out(gx, gm, w);
        else at::mm_out(gw, gm.t(), x);
      }
    });
    return {gx, gw, gb};
  }
  at::Tensor gx = input_grad ? at::mm(gm, w) : empty0(g);
  at::Tensor gw = weight_grad ? at::mm(gm.t(), x) : empty0(g);
  return {gx, gw, gb};
}

}  // namespace lenet_fast
