// CPU forward of the fused conv3x3 + bias + ReLU + max-pool 2x2 op.  Raw
// pointers, no torch types; threads come from at::parallel_for.
//
// Layout: each image is first copied into a zero-padded CHANNELS-LAST buffer
// xcl[iy][ix][ci] (padded height Hpad, width Wpad).
//
// The forward vectorises over OUTPUT CHANNELS.  One pooled output (py, px) needs
//   the 4x4 input window starting at padded (2py, 2px); each input value is
//   broadcast and multiplied into the four conv outputs of the pool window
//   (dy, dx) it feeds, each a vector of output channels.  The 4 x (2 vectors)
//   accumulators stay in registers, no conv tile is written, and the ReLU + pool
//   + winner code is elementwise over the accumulators.
//
// The backward of the fused op still uses the dense engine of cpu_conv.h.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_conv.h"
#include "index_math.h"

namespace lenet_fast {
namespace cpu {

struct FusedGeom {
  int64_t N, Cin, Cout, H, W, pad;
  int64_t Hpad, Wpad;  // padded input
  int64_t Hp, Wp;      // pooled output
  int64_t Cp;          // Cout rounded up to whole vectors (packed weights, output tile)

  FusedGeom(const ConvShape& s, int64_t V) : N(s.N), Cin(s.Cin), Cout(s.Cout), H(s.H), W(s.W), pad(s.pad) {
    Hpad = H + 2 * pad;
    Wpad = W + 2 * pad;
    Hp = pool2x2_out_size(conv3x3_out_size(H, pad));
    Wp = pool2x2_out_size(conv3x3_out_size(W, pad));
    Cp = round_up(Cout, V);
  }
};

// Copy image x (Cin x H x W, NCHW) into the interior of the channels-last padded
// buffer xcl (Hpad x Wpad x Cin).  The border is not written: callers zero the
// buffer once and it stays zero.
template <typename T>
inline void pack_image_cl(const T* __restrict x, T* __restrict xcl, const FusedGeom& g) {
  for (int64_t ci = 0; ci < g.Cin; ++ci)
    for (int64_t iy = 0; iy < g.H; ++iy) {
      const T* src = x + (ci * g.H + iy) * g.W;
      T* dst = xcl + ((iy + g.pad) * g.Wpad + g.pad) * g.Cin + ci;
      for (int64_t ix = 0; ix < g.W; ++ix) dst[ix * g.Cin] = src[ix];
    }
}

// Accumulators of one pooled output for a block of NB vectors of output
// channels: acc[d][j], d = pool_code(dy, dx), j over NB*V channels.  The 36
// (tap, window position) pairs are fully unrolled; each weight vector is
// loaded once per (ci, tap) and used for the four window positions.
template <typename T, int NB>
inline void fused_fwd_block(const T* __restrict xw, const T* __restrict wf, const T* __restrict bias, T* __restrict best,
                            typename std::conditional_t<sizeof(T) == 8, int64_t, int32_t>* __restrict code,
                            const FusedGeom& g) {
  using I = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;  // same lane width as T
  constexpr int J = NB * Lanes<T>::L1;
  const int64_t Cin = g.Cin, Cp = g.Cp, rs = g.Wpad * Cin;  // rs: padded row stride of xcl
  // Zero-initialised (bias added in the epilogue): GCC then keeps acc in
  // registers; initialising from `bias` made it build acc on the stack with
  // half-width stores, and the full-width reloads stalled on store forwarding.
  T acc[4][J];
  LF_UNROLL
  for (int d = 0; d < 4; ++d) {
    LF_SIMD
    for (int j = 0; j < J; ++j) acc[d][j] = T(0);
  }
  for (int64_t ci = 0; ci < Cin; ++ci) {
    const T* xc = xw + ci;
    LF_UNROLL
    for (int ky = 0; ky < 3; ++ky) {
      LF_UNROLL
      for (int kx = 0; kx < 3; ++kx) {
        const T* wv = wf + ((ky * 3 + kx) * Cin + ci) * Cp;
        LF_UNROLL
        for (int dy = 0; dy < 2; ++dy) {
          LF_UNROLL
          for (int dx = 0; dx < 2; ++dx) {
            const T xv = xc[(dy + ky) * rs + (dx + kx) * Cin];
            LF_SIMD
            for (int j = 0; j < J; ++j) acc[dy * 2 + dx][j] += wv[j] * xv;
          }
        }
      }
    }
  }
  // ReLU first, then pool (exactly the stock order; index_math.h rules).  Two
  // separate simd loops: GCC vectorises each (as one loop it falls back to
  // scalar code with unpredictable branches).
  LF_UNROLL
  for (int d = 0; d < 4; ++d) {
    LF_SIMD
    for (int j = 0; j < J; ++j) acc[d][j] = relu(acc[d][j] + bias[j]);
  }
  LF_SIMD
  for (int j = 0; j < J; ++j) {
    const PoolResult<T, I> p = pool4<T, I>(acc[0][j], acc[1][j], acc[2][j], acc[3][j]);
    best[j] = p.best;
    code[j] = fused_code<T, I>(p.code, p.best);
  }
}

// Forward: out (N, Cout, Hp, Wp) and idx (uint8 winner codes, kPoolMasked where
// ReLU blocks the gradient).  Parallel over images.
template <typename T>
void fused_forward(const T* x, const T* w, const T* b, T* out, uint8_t* idx, const ConvShape& s) {
  using I = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;
  constexpr int V = Lanes<T>::L1;
  const FusedGeom g(s, V);
  if (s.N == 0) return;
  // Weights as wf[ky*3+kx][ci][co] (co zero-padded to Cp), bias as bp[co].
  std::vector<T> wf(9 * g.Cin * g.Cp, T(0)), bp(g.Cp, T(0));
  for (int64_t co = 0; co < g.Cout; ++co)
    for (int64_t ci = 0; ci < g.Cin; ++ci)
      for (int t = 0; t < 9; ++t) wf[(t * g.Cin + ci) * g.Cp + co] = w[(co * g.Cin + ci) * 9 + t];
  if (b != nullptr) std::copy(b, b + g.Cout, bp.begin());
  const int64_t P = g.Hp * g.Wp;  // pooled outputs per channel
  at::parallel_for(0, s.N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<T> xcl(g.Hpad * g.Wpad * g.Cin, T(0));  // border zeroed once
    std::vector<T> tb(P * g.Cp);                         // pooled values [pos][co]
    std::vector<I> tc(P * g.Cp);                         // winner codes [pos][co]
    for (int64_t n = n0; n < n1; ++n) {
      pack_image_cl(x + n * g.Cin * g.H * g.W, xcl.data(), g);
      for (int64_t py = 0; py < g.Hp; ++py)
        for (int64_t px = 0; px < g.Wp; ++px) {
          const T* xw = xcl.data() + (2 * py * g.Wpad + 2 * px) * g.Cin;  // top-left of the 4x4 window
          const int64_t pos = py * g.Wp + px;
          int64_t c0 = 0;
          for (; c0 + 2 * V <= g.Cp; c0 += 2 * V)
            fused_fwd_block<T, 2>(xw, wf.data() + c0, bp.data() + c0, tb.data() + pos * g.Cp + c0,
                                  tc.data() + pos * g.Cp + c0, g);
          if (c0 < g.Cp)
            fused_fwd_block<T, 1>(xw, wf.data() + c0, bp.data() + c0, tb.data() + pos * g.Cp + c0,
                                  tc.data() + pos * g.Cp + c0, g);
        }
      // Tile [pos][co] -> NCHW.
      for (int64_t co = 0; co < g.Cout; ++co) {
        T* o = out + (n * g.Cout + co) * P;
        uint8_t* id = idx + (n * g.Cout + co) * P;
        for (int64_t pos = 0; pos < P; ++pos) {
          o[pos] = tb[pos * g.Cp + co];
          id[pos] = static_cast<uint8_t>(tc[pos * g.Cp + co]);
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace lenet_fast
