// Index arithmetic and the pooling/ReLU rules shared by the CPU (C++) and the
// CUDA kernels.  Everything here is `__host__ __device__` under nvcc and plain
// inline C++ otherwise, so the CPU tests exercise the very code the GPU runs.
//
// Conventions (NCHW, 3x3 kernel, stride 1, padding 0 or 1, 2x2 max-pool stride 2 floor mode):
//   conv output  Ho = H + 2*pad - 2, Wo = W + 2*pad - 2
//   pool output  Hp = Ho / 2,        Wp = Wo / 2
//   conv output (oy, ox) reads input (oy + ky - pad, ox + kx - pad), ky, kx in [0, 3)
//   a pool window's winner is stored as a code 0..3 = dy * 2 + dx (row-major);
//   the fused conv+ReLU+pool op stores kPoolMasked when ReLU blocks the gradient.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LF_HD __host__ __device__ __forceinline__
#else
#define LF_HD inline
#endif

namespace lenet_fast {

constexpr int kPoolMasked = 4;

LF_HD int64_t conv3x3_out_size(int64_t in, int64_t pad) { return in + 2 * pad - 2; }
LF_HD int64_t pool2x2_out_size(int64_t in) { return in / 2; }

// Offset of element (n, c, y, x) of a contiguous NCHW tensor (int64: sizes may pass 2^31).
LF_HD int64_t nchw_offset(int64_t n, int64_t c, int64_t y, int64_t x, int64_t C, int64_t H, int64_t W) {
  return ((n * C + c) * H + y) * W + x;
}

// Input coordinate read by conv output coordinate `o` through kernel tap `k`.
LF_HD int64_t conv_in_coord(int64_t o, int k, int64_t pad) { return o + k - pad; }
// Conv output coordinate that reads input coordinate `i` through tap `k` (may be out of range).
LF_HD int64_t conv_out_coord(int64_t i, int k, int64_t pad) { return i - k + pad; }

LF_HD int pool_code(int dy, int dx) { return dy * 2 + dx; }
LF_HD int pool_code_dy(int code) { return code >> 1; }
LF_HD int pool_code_dx(int code) { return code & 1; }

// Winner code that pool window (py, px) routes the gradient of conv/input element
// (y, x) through, or -1 when (y, x) lies in no window (floor mode drops the last
// row/column of an odd size).
LF_HD int pool_code_of(int64_t y, int64_t x, int64_t Hp, int64_t Wp) {
  return ((y >> 1) < Hp && (x >> 1) < Wp) ? pool_code(static_cast<int>(y & 1), static_cast<int>(x & 1)) : -1;
}

// Stock ReLU: relu(v) = v < 0 ? 0 : v (NaN and -0.0 pass through unchanged).
template <typename T>
LF_HD T relu(T v) {
  return v < T(0) ? T(0) : v;
}

// Stock ReLU backward (threshold_backward): the gradient passes unless out <= 0,
// so it passes for NaN.
template <typename T>
LF_HD bool relu_grad_passes(T out) {
  return !(out <= T(0));
}

// Stock max_pool2d's update rule, scanning the window in row-major order:
// a value replaces the current best when it is greater or NaN.  Hence the first
// maximum wins ties and the LAST NaN of a window wins (and propagates).
template <typename T>
LF_HD bool pool_takes(T v, T best) {
  return (v > best) | (v != v);  // no short-circuit: branch-free, vectorisable
}

// Max over one 2x2 window given in row-major order: the value and the winner
// code.  I is the code's integer type (the CPU uses one as wide as T so loops
// over windows vectorise in a single lane width).
template <typename T, typename I = int>
struct PoolResult {
  T best;
  I code;
};

template <typename T, typename I = int>
LF_HD PoolResult<T, I> pool4(T v0, T v1, T v2, T v3) {
  // Selects only (no branches), so CPU loops over windows vectorise.
  PoolResult<T, I> r{v0, I(0)};
  bool take = pool_takes(v1, r.best);
  r.best = take ? v1 : r.best;
  r.code = take ? I(1) : r.code;
  take = pool_takes(v2, r.best);
  r.best = take ? v2 : r.best;
  r.code = take ? I(2) : r.code;
  take = pool_takes(v3, r.best);
  r.best = take ? v3 : r.best;
  r.code = take ? I(3) : r.code;
  return r;
}

// Code stored by the fused op: the winner, or kPoolMasked when ReLU blocks the gradient.
template <typename T, typename I = int>
LF_HD I fused_code(I winner, T pooled) {
  return relu_grad_passes(pooled) ? winner : I(kPoolMasked);
}

LF_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
LF_HD int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Fixed batch chunking used for deterministic weight-gradient reductions: the
// partial sums of chunk k cover images [k * kBatchChunk, (k + 1) * kBatchChunk)
// and are added in chunk order, whatever the number of threads.
constexpr int64_t kBatchChunk = 4;

}  // namespace lenet_fast
