// CPU engine of the 3x3 convolutions (forward and backward), shared by the
// conv3x3_relu and conv3x3_relu_maxpool2x2 ops.  Raw pointers, no torch types;
// threads come from at::parallel_for.
//
// The "flattened padded plane" scheme: image n is copied (with its zero padding)
// into a buffer whose rows have stride S = W + 2*pad.  Conv output (y, x) then
// sits at flat position i = y*S + x and reads input position i + ky*S + kx, so a
// whole plane is ONE contiguous loop over i (the 2 columns x >= Wo of each row
// are junk and ignored).  Inner loops run over L consecutive i (two AVX2
// registers) with plain C++ that GCC vectorises; register blocking over kCB
// output channels (forward) or input channels (grad input) keeps 12
// accumulators in registers per tap.
//
// NaN/inf: the zeroed margins and junk columns of the gradient buffer make the
// fast loops multiply 0 by weights (input gradient) and by input values (weight
// gradient) that stock's dense formula never pairs.  0 * w is 0 only for a finite
// w, so a call with a non-finite weight takes input_grad_image_exact, and an image
// with a non-finite value takes weight_grad_image_exact: plain loops over exactly
// the (output pixel, tap) pairs that exist, as stock sums them.
//
// Determinism: weight/bias gradients are accumulated per fixed batch chunk of
// kBatchChunk images (images in order) and the chunk partials are then summed in
// chunk order, so the result does not depend on the number of threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_vec.h"
#include "index_math.h"

namespace lenet_fast {
namespace cpu {

#ifndef LF_CPU_CB
#define LF_CPU_CB 6
#endif
constexpr int kCB = LF_CPU_CB;  // channels per register block

struct ConvShape {
  int64_t N, Cin, Cout, H, W, pad;
};

template <int L>
struct ConvGeom {
  int64_t Cin, Cout, H, W, pad;
  int64_t Hpad, S;  // padded input height, row stride
  int64_t Ho, Wo;   // conv output
  int64_t M0, M;    // Ho * S flat outputs, rounded up to L
  int64_t P;        // channel stride of the padded input buffer
  int64_t F;        // front margin of the gradient buffer
  int64_t Mx;       // Hpad * S rounded up to L (grad wrt the padded input)
  int64_t Q;        // channel stride of the gradient buffer
  int64_t off[9];   // flat offset of tap t = ky*3 + kx

  explicit ConvGeom(const ConvShape& s) : Cin(s.Cin), Cout(s.Cout), H(s.H), W(s.W), pad(s.pad) {
    Hpad = H + 2 * pad;
    S = W + 2 * pad;
    Ho = conv3x3_out_size(H, pad);
    Wo = conv3x3_out_size(W, pad);
    M0 = Ho * S;
    M = round_up(M0, L);
    P = M + 2 * S + 2;
    F = 2 * S + 2;
    Mx = round_up(Hpad * S, L);
    Q = F + Mx;
    LF_UNROLL
    for (int t = 0; t < 9; ++t) off[t] = (t / 3) * S + (t % 3);
  }
  int64_t blocks() const { return ceil_div(Cout, kCB); }
  int64_t in_blocks() const { return ceil_div(Cin, kCB); }
};

// Copy image n (Cin x H x W) into the zero-padded flat buffer xp (Cin x P).
template <typename T, int L>
inline void pack_image(const T* x, T* xp, const ConvGeom<L>& g) {
  std::memset(xp, 0, sizeof(T) * g.Cin * g.P);
  for (int64_t ci = 0; ci < g.Cin; ++ci) {
    const T* src = x + ci * g.H * g.W;
    T* dst = xp + ci * g.P + g.pad * g.S + g.pad;
    for (int64_t y = 0; y < g.H; ++y) std::memcpy(dst + y * g.S, src + y * g.W, sizeof(T) * g.W);
  }
}

// Weights packed per output-channel block: wp[cb][ci][t][kCB] (zero padded).
template <typename T>
inline std::vector<T> pack_weight_out(const T* w, int64_t Cout, int64_t Cin) {
  const int64_t nb = ceil_div(Cout, kCB);
  std::vector<T> wp(nb * Cin * 9 * kCB, T(0));
  for (int64_t co = 0; co < Cout; ++co)
    for (int64_t ci = 0; ci < Cin; ++ci)
      LF_UNROLL
      for (int t = 0; t < 9; ++t)
        wp[(((co / kCB) * Cin + ci) * 9 + t) * kCB + co % kCB] = w[(co * Cin + ci) * 9 + t];
  return wp;
}

// Weights packed per input-channel block for the input gradient: wp[cib][co][t][kCB].
template <typename T>
inline std::vector<T> pack_weight_in(const T* w, int64_t Cout, int64_t Cin) {
  const int64_t nb = ceil_div(Cin, kCB);
  std::vector<T> wp(nb * Cout * 9 * kCB, T(0));
  for (int64_t co = 0; co < Cout; ++co)
    for (int64_t ci = 0; ci < Cin; ++ci)
      LF_UNROLL
      for (int t = 0; t < 9; ++t)
        wp[(((ci / kCB) * Cout + co) * 9 + t) * kCB + ci % kCB] = w[(co * Cin + ci) * 9 + t];
  return wp;
}

// Conv of one image for one block of kCB output channels: ob[c][i] (c < kCB, i < M),
// bias included, no ReLU.  The `omp simd` loop over the L lanes of a strip is
// what the compiler vectorises; the kCB accumulators per lane stay in registers.
template <typename T, int L>
inline void conv_block(const T* __restrict xp, const T* __restrict wpb, const T* __restrict bb, T* __restrict ob,
                       const ConvGeom<L>& g) {
  // One register per channel: with two (a strip of L lanes) the 2 x kCB accumulators,
  // the input strip and the weights outgrew the 16 vector registers and GCC spilled them.
  constexpr int V = Lanes<T>::L1;
  for (int64_t i0 = 0; i0 < g.M; i0 += V) {
    T acc[kCB][V];
    LF_UNROLL
    for (int c = 0; c < kCB; ++c) {
      LF_SIMD
      for (int l = 0; l < V; ++l) acc[c][l] = bb[c];
    }
    for (int64_t ci = 0; ci < g.Cin; ++ci) {
      const T* xc = xp + ci * g.P + i0;
      const T* wc = wpb + ci * 9 * kCB;
      LF_UNROLL
      for (int t = 0; t < 9; ++t) {
        const T* xs = xc + g.off[t];
        const T* wt = wc + t * kCB;
        LF_SIMD
        for (int l = 0; l < V; ++l) {
          const T xv = xs[l];
          LF_UNROLL
          for (int c = 0; c < kCB; ++c) acc[c][l] += wt[c] * xv;
        }
      }
    }
    LF_UNROLL
    for (int c = 0; c < kCB; ++c) {
      LF_SIMD
      for (int l = 0; l < V; ++l) ob[c * g.M + i0 + l] = acc[c][l];
    }
  }
}

// ReLU in place over n values (vectorised).
template <typename T>
inline void relu_inplace(T* __restrict p, int64_t n) {
  LF_SIMD
  for (int64_t i = 0; i < n; ++i) p[i] = relu(p[i]);
}

// kPoolBlock consecutive 2x2 windows (fixed trip count: one vectorised block,
// no scalar remainder loop): r0/r1 point at the window rows, 2*kPoolBlock values each.
constexpr int kPoolBlock = 8;

template <typename T, bool fused>
inline void pool_block(const T* __restrict r0, const T* __restrict r1, T* __restrict out, uint8_t* __restrict code) {
  using I = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;  // same lane width as T
  I c[kPoolBlock];
  LF_SIMD
  for (int j = 0; j < kPoolBlock; ++j) {
    const PoolResult<T, I> p = pool4<T, I>(r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]);
    out[j] = p.best;
    c[j] = fused ? fused_code<T, I>(p.code, p.best) : p.code;
  }
  for (int j = 0; j < kPoolBlock; ++j) code[j] = static_cast<uint8_t>(c[j]);
}

// One row of Wp 2x2 windows over rows r0/r1: the max and the winner code
// (index_math.h rules; `fused` stores kPoolMasked where ReLU blocks the
// gradient).  Branch-free and vectorised; a partial last block goes through a
// small copy so nothing is read past the end of the rows.
template <typename T, bool fused>
inline void pool_row(const T* r0, const T* r1, T* out, uint8_t* code, int64_t Wp) {
  int64_t px = 0;
  for (; px + kPoolBlock <= Wp; px += kPoolBlock) pool_block<T, fused>(r0 + 2 * px, r1 + 2 * px, out + px, code + px);
  if (px < Wp) {
    const int64_t rem = Wp - px;
    T a[2 * kPoolBlock] = {}, b[2 * kPoolBlock] = {}, o[kPoolBlock];
    uint8_t c[kPoolBlock];
    std::memcpy(a, r0 + 2 * px, sizeof(T) * 2 * rem);
    std::memcpy(b, r1 + 2 * px, sizeof(T) * 2 * rem);
    pool_block<T, fused>(a, b, o, c);
    std::memcpy(out + px, o, sizeof(T) * rem);
    std::memcpy(code + px, c, rem);
  }
}

// Forward driver: for every image and output-channel block, computes the conv
// into a thread-local tile and hands it to `epi(n, co0, nc, ob)` (nc <= kCB valid
// channels; channel c of the block at ob + c*M, flat index y*S + x).
template <typename T, typename Epilogue>
void conv_forward(const T* x, const T* w, const T* b, const ConvShape& s, Epilogue epi) {
  constexpr int L = Lanes<T>::L;
  const ConvGeom<L> g(s);
  if (s.N == 0) return;
  const std::vector<T> wp = pack_weight_out(w, s.Cout, s.Cin);
  std::vector<T> bp(g.blocks() * kCB, T(0));
  if (b != nullptr) std::copy(b, b + s.Cout, bp.begin());
  at::parallel_for(0, s.N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<T> xp(g.Cin * g.P);
    std::vector<T> ob(kCB * g.M);
    for (int64_t n = n0; n < n1; ++n) {
      pack_image(x + n * s.Cin * s.H * s.W, xp.data(), g);
      for (int64_t cb = 0; cb < g.blocks(); ++cb) {
        conv_block<T, L>(xp.data(), wp.data() + cb * s.Cin * 9 * kCB, bp.data() + cb * kCB, ob.data(), g);
        epi(n, cb * kCB, std::min<int64_t>(kCB, s.Cout - cb * kCB), ob.data(), g.M, g.S);
      }
    }
  });
}

// grad_w[co][ci][t] += sum_i G[co][i] * xp[ci][i + off[t]] for one image: nine
// dot products at once, one accumulator register per tap (V lanes each), summed
// across lanes in a fixed order at the end.
template <typename T, int L>
inline void weight_grad_image(const T* __restrict xp, const T* __restrict G, T* __restrict gw, const ConvGeom<L>& g) {
  constexpr int V = Lanes<T>::L1;
  const int64_t o0 = g.off[0], o1 = g.off[1], o2 = g.off[2], o3 = g.off[3], o4 = g.off[4], o5 = g.off[5],
                o6 = g.off[6], o7 = g.off[7], o8 = g.off[8];
  for (int64_t co = 0; co < g.Cout; ++co) {
    const T* gc = G + co * g.Q + g.F;
    for (int64_t ci = 0; ci < g.Cin; ++ci) {
      const T* xc = xp + ci * g.P;
      T acc[9][V];
      LF_UNROLL
      for (int t = 0; t < 9; ++t) {
        LF_SIMD
        for (int l = 0; l < V; ++l) acc[t][l] = T(0);
      }
      for (int64_t i0 = 0; i0 < g.M; i0 += V) {
        const T* xs = xc + i0;
        const T* gs = gc + i0;
        LF_SIMD
        for (int l = 0; l < V; ++l) {
          const T gv = gs[l];
          acc[0][l] += gv * xs[o0 + l];
          acc[1][l] += gv * xs[o1 + l];
          acc[2][l] += gv * xs[o2 + l];
          acc[3][l] += gv * xs[o3 + l];
          acc[4][l] += gv * xs[o4 + l];
          acc[5][l] += gv * xs[o5 + l];
          acc[6][l] += gv * xs[o6 + l];
          acc[7][l] += gv * xs[o7 + l];
          acc[8][l] += gv * xs[o8 + l];
        }
      }
      T* out = gw + (co * g.Cin + ci) * 9;
      for (int t = 0; t < 9; ++t) {
        T sum = T(0);
        for (int l = 0; l < V; ++l) sum += acc[t][l];
        out[t] += sum;
      }
    }
  }
}

// Input gradient of one image for one block of kCB input channels:
// gxb[c][j] = sum_co sum_t G[co][j - off[t]] * w[co][ci][t], j over the padded plane.
template <typename T, int L>
inline void input_grad_block(const T* __restrict G, const T* __restrict wpb, T* __restrict gxb, const ConvGeom<L>& g) {
  constexpr int V = Lanes<T>::L1;  // one register per channel, as in conv_block
  for (int64_t j0 = 0; j0 < g.Mx; j0 += V) {
    T acc[kCB][V];
    LF_UNROLL
    for (int c = 0; c < kCB; ++c) {
      LF_SIMD
      for (int l = 0; l < V; ++l) acc[c][l] = T(0);
    }
    for (int64_t co = 0; co < g.Cout; ++co) {
      const T* gc = G + co * g.Q + g.F + j0;
      const T* wc = wpb + co * 9 * kCB;
      LF_UNROLL
      for (int t = 0; t < 9; ++t) {
        const T* gs = gc - g.off[t];
        const T* wt = wc + t * kCB;
        LF_SIMD
        for (int l = 0; l < V; ++l) {
          const T gv = gs[l];
          LF_UNROLL
          for (int c = 0; c < kCB; ++c) acc[c][l] += wt[c] * gv;
        }
      }
    }
    LF_UNROLL
    for (int c = 0; c < kCB; ++c) {
      LF_SIMD
      for (int l = 0; l < V; ++l) gxb[c * g.Mx + j0 + l] = acc[c][l];
    }
  }
}

// True when no element is NaN or +-inf: v - v is 0 for a finite v and NaN
// otherwise, so one vectorised sum answers it (four accumulators, so that the
// adds' latency does not bound it).
template <typename T>
inline bool all_finite(const T* p, int64_t n) {
  constexpr int K = 4 * Lanes<T>::L1;
  T acc[K] = {};
  int64_t i = 0;
  for (; i + K <= n; i += K) {
    LF_SIMD
    for (int j = 0; j < K; ++j) acc[j] += p[i + j] - p[i + j];
  }
  T sum = T(0);
  for (; i < n; ++i) sum += p[i] - p[i];
  for (int j = 0; j < K; ++j) sum += acc[j];
  return sum == T(0);
}

// weight_grad_image over the (output pixel, tap) pairs that exist only (see the top
// of this file); xn is image n unpadded (Cin x H x W).  A tap reading the zero
// padding adds g * 0, as in stock.
template <typename T, int L>
inline void weight_grad_image_exact(const T* xn, const T* G, T* gw, const ConvGeom<L>& g) {
  for (int64_t co = 0; co < g.Cout; ++co)
    for (int64_t ci = 0; ci < g.Cin; ++ci)
      for (int t = 0; t < 9; ++t) {
        T sum = T(0);
        for (int64_t oy = 0; oy < g.Ho; ++oy) {
          const int64_t iy = conv_in_coord(oy, t / 3, g.pad);
          for (int64_t ox = 0; ox < g.Wo; ++ox) {
            const int64_t ix = conv_in_coord(ox, t % 3, g.pad);
            const bool inside = iy >= 0 && iy < g.H && ix >= 0 && ix < g.W;
            sum += G[co * g.Q + g.F + oy * g.S + ox] * (inside ? xn[(ci * g.H + iy) * g.W + ix] : T(0));
          }
        }
        gw[(co * g.Cin + ci) * 9 + t] += sum;
      }
}

// The input gradient of image n (gxn: Cin x H x W) over the (output pixel, tap) pairs
// that exist only (see the top of this file).
template <typename T, int L>
inline void input_grad_image_exact(const T* G, const T* w, T* gxn, const ConvGeom<L>& g) {
  for (int64_t ci = 0; ci < g.Cin; ++ci)
    for (int64_t iy = 0; iy < g.H; ++iy)
      for (int64_t ix = 0; ix < g.W; ++ix) {
        T sum = T(0);
        for (int64_t co = 0; co < g.Cout; ++co)
          for (int t = 0; t < 9; ++t) {
            const int64_t oy = conv_out_coord(iy, t / 3, g.pad), ox = conv_out_coord(ix, t % 3, g.pad);
            if (oy >= 0 && oy < g.Ho && ox >= 0 && ox < g.Wo)
              sum += G[co * g.Q + g.F + oy * g.S + ox] * w[(co * g.Cin + ci) * 9 + t];
          }
        gxn[(ci * g.H + iy) * g.W + ix] = sum;
      }
}

// Backward driver.  `fill(n, G, S, F, Q, gbias)` writes the gradient wrt the conv
// output of image n into the zeroed buffer G (channel co, position (y, x) at
// G[co*Q + F + y*S + x]) and adds its bias gradient to gbias[co], in a fixed order.
// gx (may be null): grad wrt x.  gw/gb (may be null): grad wrt weight/bias.
template <typename T, typename Fill>
void conv_backward(const T* x, const T* w, T* gx, T* gw, T* gb, const ConvShape& s, Fill fill) {
  constexpr int L = Lanes<T>::L;
  const ConvGeom<L> g(s);
  const int64_t nw = s.Cout * s.Cin * 9;
  const bool want_w = gw != nullptr;
  if (want_w) {
    std::fill(gw, gw + nw, T(0));
    if (gb != nullptr) std::fill(gb, gb + s.Cout, T(0));
  }
  if (s.N == 0) return;
  const int64_t nchunks = ceil_div(s.N, kBatchChunk);
  std::vector<T> partial(want_w ? nchunks * (nw + s.Cout) : 0, T(0));
  std::vector<T> wpi;
  const bool w_finite = gx == nullptr || all_finite(w, nw);
  if (gx != nullptr && w_finite) wpi = pack_weight_in(w, s.Cout, s.Cin);
  at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<T> xp(want_w ? g.Cin * g.P : 0);
    std::vector<T> G(g.Cout * g.Q);
    std::vector<T> gxb(gx != nullptr ? kCB * g.Mx : 0);
    std::vector<T> bias_img(s.Cout);
    for (int64_t k = k0; k < k1; ++k) {
      T* pw = want_w ? partial.data() + k * (nw + s.Cout) : nullptr;
      const int64_t nend = std::min(s.N, (k + 1) * kBatchChunk);
      for (int64_t n = k * kBatchChunk; n < nend; ++n) {
        std::fill(G.begin(), G.end(), T(0));
        std::fill(bias_img.begin(), bias_img.end(), T(0));
        fill(n, G.data(), g.S, g.F, g.Q, bias_img.data());
        if (want_w) {
          const T* xn = x + n * s.Cin * s.H * s.W;
          if (all_finite(xn, s.Cin * s.H * s.W)) {
            pack_image(xn, xp.data(), g);
            weight_grad_image<T, L>(xp.data(), G.data(), pw, g);
          } else {
            weight_grad_image_exact<T, L>(xn, G.data(), pw, g);
          }
          for (int64_t co = 0; co < s.Cout; ++co) pw[nw + co] += bias_img[co];
        }
        if (gx != nullptr && !w_finite) {
          input_grad_image_exact<T, L>(G.data(), w, gx + n * s.Cin * s.H * s.W, g);
        } else if (gx != nullptr) {
          for (int64_t cb = 0; cb < g.in_blocks(); ++cb) {
            input_grad_block<T, L>(G.data(), wpi.data() + cb * s.Cout * 9 * kCB, gxb.data(), g);
            const int64_t nc = std::min<int64_t>(kCB, s.Cin - cb * kCB);
            for (int64_t c = 0; c < nc; ++c) {
              T* dst = gx + ((n * s.Cin) + cb * kCB + c) * s.H * s.W;
              const T* src = gxb.data() + c * g.Mx + g.pad * g.S + g.pad;
              for (int64_t y = 0; y < s.H; ++y) std::memcpy(dst + y * s.W, src + y * g.S, sizeof(T) * s.W);
            }
          }
        }
      }
    }
  });
  if (want_w) {
    for (int64_t k = 0; k < nchunks; ++k) {
      const T* pw = partial.data() + k * (nw + s.Cout);
      for (int64_t i = 0; i < nw; ++i) gw[i] += pw[i];
      if (gb != nullptr)
        for (int64_t co = 0; co < s.Cout; ++co) gb[co] += pw[nw + co];
    }
  }
}

}  // namespace cpu
}  // namespace lenet_fast
