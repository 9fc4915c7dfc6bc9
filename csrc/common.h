// Torch-facing helpers shared by the per-op .cpp files (not by the .cu files).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "index_math.h"

#ifdef LENET_FAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "conv_cuda.h"
#define LF_CUDA_STREAM() (c10::cuda::getCurrentCUDAStream().stream())
#endif

namespace lenet_fast {

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "lenet_fast ext: ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "lenet_fast ext: ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "lenet_fast ext: ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type());
}

// The CUDA branch of an op: fails clearly in a build without CUDA kernels.
inline void require_cuda_build(const at::Tensor& x) {
#ifndef LENET_FAST_WITH_CUDA
  TORCH_CHECK(!x.is_cuda(), "lenet_fast._C was built without CUDA kernels (no CUDA toolkit at build time)");
#else
  (void)x;
#endif
}

inline at::Tensor empty0(const at::Tensor& like) { return at::empty({0}, like.options()); }

// x (N, Cin, H, W), weight (Cout, Cin, 3, 3), bias (Cout,) or absent; returns contiguous copies.
struct ConvArgs {
  at::Tensor x, w, b;
  int64_t N, Cin, H, W, Cout, pad, Ho, Wo;
};

inline ConvArgs conv_args(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t pad) {
  TORCH_CHECK(x.dim() == 4, "lenet_fast ext: x must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 && w.size(1) == x.size(1),
              "lenet_fast ext: weight must be (C_out, ", x.size(1), ", 3, 3), got ", w.sizes());
  TORCH_CHECK(pad == 0 || pad == 1, "lenet_fast ext: padding must be 0 or 1, got ", pad);
  check_float(x, "x");
  check_same(x, w, "weight");
  ConvArgs a;
  a.x = x.contiguous();
  a.w = w.contiguous();
  if (b.has_value() && b->defined()) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), "lenet_fast ext: bias must be (", w.size(0), ",), got ",
                b->sizes());
    check_same(x, *b, "bias");
    a.b = b->contiguous();
  }
  a.N = x.size(0);
  a.Cin = x.size(1);
  a.H = x.size(2);
  a.W = x.size(3);
  a.Cout = w.size(0);
  a.pad = pad;
  a.Ho = conv3x3_out_size(a.H, pad);
  a.Wo = conv3x3_out_size(a.W, pad);
  TORCH_CHECK(a.Ho >= 1 && a.Wo >= 1, "lenet_fast ext: x ", x.sizes(), " with padding ", pad,
              " is smaller than the 3x3 kernel");
  return a;
}

template <typename T>
inline const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Gradient buffers of a conv backward: (grad_x, grad_w, grad_b), each empty when not wanted.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_grad_buffers(const ConvArgs& a, bool input_grad,
                                                                        bool weight_grad) {
  return {input_grad ? at::empty_like(a.x) : empty0(a.x), weight_grad ? at::empty_like(a.w) : empty0(a.x),
          weight_grad ? at::empty({a.Cout}, a.x.options()) : empty0(a.x)};
}

#ifdef LENET_FAST_WITH_CUDA
// Weight and bias gradients on CUDA, deterministically: `launch_partial(partial, nchunks)`
// writes one row of (Cout * (Cin*9 + 1)) partial sums per chunk of images; the rows are
// then summed in chunk order by one more kernel (no float atomics anywhere).
template <typename scalar_t, typename LaunchPartial>
void cuda_weight_grad(const ConvArgs& a, at::Tensor& gw, at::Tensor& gb, LaunchPartial launch_partial) {
  const int64_t nchunks = ceil_div(a.N, cuda::kBatchChunkCuda);
  at::Tensor partial = at::empty({std::max<int64_t>(nchunks, 1) * a.Cout * (a.Cin * 9 + 1)}, a.x.options());
  if (nchunks > 0) {
    launch_partial(partial.mutable_data_ptr<scalar_t>(), nchunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  cuda::launch_reduce_partials<scalar_t>(partial.const_data_ptr<scalar_t>(), nchunks, a.Cout, a.Cin,
                                         gw.mutable_data_ptr<scalar_t>(), gb.mutable_data_ptr<scalar_t>(),
                                         LF_CUDA_STREAM());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

}  // namespace lenet_fast
