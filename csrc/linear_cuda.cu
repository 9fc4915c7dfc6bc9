// CUDA epilogues of linear + bias (+ ReLU); the GEMMs are cuBLAS (at::mm, from linear.cpp).
#include <cuda_runtime.h>

#include "index_math.h"

namespace lenet_fast {
namespace cuda {

namespace {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t total, int threads) {
  const int64_t b = ceil_div(total, threads);
  constexpr int64_t kMax = int64_t(1) << 20;
  return static_cast<unsigned int>(b < 1 ? 1 : (b > kMax ? kMax : b));
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    bias_relu_kernel(T* __restrict__ y, const T* __restrict__ b, int64_t N, int64_t O, bool do_relu) {
  const int64_t total = N * O;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    T v = y[e];
    if (b != nullptr) v += b[e % O];
    y[e] = do_relu ? relu(v) : v;
  }
}

// One block per column o: mask the column, and sum it with a fixed-shape tree
// (each thread sums rows tid, tid + kThreads, ... in order): deterministic.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    relu_mask_bias_grad_kernel(const T* __restrict__ g, const T* __restrict__ out, T* __restrict__ gm,
                               T* __restrict__ gb, int64_t N, int64_t O, bool do_relu) {
  __shared__ T s_red[kThreads];
  for (int64_t o = blockIdx.x; o < O; o += gridDim.x) {
    T acc = T(0);
    for (int64_t n = threadIdx.x; n < N; n += kThreads) {
      const int64_t e = n * O + o;
      T v = g[e];
      if (do_relu) {
        v = relu_grad_passes(out[e]) ? v : T(0);
        gm[e] = v;
      }
      acc += v;
    }
    s_red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) s_red[threadIdx.x] += s_red[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0 && gb != nullptr) gb[o] = s_red[0];
    __syncthreads();
  }
}

}  // namespace

template <typename T>
void launch_bias_relu(T* y, const T* b, int64_t N, int64_t O, bool do_relu, cudaStream_t stream) {
  bias_relu_kernel<T><<<blocks_for(N * O, kThreads), kThreads, 0, stream>>>(y, b, N, O, do_relu);
}

template <typename T>
void launch_relu_mask_bias_grad(const T* g, const T* out, T* gm, T* gb, int64_t N, int64_t O, bool do_relu,
                                cudaStream_t stream) {
  const unsigned int blocks = static_cast<unsigned int>(O < 1 ? 1 : (O > (1 << 20) ? (1 << 20) : O));
  relu_mask_bias_grad_kernel<T><<<blocks, kThreads, 0, stream>>>(g, out, gm, gb, N, O, do_relu);
}

template void launch_bias_relu<float>(float*, const float*, int64_t, int64_t, bool, cudaStream_t);
template void launch_bias_relu<double>(double*, const double*, int64_t, int64_t, bool, cudaStream_t);
template void launch_relu_mask_bias_grad<float>(const float*, const float*, float*, float*, int64_t, int64_t, bool,
                                                cudaStream_t);
template void launch_relu_mask_bias_grad<double>(const double*, const double*, double*, double*, int64_t, int64_t,
                                                 bool, cudaStream_t);

}  // namespace cuda
}  // namespace lenet_fast
