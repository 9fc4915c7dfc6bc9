// Plain CUDA launchers (raw pointers + a cudaStream_t, no torch types), defined
// in the .cu files and called from the torch-facing wrappers in the .cpp files,
// which check every launch with C10_CUDA_KERNEL_LAUNCH_CHECK().  Each launcher
// launches exactly one kernel.  Instantiated for float and double.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lenet_fast {
namespace cuda {

struct ConvDims {
  int64_t N, Cin, H, W, Cout;
  int pad;
};

// --- conv3x3 + bias + ReLU (conv3x3_relu_cuda.cu) ------------------------------------
// out (N, Cout, Ho, Wo) = relu(conv(x, w) + b); b may be null.
template <typename T>
void launch_conv_relu_fwd(const T* x, const T* w, const T* b, T* out, const ConvDims& d, cudaStream_t stream);
// grad wrt x (gather form, no atomics); the conv-output gradient is g masked by relu_out.
template <typename T>
void launch_conv_relu_bwd_input(const T* g, const T* relu_out, const T* w, T* gx, const ConvDims& d,
                                cudaStream_t stream);
// Weight/bias partial sums per batch chunk of kBatchChunkCuda images:
// partial[chunk][co][ci*9 + t] and partial[chunk][co][Cin*9] (bias), one block each.
template <typename T>
void launch_conv_relu_bwd_weight_partial(const T* g, const T* relu_out, const T* x, T* partial, const ConvDims& d,
                                         int64_t nchunks, cudaStream_t stream);

// --- conv3x3 + bias + ReLU + max-pool 2x2 (conv3x3_relu_maxpool2x2_cuda.cu) ------------
// out/idx (N, Cout, Ho/2, Wo/2); idx holds the fused winner code (index_math.h).
template <typename T>
void launch_conv_relu_pool_fwd(const T* x, const T* w, const T* b, T* out, uint8_t* idx, const ConvDims& d,
                               cudaStream_t stream);
template <typename T>
void launch_conv_relu_pool_bwd_input(const T* g, const uint8_t* idx, const T* w, T* gx, const ConvDims& d,
                                     cudaStream_t stream);
template <typename T>
void launch_conv_relu_pool_bwd_weight_partial(const T* g, const uint8_t* idx, const T* x, T* partial,
                                              const ConvDims& d, int64_t nchunks, cudaStream_t stream);
// gw/gb = sum over chunks, in chunk order, of the partials above (zeros when nchunks == 0).
template <typename T>
void launch_reduce_partials(const T* partial, int64_t nchunks, int64_t Cout, int64_t Cin, T* gw, T* gb,
                            cudaStream_t stream);

constexpr int64_t kBatchChunkCuda = 8;

// --- max-pool 2x2 ----------------------------------------------------------------
template <typename T>
void launch_maxpool_fwd(const T* x, T* out, uint8_t* idx, int64_t planes, int64_t H, int64_t W, cudaStream_t stream);
template <typename T>
void launch_maxpool_bwd(const T* g, const uint8_t* idx, T* gx, int64_t planes, int64_t H, int64_t W,
                        cudaStream_t stream);

// --- linear epilogues (the GEMMs are cuBLAS via at::mm) ---------------------------
// y[n][o] = relu?(y[n][o] + b[o]) in place; b may be null.
template <typename T>
void launch_bias_relu(T* y, const T* b, int64_t N, int64_t O, bool relu, cudaStream_t stream);
// gm[n][o] = relu_grad_passes(out) ? g : 0 (or g when !relu); gb[o] = sum_n gm[n][o] (fixed order); gb may be null.
template <typename T>
void launch_relu_mask_bias_grad(const T* g, const T* out, T* gm, T* gb, int64_t N, int64_t O, bool relu,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace lenet_fast
