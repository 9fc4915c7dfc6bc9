// CUDA kernels of max-pool 2x2 stride 2 floor mode (rules in index_math.h).
#include <cuda_runtime.h>

#include "index_math.h"

namespace lenet_fast {
namespace cuda {

namespace {

inline unsigned int blocks_for(int64_t total, int threads) {
  const int64_t b = ceil_div(total, threads);
  constexpr int64_t kMax = int64_t(1) << 20;
  return static_cast<unsigned int>(b < 1 ? 1 : (b > kMax ? kMax : b));
}

template <typename T>
__global__ void __launch_bounds__(256, 1) maxpool_fwd_kernel(const T* __restrict__ x, T* __restrict__ out,
                                                          uint8_t* __restrict__ idx, int64_t planes, int64_t H,
                                                          int64_t W) {
  const int64_t Hp = pool2x2_out_size(H), Wp = pool2x2_out_size(W), total = planes * Hp * Wp;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t px = e % Wp, py = (e / Wp) % Hp, p = e / (Wp * Hp);
    const T* r0 = x + (p * H + 2 * py) * W + 2 * px;
    const PoolResult<T> r = pool4(r0[0], r0[1], r0[W], r0[W + 1]);
    out[e] = r.best;
    idx[e] = static_cast<uint8_t>(r.code);
  }
}

// Gather: each input element takes its window's gradient when it is the winner.
template <typename T>
__global__ void __launch_bounds__(256, 1) maxpool_bwd_kernel(const T* __restrict__ g, const uint8_t* __restrict__ idx,
                                                          T* __restrict__ gx, int64_t planes, int64_t H, int64_t W) {
  const int64_t Hp = pool2x2_out_size(H), Wp = pool2x2_out_size(W), total = planes * H * W;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = e % W, y = (e / W) % H, p = e / (W * H);
    const int code = pool_code_of(y, x, Hp, Wp);
    T v = T(0);
    if (code >= 0) {
      const int64_t o = (p * Hp + (y >> 1)) * Wp + (x >> 1);
      if (static_cast<int>(idx[o]) == code) v = g[o];
    }
    gx[e] = v;
  }
}

}  // namespace

template <typename T>
void launch_maxpool_fwd(const T* x, T* out, uint8_t* idx, int64_t planes, int64_t H, int64_t W, cudaStream_t stream) {
  const int64_t total = planes * pool2x2_out_size(H) * pool2x2_out_size(W);
  maxpool_fwd_kernel<T><<<blocks_for(total, 256), 256, 0, stream>>>(x, out, idx, planes, H, W);
}

template <typename T>
void launch_maxpool_bwd(const T* g, const uint8_t* idx, T* gx, int64_t planes, int64_t H, int64_t W,
                        cudaStream_t stream) {
  maxpool_bwd_kernel<T><<<blocks_for(planes * H * W, 256), 256, 0, stream>>>(g, idx, gx, planes, H, W);
}

template void launch_maxpool_fwd<float>(const float*, float*, uint8_t*, int64_t, int64_t, int64_t, cudaStream_t);
template void launch_maxpool_fwd<double>(const double*, double*, uint8_t*, int64_t, int64_t, int64_t, cudaStream_t);
template void launch_maxpool_bwd<float>(const float*, const uint8_t*, float*, int64_t, int64_t, int64_t, cudaStream_t);
template void launch_maxpool_bwd<double>(const double*, const uint8_t*, double*, int64_t, int64_t, int64_t,
                                         cudaStream_t);

}  // namespace cuda
}  // namespace lenet_fast
