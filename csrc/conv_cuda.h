// What the two conv ops' CUDA code (conv3x3_relu_cuda.cu, conv3x3_relu_maxpool2x2_cuda.cu,
// conv_kernels.cuh) shares with their torch-facing wrappers (conv3x3_relu.cpp,
// conv3x3_relu_maxpool2x2.cpp, common.h): the problem size and the deterministic
// weight-gradient reduction both ops use.  Plain CUDA (no torch types), so nvcc stays fast.
// Each op's own launchers are declared in the .cpp that calls them, next to their use:
// an op's CUDA code is its <name>.cpp + <name>_cuda.cu pair, with no list to add it to.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lenet_fast {
namespace cuda {

struct ConvDims {
  int64_t N, Cin, H, W, Cout;
  int pad;
};

// The weight/bias gradient kernels write partial sums per batch chunk of kBatchChunkCuda
// images: partial[chunk][co][ci*9 + t] and partial[chunk][co][Cin*9] (bias), one block each.
constexpr int64_t kBatchChunkCuda = 8;

// gw/gb = sum over chunks, in chunk order, of those partials (zeros when nchunks == 0);
// defined in conv3x3_relu_maxpool2x2_cuda.cu, for float and double.
template <typename T>
void launch_reduce_partials(const T* partial, int64_t nchunks, int64_t Cout, int64_t Cin, T* gw, T* gb,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace lenet_fast
