// How the CPU kernels get vectorised, shared by cpu_conv.h, cpu_fused.h and linear.cpp.
//
// Vectorisation is left to the compiler: the innermost loop of every hot kernel
// runs over the lanes of a strip and is marked `omp simd` (compiled with
// -fopenmp); the small fixed loops around it are fully unrolled so the
// accumulators live in registers.  The one exception is an 8 x 8 transpose
// (cpu_fused.h, channels-last <-> NCHW), which GCC does not derive from loops;
// it has a plain-loop fallback.
#pragma once

#define LF_UNROLL _Pragma("GCC unroll 16")
#define LF_SIMD _Pragma("omp simd")

namespace lenet_fast {
namespace cpu {

template <typename T>
struct Lanes {
  static constexpr int L = 64 / static_cast<int>(sizeof(T));   // strip width: two 256-bit registers
  static constexpr int L1 = 32 / static_cast<int>(sizeof(T));  // one 256-bit register
};

}  // namespace cpu
}  // namespace lenet_fast
