// CUDA launchers of conv3x3 + bias + ReLU (kernels in conv_kernels.cuh, POOL = false).
#include "conv_kernels.cuh"

namespace lenet_fast {
namespace cuda {

template <typename T>
void launch_conv_relu_fwd(const T* x, const T* w, const T* b, T* out, const ConvDims& d, cudaStream_t stream) {
  detail::conv_fwd<T, false>(x, w, b, out, nullptr, d, stream);
}

template <typename T>
void launch_conv_relu_bwd_input(const T* g, const T* relu_out, const T* w, T* gx, const ConvDims& d,
                                cudaStream_t stream) {
  detail::conv_bwd_input<T, false>(g, relu_out, nullptr, w, gx, d, stream);
}

template <typename T>
void launch_conv_relu_bwd_weight_partial(const T* g, const T* relu_out, const T* x, T* partial, const ConvDims& d,
                                         int64_t nchunks, cudaStream_t stream) {
  detail::conv_bwd_weight_partial<T, false>(g, relu_out, nullptr, x, partial, d, nchunks, stream);
}

#define LF_INSTANTIATE(T)                                                                                     \
  template void launch_conv_relu_fwd<T>(const T*, const T*, const T*, T*, const ConvDims&, cudaStream_t);     \
  template void launch_conv_relu_bwd_input<T>(const T*, const T*, const T*, T*, const ConvDims&, cudaStream_t); \
  template void launch_conv_relu_bwd_weight_partial<T>(const T*, const T*, const T*, T*, const ConvDims&, int64_t, \
                                                       cudaStream_t);
LF_INSTANTIATE(float)
LF_INSTANTIATE(double)
#undef LF_INSTANTIATE

}  // namespace cuda
}  // namespace lenet_fast
