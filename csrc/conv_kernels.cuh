// CUDA kernels of the 3x3 convolutions, shared by conv3x3_relu_cuda.cu (POOL = false)
// and conv3x3_relu_maxpool2x2_cuda.cu (POOL = true).  Plain CUDA: raw pointers, no
// torch headers.  Index math and pooling/ReLU rules come from index_math.h, the
// header the CPU kernels use too.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "conv_cuda.h"
#include "index_math.h"

namespace lenet_fast {
namespace cuda {
namespace detail {

// Forward tiling: a block computes a TQY x TQX tile of 2x2 "quads" (a quad is
// one pooling window, or four neighbouring conv outputs without pooling) for
// COB output channels of one image.  The input tile (CIC channels at a time) and
// the matching weights go through shared memory.
constexpr int TQX = 16, TQY = 8;                      // 128 threads
// output channels per block: 4 for float, 2 for double (keeps double in registers)
template <typename T>
__host__ __device__ constexpr int cob_for() {
  return sizeof(T) == 8 ? 2 : 4;
}
constexpr int CIC = 4;                                // input channels per shared-memory stage
constexpr int IN_TW = 2 * TQX + 2, IN_TH = 2 * TQY + 2;  // input tile (34 x 18)

struct FwdGrid {
  int64_t co_blocks, tiles_y, tiles_x;
};

template <typename T, bool POOL>
__global__ void __launch_bounds__(TQX* TQY, 1)
    conv_fwd_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ out,
                    uint8_t* __restrict__ idx, ConvDims d, FwdGrid gr, int64_t total_blocks) {
  constexpr int COB = cob_for<T>();
  __shared__ T s_in[CIC][IN_TH][IN_TW];
  __shared__ T s_w[COB][CIC][9];

  const int64_t Ho = conv3x3_out_size(d.H, d.pad), Wo = conv3x3_out_size(d.W, d.pad);
  const int64_t Hq = POOL ? pool2x2_out_size(Ho) : ceil_div(Ho, 2);
  const int64_t Wq = POOL ? pool2x2_out_size(Wo) : ceil_div(Wo, 2);

  // grid-stride over tiles, so any number of tiles fits in gridDim.x
  for (int64_t tile = blockIdx.x; tile < total_blocks; tile += gridDim.x) {
  int64_t bid = tile;
  const int64_t tx_blk = bid % gr.tiles_x;
  bid /= gr.tiles_x;
  const int64_t ty_blk = bid % gr.tiles_y;
  bid /= gr.tiles_y;
  const int64_t cob = bid % gr.co_blocks;
  const int64_t n = bid / gr.co_blocks;

  const int tid = threadIdx.x;
  const int qx = tid % TQX, qy = tid / TQX;
  const int64_t qy_g = ty_blk * TQY + qy, qx_g = tx_blk * TQX + qx;
  const int64_t co0 = cob * COB;
  // input tile origin (may be -pad)
  const int64_t iy0 = conv_in_coord(2 * ty_blk * TQY, 0, d.pad);
  const int64_t ix0 = conv_in_coord(2 * tx_blk * TQX, 0, d.pad);

  T acc[COB][4];
#pragma unroll
  for (int c = 0; c < COB; ++c) {
    const T bias = (b != nullptr && co0 + c < d.Cout) ? b[co0 + c] : T(0);
#pragma unroll
    for (int k = 0; k < 4; ++k) acc[c][k] = bias;
  }

  for (int64_t ci0 = 0; ci0 < d.Cin; ci0 += CIC) {
    for (int i = tid; i < CIC * IN_TH * IN_TW; i += TQX * TQY) {
      const int c = i / (IN_TH * IN_TW), r = (i / IN_TW) % IN_TH, col = i % IN_TW;
      const int64_t yy = iy0 + r, xx = ix0 + col;
      T v = T(0);
      if (ci0 + c < d.Cin && yy >= 0 && yy < d.H && xx >= 0 && xx < d.W)
        v = x[nchw_offset(n, ci0 + c, yy, xx, d.Cin, d.H, d.W)];
      s_in[c][r][col] = v;
    }
    for (int i = tid; i < COB * CIC * 9; i += TQX * TQY) {
      const int c = i / (CIC * 9), cc = (i / 9) % CIC, t = i % 9;
      T v = T(0);
      if (co0 + c < d.Cout && ci0 + cc < d.Cin) v = w[((co0 + c) * d.Cin + ci0 + cc) * 9 + t];
      s_w[c][cc][t] = v;
    }
    __syncthreads();
#pragma unroll
    for (int cc = 0; cc < CIC; ++cc) {
      T p[4][4];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q) p[r][q] = s_in[cc][2 * qy + r][2 * qx + q];
#pragma unroll
      for (int c = 0; c < COB; ++c)
#pragma unroll
        for (int ky = 0; ky < 3; ++ky)
#pragma unroll
          for (int kx = 0; kx < 3; ++kx) {
            const T wv = s_w[c][cc][ky * 3 + kx];
            acc[c][0] += wv * p[ky][kx];
            acc[c][1] += wv * p[ky][kx + 1];
            acc[c][2] += wv * p[ky + 1][kx];
            acc[c][3] += wv * p[ky + 1][kx + 1];
          }
    }
    __syncthreads();
  }

  if (qy_g < Hq && qx_g < Wq) {
#pragma unroll
  for (int c = 0; c < COB; ++c) {
    const int64_t co = co0 + c;
    if (co >= d.Cout) break;
    if (POOL) {
      const PoolResult<T> r = pool4(relu(acc[c][0]), relu(acc[c][1]), relu(acc[c][2]), relu(acc[c][3]));
      const int64_t o = nchw_offset(n, co, qy_g, qx_g, d.Cout, Hq, Wq);
      out[o] = r.best;
      idx[o] = static_cast<uint8_t>(fused_code(r.code, r.best));
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t oy = 2 * qy_g + pool_code_dy(k), ox = 2 * qx_g + pool_code_dx(k);
        if (oy < Ho && ox < Wo) out[nchw_offset(n, co, oy, ox, d.Cout, Ho, Wo)] = relu(acc[c][k]);
      }
    }
  }
  }
  }  // tiles
}

// Gradient wrt conv output (n, co, oy, ox), derived on the fly (no buffer):
// POOL: from the pooled gradient and winner codes; plain: ReLU mask of the output.
template <typename T, bool POOL>
__device__ __forceinline__ T conv_grad_at(const T* __restrict__ g, const T* __restrict__ relu_out,
                                          const uint8_t* __restrict__ idx, int64_t n, int64_t co, int64_t oy,
                                          int64_t ox, int64_t Cout, int64_t Ho, int64_t Wo) {
  if (POOL) {
    const int64_t Hp = pool2x2_out_size(Ho), Wp = pool2x2_out_size(Wo);
    const int code = pool_code_of(oy, ox, Hp, Wp);
    if (code < 0) return T(0);
    const int64_t o = nchw_offset(n, co, oy >> 1, ox >> 1, Cout, Hp, Wp);
    return static_cast<int>(idx[o]) == code ? g[o] : T(0);
  } else {
    const int64_t o = nchw_offset(n, co, oy, ox, Cout, Ho, Wo);
    return relu_grad_passes(relu_out[o]) ? g[o] : T(0);
  }
}

// grad wrt x, gather form: one thread per input element, no atomics.
template <typename T, bool POOL>
__global__ void __launch_bounds__(256, 1)
    conv_bwd_input_kernel(const T* __restrict__ g, const T* __restrict__ relu_out, const uint8_t* __restrict__ idx,
                          const T* __restrict__ w, T* __restrict__ gx, ConvDims d) {
  const int64_t Ho = conv3x3_out_size(d.H, d.pad), Wo = conv3x3_out_size(d.W, d.pad);
  const int64_t total = d.N * d.Cin * d.H * d.W;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t xx = e % d.W, y = (e / d.W) % d.H, ci = (e / (d.W * d.H)) % d.Cin, n = e / (d.W * d.H * d.Cin);
    T acc = T(0);
    for (int64_t co = 0; co < d.Cout; ++co) {
      const T* wc = w + (co * d.Cin + ci) * 9;
#pragma unroll
      for (int ky = 0; ky < 3; ++ky) {
        const int64_t oy = conv_out_coord(y, ky, d.pad);
        if (oy < 0 || oy >= Ho) continue;
#pragma unroll
        for (int kx = 0; kx < 3; ++kx) {
          const int64_t ox = conv_out_coord(xx, kx, d.pad);
          if (ox < 0 || ox >= Wo) continue;
          acc += conv_grad_at<T, POOL>(g, relu_out, idx, n, co, oy, ox, d.Cout, Ho, Wo) * __ldg(wc + ky * 3 + kx);
        }
      }
    }
    gx[e] = acc;
  }
}

constexpr int WG_THREADS = 256;

// Weight/bias partial sums of one batch chunk for one (co, ci): each thread
// walks a fixed strided subset of (image, conv position), then a fixed-shape
// tree reduction in shared memory; deterministic, no atomics.
template <typename T, bool POOL>
__global__ void __launch_bounds__(WG_THREADS, 1)
    conv_bwd_weight_kernel(const T* __restrict__ g, const T* __restrict__ relu_out, const uint8_t* __restrict__ idx,
                           const T* __restrict__ x, T* __restrict__ partial, ConvDims d, int64_t total_blocks) {
  __shared__ T s_red[WG_THREADS];
  const int64_t Ho = conv3x3_out_size(d.H, d.pad), Wo = conv3x3_out_size(d.W, d.pad);
  for (int64_t blk = blockIdx.x; blk < total_blocks; blk += gridDim.x) {
  int64_t bid = blk;
  const int64_t ci = bid % d.Cin;
  bid /= d.Cin;
  const int64_t co = bid % d.Cout;
  const int64_t chunk = bid / d.Cout;
  const int64_t n0 = chunk * kBatchChunkCuda;
  const int64_t n1 = (n0 + kBatchChunkCuda < d.N) ? n0 + kBatchChunkCuda : d.N;
  const int64_t per_img = Ho * Wo;
  const int64_t total = (n1 - n0) * per_img;

  T acc[10];
#pragma unroll
  for (int t = 0; t < 10; ++t) acc[t] = T(0);
  for (int64_t e = threadIdx.x; e < total; e += WG_THREADS) {
    const int64_t n = n0 + e / per_img, oy = (e % per_img) / Wo, ox = e % Wo;
    const T gc = conv_grad_at<T, POOL>(g, relu_out, idx, n, co, oy, ox, d.Cout, Ho, Wo);
    acc[9] += gc;
#pragma unroll
    for (int ky = 0; ky < 3; ++ky) {
      const int64_t iy = conv_in_coord(oy, ky, d.pad);
#pragma unroll
      for (int kx = 0; kx < 3; ++kx) {
        const int64_t ix = conv_in_coord(ox, kx, d.pad);
        const T xv = (iy >= 0 && iy < d.H && ix >= 0 && ix < d.W) ? x[nchw_offset(n, ci, iy, ix, d.Cin, d.H, d.W)] : T(0);
        acc[ky * 3 + kx] += gc * xv;
      }
    }
  }
  T* dst = partial + (chunk * d.Cout + co) * (d.Cin * 9 + 1);
#pragma unroll
  for (int t = 0; t < 10; ++t) {  // unrolled: acc[] stays in registers
    if (t == 9 && ci != 0) break;  // the bias partial is summed once per (chunk, co)
    s_red[threadIdx.x] = acc[t];
    __syncthreads();
    for (int s = WG_THREADS / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) s_red[threadIdx.x] += s_red[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) dst[t < 9 ? ci * 9 + t : d.Cin * 9] = s_red[0];
    __syncthreads();
  }
  }  // blocks
}

// Blocks for `total` work items of `per_block` each; kernels loop (grid-stride)
// over the rest, so this may be capped.
inline unsigned int grid_for(int64_t total, int per_block) {
  const int64_t blocks = ceil_div(total, per_block);
  constexpr int64_t kMaxBlocks = int64_t(1) << 20;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

template <typename T, bool POOL>
void conv_fwd(const T* x, const T* w, const T* b, T* out, uint8_t* idx, const ConvDims& d, cudaStream_t stream) {
  const int64_t Ho = conv3x3_out_size(d.H, d.pad), Wo = conv3x3_out_size(d.W, d.pad);
  const int64_t Hq = POOL ? pool2x2_out_size(Ho) : ceil_div(Ho, 2);
  const int64_t Wq = POOL ? pool2x2_out_size(Wo) : ceil_div(Wo, 2);
  const FwdGrid gr{ceil_div(d.Cout, cob_for<T>()), ceil_div(Hq, TQY), ceil_div(Wq, TQX)};
  const int64_t blocks = d.N * gr.co_blocks * gr.tiles_y * gr.tiles_x;
  conv_fwd_kernel<T, POOL><<<grid_for(blocks, 1), TQX * TQY, 0, stream>>>(x, w, b, out, idx, d, gr, blocks);
}

template <typename T, bool POOL>
void conv_bwd_input(const T* g, const T* relu_out, const uint8_t* idx, const T* w, T* gx, const ConvDims& d,
                    cudaStream_t stream) {
  conv_bwd_input_kernel<T, POOL><<<grid_for(d.N * d.Cin * d.H * d.W, 256), 256, 0, stream>>>(g, relu_out, idx, w, gx, d);
}

template <typename T, bool POOL>
void conv_bwd_weight_partial(const T* g, const T* relu_out, const uint8_t* idx, const T* x, T* partial,
                             const ConvDims& d, int64_t nchunks, cudaStream_t stream) {
  const int64_t blocks = nchunks * d.Cout * d.Cin;
  conv_bwd_weight_kernel<T, POOL><<<grid_for(blocks, 1), WG_THREADS, 0, stream>>>(g, relu_out, idx, x, partial, d,
                                                                                    blocks);
}

}  // namespace detail
}  // namespace cuda
}  // namespace lenet_fast
