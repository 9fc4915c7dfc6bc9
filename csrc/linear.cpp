// linear + bias (+ ReLU): torch-facing wrappers and CPU kernels, its C++ autograd and its
// registration as lenet_fast::ext_linear (and _backward; schemas: lenet_fast/ops.py,
// LINEAR).  The wrappers are in ops.h too: mlp_cross_entropy.cpp runs its layers on them.
// The GEMMs go to at::mm / at::addmm (MKL / cuBLAS).  Forward: bias + ReLU is one fused
// pass over the GEMM output (without ReLU the bias rides in the GEMM, as in stock addmm);
// on the CPU a layer with at most kNarrowOut outputs (LeNet's fc3) is one loop of our own
// instead, GEMM, bias and ReLU together (narrow_linear_cpu says why).
// Backward: the ReLU mask + bias gradient is one fused pass (deterministic sums); on the
// CPU the two GEMMs then run side by side, one per thread.
#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>

#include "autograd.h"
#include "common.h"
#include "cpu_vec.h"
#include "ops.h"

namespace lenet_fast {

#ifdef LENET_FAST_WITH_CUDA
// The epilogue launchers of linear_cuda.cu, for float and double; each launches one
// kernel, checked here with C10_CUDA_KERNEL_LAUNCH_CHECK().
namespace cuda {
// y[n][o] = relu?(y[n][o] + b[o]) in place; b may be null.
template <typename T>
void launch_bias_relu(T* y, const T* b, int64_t N, int64_t O, bool relu, cudaStream_t stream);
// gm[n][o] = relu_grad_passes(out) ? g : 0 (or g when !relu); gb[o] = sum_n gm[n][o] (fixed order); gb may be null.
template <typename T>
void launch_relu_mask_bias_grad(const T* g, const T* out, T* gm, T* gb, int64_t N, int64_t O, bool relu,
                                cudaStream_t stream);
}  // namespace cuda
#endif

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

// gm = g masked by ReLU's gradient (when do_relu) and gb = its column sums.  Rows go in
// fixed chunks of kRowChunk: each chunk masks its rows and sums them, in order, into its
// own partial row; the partials are then added in chunk order.  The chunking does not
// depend on the thread count, so neither do the bits.  The rows are walked once, inner loop
// along a row, not once per block of columns (several times faster: docs/measurements-behind-the-code.md).
template <typename T>
void relu_mask_bias_grad_cpu(const T* g, const T* out, T* gm, T* gb, int64_t N, int64_t O, bool do_relu) {
  constexpr int64_t kRowChunk = 64;
  const int64_t chunks = ceil_div(N, kRowChunk);
  if (chunks == 0) {
    std::fill(gb, gb + O, T(0));
    return;
  }
  std::vector<T> partial(chunks * O, T(0));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kRowChunk * O));
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* acc = partial.data() + c * O;
      for (int64_t n = c * kRowChunk; n < std::min(N, (c + 1) * kRowChunk); ++n) {
        const T* gr = g + n * O;
        if (do_relu) {
          const T* orow = out + n * O;
          T* mr = gm + n * O;
          LF_SIMD
          for (int64_t o = 0; o < O; ++o) {
            const T v = cpu::keep_if(gr[o], relu_grad_passes(orow[o]));
            mr[o] = v;
            acc[o] += v;
          }
        } else {
          LF_SIMD
          for (int64_t o = 0; o < O; ++o) acc[o] += gr[o];
        }
      }
    }
  });
  std::copy(partial.begin(), partial.begin() + O, gb);
  for (int64_t c = 1; c < chunks; ++c) {
    const T* p = partial.data() + c * O;
    LF_SIMD
    for (int64_t o = 0; o < O; ++o) gb[o] += p[o];
  }
}

// --- narrow layers: y = x . w^T + b (then ReLU) with all outputs of a row in registers --
// MKL runs this orientation of a narrow layer far below its usual rate (LeNet's fc3 forward
// against the same number of FMAs in fc3's input-gradient GEMM: docs/measurements-behind-the-code.md), and at
// batch 64 its fixed cost is most of the call.  Here w is transposed once into kNarrowOut zero-padded columns, and a
// block of R rows keeps R x kNarrowOut accumulators in registers while it walks k, one
// broadcast x value and one FMA per accumulator vector per step.  Sums run over k in order,
// then + bias, then ReLU; one thread owns each row, so the bits do not depend on threads.
constexpr int64_t kNarrowOut = 16;

template <typename T>
constexpr int narrow_rows() {
  return sizeof(T) == 4 ? 6 : 3;  // 12 of the 16 vector registers hold accumulators
}

template <typename T, int R>
inline void narrow_linear_rows(const T* x, const T* wt, const T* bias, T* y, int64_t K, int64_t O, bool do_relu) {
  constexpr int J = kNarrowOut;
  T acc[R][J];
  LF_UNROLL
  for (int r = 0; r < R; ++r) {
    LF_SIMD
    for (int j = 0; j < J; ++j) acc[r][j] = T(0);
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* wk = wt + k * J;
    LF_UNROLL
    for (int r = 0; r < R; ++r) {
      const T xv = x[r * K + k];
      LF_SIMD
      for (int j = 0; j < J; ++j) acc[r][j] += xv * wk[j];
    }
  }
  LF_UNROLL
  for (int r = 0; r < R; ++r) {
    for (int64_t o = 0; o < O; ++o) {
      const T v = acc[r][o] + bias[o];
      y[r * O + o] = do_relu ? relu(v) : v;
    }
  }
}

template <typename T>
void narrow_linear_cpu(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t K, int64_t O, bool do_relu) {
  constexpr int R = narrow_rows<T>();
  constexpr int J = kNarrowOut;
  std::vector<T> wt(K * J, T(0));
  for (int64_t o = 0; o < O; ++o)
    for (int64_t k = 0; k < K; ++k) wt[k * J + o] = w[o * K + k];
  T bias[J] = {};
  if (b != nullptr) std::copy(b, b + O, bias);
  // A block costs R * K * J lane-FMAs; below ~2^18 of them a second thread costs more to
  // wake than it saves (batch 64 of fc3 stays on one thread).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, R * K * J));
  at::parallel_for(0, ceil_div(N, int64_t{R}), grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * R;
      if (n0 + R <= N) {
        narrow_linear_rows<T, R>(x + n0 * K, wt.data(), bias, y + n0 * O, K, O, do_relu);
      } else {
        for (int64_t n = n0; n < N; ++n) narrow_linear_rows<T, 1>(x + n * K, wt.data(), bias, y + n * O, K, O, do_relu);
      }
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
  const int64_t N = x_.size(0), K = x_.size(1), O = w_.size(0);
  if (x_.is_cpu() && O <= kNarrowOut && N > 0) {
    const at::Tensor x = x_.contiguous(), w = w_.contiguous();
    const at::Tensor b = has_b ? b_->contiguous() : at::Tensor();
    at::Tensor y = at::empty({N, O}, x.options());
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "ext_linear_narrow", [&] {
      narrow_linear_cpu<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(b),
                                  y.mutable_data_ptr<scalar_t>(), N, K, O, do_relu);
    });
    return y;
  }
  if (has_b && !do_relu) return at::addmm(*b_, x_, w_.t());
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
  // each GEMM over both threads waits more than it computes (docs/measurements-behind-the-code.md).  Inside
  // the parallel region MKL runs serially; the bits are the same run after run for a given
  // thread count, but may differ between thread counts: they did at 1024x400x120 on a
  // many-core host, most likely
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

namespace {

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
    save_layer(ctx, x, w, out, b, relu);
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<decltype(linear_bwd)>("lenet_fast::ext_linear_backward");
    return layer_backward<bool>(op, ctx, grads);
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, bool relu) {
  return LinearFn::apply(x, w, b, relu);
}

}  // namespace

LENET_FAST_REGISTER_OP("linear", &linear_fwd, &linear_bwd, &linear_autograd)

}  // namespace lenet_fast
