// CUDA launchers of the fused conv3x3 + bias + ReLU + max-pool 2x2 (kernels in
// conv_kernels.cuh, POOL = true) and the deterministic chunk-order reduction of
// the weight-gradient partials (used by both conv ops).
#include "conv_kernels.cuh"

namespace lenet_fast {
namespace cuda {

namespace {

template <typename T>
__global__ void __launch_bounds__(256, 1)
    reduce_partials_kernel(const T* __restrict__ partial, int64_t nchunks, int64_t Cout, int64_t Cin,
                           T* __restrict__ gw, T* __restrict__ gb) {
  const int64_t per_co = Cin * 9 + 1, total = Cout * per_co;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < total; k += int64_t(gridDim.x) * blockDim.x) {
    T s = T(0);
    for (int64_t c = 0; c < nchunks; ++c) s += partial[c * total + k];  // fixed chunk order
    const int64_t co = k / per_co, j = k % per_co;
    if (j < Cin * 9)
      gw[co * Cin * 9 + j] = s;
    else
      gb[co] = s;
  }
}

}  // namespace

template <typename T>
void launch_conv_relu_pool_fwd(const T* x, const T* w, const T* b, T* out, uint8_t* idx, const ConvDims& d,
                               cudaStream_t stream) {
  detail::conv_fwd<T, true>(x, w, b, out, idx, d, stream);
}

template <typename T>
void launch_conv_relu_pool_bwd_input(const T* g, const uint8_t* idx, const T* w, T* gx, const ConvDims& d,
                                     cudaStream_t stream) {
  detail::conv_bwd_input<T, true>(g, nullptr, idx, w, gx, d, stream);
}

template <typename T>
void launch_conv_relu_pool_bwd_weight_partial(const T* g, const uint8_t* idx, const T* x, T* partial,
                                              const ConvDims& d, int64_t nchunks, cudaStream_t stream) {
  detail::conv_bwd_weight_partial<T, true>(g, nullptr, idx, x, partial, d, nchunks, stream);
}

template <typename T>
void launch_reduce_partials(const T* partial, int64_t nchunks, int64_t Cout, int64_t Cin, T* gw, T* gb,
                            cudaStream_t stream) {
  reduce_partials_kernel<T><<<detail::grid_for(Cout * (Cin * 9 + 1), 256), 256, 0, stream>>>(partial, nchunks, Cout,
                                                                                              Cin, gw, gb);
}

#define LF_INSTANTIATE(T)                                                                                          \
  template void launch_conv_relu_pool_fwd<T>(const T*, const T*, const T*, T*, uint8_t*, const ConvDims&,          \
                                             cudaStream_t);                                                        \
  template void launch_conv_relu_pool_bwd_input<T>(const T*, const uint8_t*, const T*, T*, const ConvDims&,        \
                                                   cudaStream_t);                                                  \
  template void launch_conv_relu_pool_bwd_weight_partial<T>(const T*, const uint8_t*, const T*, T*,                \
                                                            const ConvDims&, int64_t, cudaStream_t);               \
  template void launch_reduce_partials<T>(const T*, int64_t, int64_t, int64_t, T*, T*, cudaStream_t);
LF_INSTANTIATE(float)
LF_INSTANTIATE(double)
#undef LF_INSTANTIATE

}  // namespace cuda
}  // namespace lenet_fast
