// How the CPU kernels get vectorised, shared by cpu_conv.h, cpu_fused.h and linear.cpp.
//
// Vectorisation is left to the compiler: the innermost loop of every hot kernel
// runs over the lanes of a strip and is marked `omp simd` (compiled with
// -fopenmp); the small fixed loops around it are fully unrolled so the
// accumulators live in registers.  The one exception is an 8 x 8 transpose
// (cpu_fused.h, channels-last <-> NCHW), which GCC does not derive from loops;
// it has a plain-loop fallback.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#define LF_UNROLL _Pragma("GCC unroll 16")
#define LF_SIMD _Pragma("omp simd")

namespace lenet_fast {
namespace cpu {

template <typename T>
struct Lanes {
  static constexpr int L = 64 / static_cast<int>(sizeof(T));   // strip width: two 256-bit registers
  static constexpr int L1 = 32 / static_cast<int>(sizeof(T));  // one 256-bit register
};

// v if keep, else +0, without a branch: a bit mask on the value.  GCC turns
// `keep ? v : 0` in a loop's scalar remainder (or in a loop it does not vectorise) into
// a branch on data, which mispredicts on about half of a ReLU's gradients.
template <typename T>
inline T keep_if(T v, bool keep) {
  using U = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  U bits;
  std::memcpy(&bits, &v, sizeof(T));
  bits &= U(0) - static_cast<U>(keep);
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// Sum of p[0, n) in a fixed order: one partial per lane of a register, the partials
// added lane by lane, then the leftovers.  One scalar chain instead would wait on each
// add's latency: it was half the time of conv3x3_relu's backward at conv2's shape.
template <typename T>
inline T lane_sum(const T* p, int64_t n) {
  constexpr int V = Lanes<T>::L1;
  T acc[V] = {};
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    LF_SIMD
    for (int l = 0; l < V; ++l) acc[l] += p[i + l];
  }
  T sum = T(0);
  for (int l = 0; l < V; ++l) sum += acc[l];
  for (; i < n; ++i) sum += p[i];
  return sum;
}

}  // namespace cpu
}  // namespace lenet_fast
