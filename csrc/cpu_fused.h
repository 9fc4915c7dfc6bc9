// CPU forward and backward of the fused conv3x3 + bias + ReLU + max-pool 2x2
// op.  Raw pointers, no torch types; threads come from at::parallel_for.
//
// The forward vectorises over OUTPUT CHANNELS.  One pooled output (py, px) needs
//   the 4x4 input window starting at padded (2py, 2px) of every input channel,
//   read in place from NCHW (a zero-bordered copy per image when padding = 1);
//   each input value is broadcast and multiplied into the four conv outputs of
//   the pool window (dy, dx) it feeds, each a vector of output channels.  The
//   4 x (2 vectors) accumulators stay in registers, no conv tile is written, and
//   the ReLU + pool + winner code is elementwise over the accumulators.
// A single input channel (LeNet's conv1) takes fused_forward_cin1 instead,
// vectorised over pooled output columns (see there).
//
// The backward (fused_backward_winners below) works on a channels-last copy of
// the input and touches only the pool WINNERS (1 in 4 conv outputs, fewer where
// ReLU blocks): see the comment there.  Shapes it does not handle go through
// the dense engine of cpu_conv.h.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

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

// Accumulators of one pooled output for a block of NB vectors of output
// channels: acc[d][j], d = pool_code(dy, dx), j over NB*V channels.  The 36
// (tap, window position) pairs are fully unrolled; each weight vector is
// loaded once per (ci, tap) and used for the four window positions.
template <typename T, int NB>
inline void fused_fwd_block(const T* __restrict xw, int64_t cs, int64_t rs, int64_t Cin, int64_t Cp,
                            const T* __restrict wf, const T* __restrict bias, T* __restrict best,
                            typename std::conditional_t<sizeof(T) == 8, int64_t, int32_t>* __restrict code) {
  using I = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;  // same lane width as T
  constexpr int J = NB * Lanes<T>::L1;
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
    const T* xc = xw + ci * cs;
    LF_UNROLL
    for (int ky = 0; ky < 3; ++ky) {
      LF_UNROLL
      for (int kx = 0; kx < 3; ++kx) {
        const T* wv = wf + ((ky * 3 + kx) * Cin + ci) * Cp;
        LF_UNROLL
        for (int dy = 0; dy < 2; ++dy) {
          LF_UNROLL
          for (int dx = 0; dx < 2; ++dx) {
            const T xv = xc[(dy + ky) * rs + dx + kx];
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

// Column planes of a single-channel image for the Cin = 1 kernels:
// planes[par][iy][j] = padded image at (iy, 2j + par), par = 0 (EVEN) or 1
// (ODD), for the first R padded rows; plane row stride Ws.  Only the image's
// pixels are written: the caller zeroes the buffer once (padding, and columns
// past the image, stay zero).
struct Cin1Planes {
  int64_t R, Ws;
};

template <typename T>
inline void build_column_planes(const T* __restrict xn, T* __restrict planes, const ConvShape& s, Cin1Planes p) {
  // Padded column c = 2j + par holds x column 2j + par - pad (pad is 0 or 1).
  for (int64_t iy = s.pad; iy < std::min<int64_t>(p.R, s.H + s.pad); ++iy)
    for (int64_t par = 0; par < 2; ++par) {
      const T* src = xn + (iy - s.pad) * s.W + par - s.pad;
      T* dst = planes + (par * p.R + iy) * p.Ws;
      const int64_t j0 = par < s.pad ? 1 : 0, j1 = (s.W - 1 + s.pad - par) / 2 + 1;
      for (int64_t j = j0; j < j1; ++j) dst[j] = src[2 * j];
    }
}

// Forward for ONE input channel (LeNet's conv1): vectorised over PIXELS.
//
// With Cin = 1 the channels-last engine below spends most of its time
// broadcasting input values (6 of 8 lanes useful, one broadcast per FMA).
// Here a vector holds V consecutive POOLED columns px..px+V-1 of one pooled row
// py, for one output channel; each of the 4 window positions (dy, dx) is its own
// accumulator.  Conv output (2py+dy, 2px+dx) reads padded input column
// 2px + (dx+kx), dx+kx in 0..3: even columns 2(px+0), 2(px+1) and odd columns
// 2(px+0)+1, 2(px+1)+1.  So the padded image is split once into an EVEN and an
// ODD column plane (E[iy][j] = xpad[iy][2j], O[iy][j] = xpad[iy][2j+1]) and
// every tap is a contiguous, unit-stride load of V values at offset px or px+1
// of one plane; the weights are scalars held in registers.  A block is B = 2V
// pooled columns (LeNet conv1: Wp = 13 -> one block): 8 independent accumulator
// vectors, so more of the 9-FMA chains per conv output overlap (B = V was
// slower on LeNet conv1: docs/measurements-behind-the-code.md).  Pooled columns past Wp read zeros/neighbours;
// the block is stored whole into the output row anyway, spilling into the next
// row, which is written afterwards (see the store).
//
// Arithmetic per conv output is the same as the general engine's:
// accumulate from 0 over taps in (ky, kx) order, then + bias, ReLU, pool4 and
// fused_code (index_math.h), so values and codes are identical.
template <typename T>
void fused_forward_cin1(const T* x, const T* w, const T* b, T* out, uint8_t* idx, const ConvShape& s) {
  using I = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;
  constexpr int B = 2 * Lanes<T>::L1;  // pooled columns per block
  const FusedGeom g(s, Lanes<T>::L1);
  const int64_t Hp = g.Hp, Wp = g.Wp, P = Hp * Wp, Cout = g.Cout;
  const int64_t Wv = round_up(Wp, B);  // pooled columns computed per row
  // Plane row stride: the last vector reads up to column Wv; one more column
  // so that the last padded column (dropped by floor-mode pooling when the conv
  // width is odd) still has a slot.
  const int64_t Ws = Wv + 2;
  const int64_t R = 2 * Hp + 2;        // padded input rows read
  at::parallel_for(0, s.N, 1, [&, Hp, Wp, P, Cout, Wv, Ws, R](int64_t n0, int64_t n1) {
    // (Sizes captured by value: through references GCC reloaded them after
    // every uint8 store, as such a store may alias them.)
    std::vector<T> planes(2 * R * Ws, T(0));  // see build_column_planes
    for (int64_t n = n0; n < n1; ++n) {
      build_column_planes(x + n * s.H * s.W, planes.data(), s, {R, Ws});
      for (int64_t co = 0; co < Cout; ++co) {
        T wk[9];
        for (int t = 0; t < 9; ++t) wk[t] = w[co * 9 + t];
        const T bias = b != nullptr ? b[co] : T(0);
        T* o = out + (n * Cout + co) * P;
        uint8_t* id = idx + (n * Cout + co) * P;
        for (int64_t py = 0; py < Hp; ++py) {
          for (int64_t px = 0; px < Wv; px += B) {
            T acc[4][B];
            LF_UNROLL
            for (int d = 0; d < 4; ++d) {
              LF_SIMD
              for (int l = 0; l < B; ++l) acc[d][l] = T(0);
            }
            // One kernel row ky per iteration, deliberately not unrolled: its three
            // weights and each source vector are then live only within it (8
            // accumulators + 3 weights + 2 sources fit the 16 vector registers;
            // unrolled, GCC kept sources for the next row and spilled).  Within
            // a row, each source (input row ky + dy, column phase c) is loaded
            // once and feeds the windows dx with kx = c - dx, so every
            // accumulator still sums its taps in (ky, kx) order.
#pragma GCC unroll 1
            for (int ky = 0; ky < 3; ++ky) {
              const T w0 = wk[ky * 3], w1 = wk[ky * 3 + 1], w2 = wk[ky * 3 + 2];
              LF_UNROLL
              for (int dy = 0; dy < 2; ++dy) {
                const T* row_even = planes.data() + (2 * py + dy + ky) * Ws + px;
                const T* row_odd = row_even + R * Ws;
                LF_UNROLL
                for (int c = 0; c < 4; ++c) {
                  const T* sp = ((c & 1) ? row_odd : row_even) + (c >> 1);
                  T* a0 = acc[dy * 2];      // dx = 0: kx = c
                  T* a1 = acc[dy * 2 + 1];  // dx = 1: kx = c - 1
                  const T wa = c == 0 ? w0 : c == 1 ? w1 : w2;
                  const T wb = c == 1 ? w0 : c == 2 ? w1 : w2;
                  if (c <= 2) {
                    LF_SIMD
                    for (int l = 0; l < B; ++l) a0[l] += wa * sp[l];
                  }
                  if (c >= 1) {
                    LF_SIMD
                    for (int l = 0; l < B; ++l) a1[l] += wb * sp[l];
                  }
                }
              }
            }
            LF_UNROLL
            for (int d = 0; d < 4; ++d) {
              LF_SIMD
              for (int l = 0; l < B; ++l) acc[d][l] = relu(acc[d][l] + bias);
            }
            // Written straight into the output row.  A block may run past the
            // row's end into the next row, which is written later by this same
            // loop; only a block that would run past this image's outputs (the
            // last row of the last channel) stores lane by lane.
            T* orow = o + py * Wp + px;
            uint8_t* irow = id + py * Wp + px;
            if (co * P + py * Wp + px + B <= Cout * P) {
              // Two loops: with the uint8 store in the first, GCC vectorised it
              // at 128 bits and spilled.
              I code[B];
              LF_SIMD
              for (int l = 0; l < B; ++l) {
                const PoolResult<T, I> p = pool4<T, I>(acc[0][l], acc[1][l], acc[2][l], acc[3][l]);
                orow[l] = p.best;
                code[l] = fused_code<T, I>(p.code, p.best);
              }
              LF_SIMD
              for (int l = 0; l < B; ++l) irow[l] = static_cast<uint8_t>(code[l]);
            } else {
              for (int l = 0; l < B && px + l < Wp; ++l) {
                const PoolResult<T, I> p = pool4<T, I>(acc[0][l], acc[1][l], acc[2][l], acc[3][l]);
                orow[l] = p.best;
                irow[l] = static_cast<uint8_t>(fused_code<T, I>(p.code, p.best));
              }
            }
          }
        }
      }
    }
  });
}

// One image's tile [pos][co] (row stride Cp) -> its NCHW output and codes.
// Its own function so that the sizes are locals and the pointers restrict:
// otherwise GCC reloads both after every uint8 store, which may alias them.
template <typename T, typename I>
inline void store_tile_nchw(const T* __restrict tb, const I* __restrict tc, int64_t Cp, int64_t Cout, int64_t P,
                            T* __restrict out, uint8_t* __restrict idx) {
  for (int64_t co = 0; co < Cout; ++co)
    for (int64_t pos = 0; pos < P; ++pos) {
      out[co * P + pos] = tb[pos * Cp + co];
      idx[co * P + pos] = static_cast<uint8_t>(tc[pos * Cp + co]);
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
  if (s.Cin == 1) return fused_forward_cin1<T>(x, w, b, out, idx, s);
  // Weights as wf[ky*3+kx][ci][co] (co zero-padded to Cp), bias as bp[co].
  std::vector<T> wf(9 * g.Cin * g.Cp, T(0)), bp(g.Cp, T(0));
  for (int64_t co = 0; co < g.Cout; ++co)
    for (int64_t ci = 0; ci < g.Cin; ++ci)
      for (int t = 0; t < 9; ++t) wf[(t * g.Cin + ci) * g.Cp + co] = w[(co * g.Cin + ci) * 9 + t];
  if (b != nullptr) std::copy(b, b + g.Cout, bp.begin());
  const int64_t Cin = g.Cin, Cout = g.Cout, Cp = g.Cp, Hp = g.Hp, Wp = g.Wp, P = Hp * Wp;
  const int64_t H = g.H, W = g.W, pad = g.pad;
  const ConvGeom<V> padded(s);  // with padding, each image goes through pack_image (cpu_conv.h)
  at::parallel_for(0, s.N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<T> xpad(pad != 0 ? Cin * padded.P : 0);
    std::vector<T> tb(P * Cp);  // pooled values [pos][co]
    std::vector<I> tc(P * Cp);  // winner codes [pos][co]
    for (int64_t n = n0; n < n1; ++n) {
      // Without padding the kernel reads x in place (channel stride cs, row stride rs).
      const T* xn = x + n * Cin * H * W;
      int64_t cs = H * W, rs = W;
      if (pad != 0) {
        pack_image(xn, xpad.data(), padded);
        xn = xpad.data();
        cs = padded.P;
        rs = padded.S;
      }
      for (int64_t py = 0; py < Hp; ++py)
        for (int64_t px = 0; px < Wp; ++px) {
          const T* xw = xn + 2 * py * rs + 2 * px;  // top-left of the 4x4 window, channel 0
          const int64_t pos = py * Wp + px;
          int64_t c0 = 0;
          for (; c0 + 2 * V <= Cp; c0 += 2 * V)
            fused_fwd_block<T, 2>(xw, cs, rs, Cin, Cp, wf.data() + c0, bp.data() + c0, tb.data() + pos * Cp + c0,
                                  tc.data() + pos * Cp + c0);
          if (c0 < Cp)
            fused_fwd_block<T, 1>(xw, cs, rs, Cin, Cp, wf.data() + c0, bp.data() + c0, tb.data() + pos * Cp + c0,
                                  tc.data() + pos * Cp + c0);
        }
      store_tile_nchw(tb.data(), tc.data(), Cp, Cout, P, out + n * Cout * P, idx + n * Cout * P);
    }
  });
}

// ---------------------------------------------------------------------------
// Winners-only backward.
//
// Only a pool winner whose ReLU passed (code < kPoolMasked) carries gradient, so
// instead of densifying the conv-output gradient (3/4 zeros) each pool window
// contributes through its winner only, on a channels-last padded image copy
// with the channel count padded to C (kClC, or 1 when Cin == 1, see ClRow):
//   X[iy][ix][c], c < C (channels >= Cin are zero)
// so the 3x3 patch of conv output (oy, ox) is three contiguous row segments of
// 3*C values (X + ((oy+ky)*Wpad + ox)*C, ky = 0..2), and so is one row of the
// weight gradient / weights laid out as [co][ky][kx][c].
//
//  * weight grad: loop "co, images of the chunk, windows" with the dW row of co
//    (3 x 3*C values: 9 AVX registers for C = 8) and the bias sum held in
//    registers for the whole loop; a window costs 9 loads + 9 FMAs with g
//    broadcast.  (Updating dW in memory per winner made consecutive winners
//    form store-to-load chains.)
//  * input grad: per image, scatter-add g * W[co] (same layout, in registers
//    per co) into a per-image channels-last dX buffer, then transpose it to
//    NCHW once.  Per-image buffer: no sharing between threads; the adds at one
//    location happen in a fixed order (co, then windows in a fixed order).
//  * determinism: weight/bias partials per chunk of kBatchChunk images, summed
//    in chunk order afterwards (as in cpu_conv.h), so results do not depend on
//    the number of threads.
//
// NaN/inf semantics: the conv outputs that lost their pool window contribute
// nothing here, where the dense formula (and stock autograd) computes 0 * x, so
// a NaN/inf in x (or in w, for dX) would not reach the gradient as it does in
// stock.  The caller therefore takes this path only for finite x (and w), see
// all_finite; other inputs go through the dense engine.
#define LF_ALWAYS_INLINE __attribute__((always_inline))
constexpr int kClC = 8;  // channel padding for 2..8 input channels (one AVX register of floats)

// Per-pixel channel count C of the layout: kClC, or 1 for a single input
// channel (padding it to 8 would waste 7/8 of every vector).  K: floats of a
// patch row as processed (3*C; for C == 1 rounded up to 4 = one SSE register,
// the 4th lane reads the next pixel and is discarded).
template <int C>
struct ClRow {
  static constexpr int K = C == 1 ? 4 : 3 * C;
  static constexpr int U = C == 1 ? 4 : 1;  // independent accumulator sets (FMA latency: 3 chains for C == 1)
};

// The fast path: floats with 1..kClC input channels.  float64 would need twice
// the registers for the same layout and goes through the dense engine.
template <typename T>
inline bool fused_backward_winners_ok(const ConvShape& s) {
  return std::is_same<T, float>::value && s.Cin >= 1 && s.Cin <= kClC;
}

// Copy image x (Cin x H x W, NCHW) into the interior of xcl (Hpad x Wpad x C),
// channel stride C >= Cin.  Border and channels >= Cin are not written.
template <typename T>
inline void pack_image_cl_stride(const T* __restrict x, T* __restrict xcl, const FusedGeom& g, int64_t C) {
  for (int64_t ci = 0; ci < g.Cin; ++ci)
    for (int64_t iy = 0; iy < g.H; ++iy) {
      const T* src = x + (ci * g.H + iy) * g.W;
      T* dst = xcl + ((iy + g.pad) * g.Wpad + g.pad) * C + ci;
      for (int64_t ix = 0; ix < g.W; ++ix) dst[ix * C] = src[ix];
    }
}

// The inverse: the interior of dX (Hpad x Wpad x C) -> grad_x (Cin x H x W, NCHW).
template <typename T>
inline void unpack_image_cl_stride(const T* __restrict dX, T* __restrict gx, const FusedGeom& g, int64_t C) {
  for (int64_t ci = 0; ci < g.Cin; ++ci)
    for (int64_t iy = 0; iy < g.H; ++iy) {
      const T* src = dX + ((iy + g.pad) * g.Wpad + g.pad) * C + ci;
      T* d = gx + (ci * g.H + iy) * g.W;
      for (int64_t ix = 0; ix < g.W; ++ix) d[ix] = src[ix * C];
    }
}

// pack_image_cl / unpack_image_cl: the strided loops above, except for floats
// with 8 channels (kClC), where whole 8 x 8 blocks (8 pixels x 8 channels) are
// transposed in registers: as strided scalar loops these two conversions took
// a quarter of conv2's backward (docs/measurements-behind-the-code.md).  A row is covered by
// blocks at 0, 8, ... and one last block ending at the row's end (overlapping
// the one before, writing the same values again); rows narrower than 8 pixels
// take the loops.
#if defined(__AVX__)
inline void transpose8x8(__m256 (&r)[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

// x (NCHW) -> the interior of xcl (Hpad x Wpad x C); in the transposing path the
// channels >= Cin are written as zeros (the loops leave them as they are: zero).
template <typename T, int C>
inline void pack_image_cl(const T* __restrict x, T* __restrict xcl, const FusedGeom& g) {
#if defined(__AVX__)
  if constexpr (std::is_same<T, float>::value && C == kClC) {
    if (g.W >= 8) {
      for (int64_t iy = 0; iy < g.H; ++iy) {
        float* dst = xcl + ((iy + g.pad) * g.Wpad + g.pad) * kClC;
        for (int64_t b = 0; b < g.W; b += 8) {
          const int64_t ix = std::min(b, g.W - 8);
          __m256 r[8];
          for (int ci = 0; ci < 8; ++ci)
            r[ci] = ci < g.Cin ? _mm256_loadu_ps(x + (ci * g.H + iy) * g.W + ix) : _mm256_setzero_ps();
          transpose8x8(r);
          for (int p = 0; p < 8; ++p) _mm256_storeu_ps(dst + (ix + p) * kClC, r[p]);
        }
      }
      return;
    }
  }
#endif
  pack_image_cl_stride(x, xcl, g, C);
}

// The interior of dX (Hpad x Wpad x C) -> grad_x (NCHW).
template <typename T, int C>
inline void unpack_image_cl(const T* __restrict dX, T* __restrict gx, const FusedGeom& g) {
#if defined(__AVX__)
  if constexpr (std::is_same<T, float>::value && C == kClC) {
    if (g.W >= 8) {
      for (int64_t iy = 0; iy < g.H; ++iy) {
        const float* src = dX + ((iy + g.pad) * g.Wpad + g.pad) * kClC;
        for (int64_t b = 0; b < g.W; b += 8) {
          const int64_t ix = std::min(b, g.W - 8);
          __m256 r[8];
          for (int p = 0; p < 8; ++p) r[p] = _mm256_loadu_ps(src + (ix + p) * kClC);
          transpose8x8(r);
          for (int ci = 0; ci < g.Cin; ++ci) _mm256_storeu_ps(gx + (ci * g.H + iy) * g.W + ix, r[ci]);
        }
      }
      return;
    }
  }
#endif
  unpack_image_cl_stride(dX, gx, g, C);
}

// A window's winner patch starts at X + 2*py*rs + 2*px*C + code_offset(code).
// Arithmetic, not a table or a conditional chain (which compiled to
// unpredictable branches).
inline int64_t code_offset(int code, int64_t rs, int64_t C) {
  return pool_code_dy(code & 3) * rs + pool_code_dx(code & 3) * C;
}

// Only a winner that passed ReLU (code < kPoolMasked) carries gradient, and on
// real data many do not (far more than on random test tensors: docs/measurements-behind-the-code.md).
// Whether a window is masked depends on the data, so it is never a branch (with
// one, conv1's weight gradient slowed down as the masked share grew).
// Two ways, by how much work a window is:
//  * C > 1 (a patch is 9 AVX vectors): compact_winners first lists the windows
//    that pass, and the loops run over that list only;
//  * C == 1 (a patch is 3 four-lane rows): listing costs more than the work it
//    saves, so every window is visited and a masked one contributes with g = 0
//    (passed_grad).
// Either way the result has the same bits as adding every window's g * patch:
// a masked window's contribution is +-0, added to sums that start at +0.

// g where the window passes, else 0 (an unconditional load, then keep_if).
template <typename T>
inline T passed_grad(const T* g, int code) {
  return keep_if(*g, code < kPoolMasked);
}

// The windows of one (image, channel) that pass: patch offsets off[i] and pooled
// gradients g[i], i < the returned count.  Branch-free: every window is written,
// the count advances only for one that passes.  Order: row by row; with
// kEvenThenOdd, a row's even windows before its odd ones (winners_input_grad).
template <typename T, int C, bool kEvenThenOdd>
inline int64_t compact_winners(const T* __restrict gc, const uint8_t* __restrict ic, int64_t Hp, int64_t Wp,
                               int64_t rs, int64_t* __restrict off, T* __restrict g) {
  constexpr int64_t kStep = kEvenThenOdd ? 2 : 1;
  int64_t n = 0;
  for (int64_t py = 0; py < Hp; ++py)
    for (int64_t first = 0; first < kStep; ++first)
      for (int64_t px = first; px < Wp; px += kStep) {
        const int code = ic[py * Wp + px];
        off[n] = 2 * py * rs + 2 * px * C + code_offset(code, rs, C);
        g[n] = gc[py * Wp + px];
        n += code < kPoolMasked;
      }
  return n;
}

// Thread-local scratch of compact_winners: one slot per window of a plane.
template <typename T>
struct WinnerList {
  std::vector<int64_t> off;
  std::vector<T> g;
  explicit WinnerList(int64_t windows) : off(windows), g(windows) {}
};

// dW row of one output channel over the windows of one image (gc/ic: its
// pooled gradient and codes), accumulated into acc[u] (U sets so that the FMA
// chains overlap), which the caller's loop keeps in registers; likewise the
// bias sums bias[u].  (A separate vectorised bias reduction cost more in its
// horizontal sum than these scalar adds.)
template <typename T, int C>
inline void winners_weight_grad(const T* __restrict X, const T* __restrict gc, const uint8_t* __restrict ic,
                                int64_t Hp, int64_t Wp, int64_t rs, WinnerList<T>& list,
                                T (&acc)[ClRow<C>::U][3][ClRow<C>::K], T (&bias)[ClRow<C>::U]) {
  constexpr int K = ClRow<C>::K, U = ClRow<C>::U;
  auto add = [&](T(&a)[3][K], T& b, T gi, const T* p) LF_ALWAYS_INLINE {
    b += gi;
    LF_UNROLL
    for (int r = 0; r < 3; ++r) {
      LF_SIMD
      for (int l = 0; l < K; ++l) a[r][l] += gi * p[r * rs + l];
    }
  };
  if constexpr (C == 1) {  // every window, set u = px mod U
    for (int64_t py = 0; py < Hp; ++py) {
      const T* Xr = X + 2 * py * rs;
      auto one = [&](T(&a)[3][K], T& b, int64_t px) LF_ALWAYS_INLINE {
        const int code = ic[py * Wp + px];
        add(a, b, passed_grad(gc + py * Wp + px, code), Xr + 2 * px * C + code_offset(code, rs, C));
      };
      int64_t px = 0;
      for (; px + U <= Wp; px += U) {
        LF_UNROLL
        for (int u = 0; u < U; ++u) one(acc[u], bias[u], px + u);
      }
      for (; px < Wp; ++px) one(acc[0], bias[0], px);
    }
  } else {  // the listed windows, set u = i mod U
    const int64_t n = compact_winners<T, C, false>(gc, ic, Hp, Wp, rs, list.off.data(), list.g.data());
    const int64_t* off = list.off.data();
    const T* g = list.g.data();
    int64_t i = 0;
    for (; i + U <= n; i += U) {
      LF_UNROLL
      for (int u = 0; u < U; ++u) add(acc[u], bias[u], g[i + u], X + off[i + u]);
    }
    for (; i < n; ++i) add(acc[0], bias[0], g[i], X + off[i]);
  }
}

// dX += g * W[co] at the windows of one (image, channel); wr (3 x K) is W[co].
// Only the 3*C real values of a row are written (no junk lane).  Per pooled
// row the even windows go first, then the odd ones: the patches of windows px
// and px+1 overlap, those of px and px+2 do not, so consecutive scatters do not
// wait on each other's stores.
template <typename T, int C>
inline void winners_input_grad(T* __restrict dX, const T* __restrict gc, const uint8_t* __restrict ic, int64_t Hp,
                               int64_t Wp, int64_t rs, WinnerList<T>& list, const T (&wr)[3][ClRow<C>::K]) {
  auto add = [&](T gi, T* p) LF_ALWAYS_INLINE {
    LF_UNROLL
    for (int r = 0; r < 3; ++r) {
      LF_SIMD
      for (int l = 0; l < 3 * C; ++l) p[r * rs + l] += gi * wr[r][l];
    }
  };
  if constexpr (C == 1) {
    for (int64_t py = 0; py < Hp; ++py)
      for (int64_t first = 0; first < 2; ++first)
        for (int64_t px = first; px < Wp; px += 2) {
          const int code = ic[py * Wp + px];
          add(passed_grad(gc + py * Wp + px, code), dX + 2 * py * rs + 2 * px * C + code_offset(code, rs, C));
        }
  } else {
    const int64_t n = compact_winners<T, C, true>(gc, ic, Hp, Wp, rs, list.off.data(), list.g.data());
    for (int64_t i = 0; i < n; ++i) add(list.g[i], dX + list.off[i]);
  }
}

// Backward of the fused op for fused_backward_winners_ok shapes, layout C.
// g_out/idx: (N, Cout, Hp, Wp).  gx (N, Cin, H, W), gw (Cout, Cin, 3, 3),
// gb (Cout): each may be null (not wanted; gb only together with gw).
template <typename T, int C>
void fused_backward_winners_c(const T* x, const T* w, const T* g_out, const uint8_t* idx, T* gx, T* gw, T* gb,
                              const ConvShape& s) {
  constexpr int K = ClRow<C>::K, U = ClRow<C>::U;
  const FusedGeom g(s, Lanes<T>::L1);
  const int64_t Cin = s.Cin, Cout = s.Cout, Hp = g.Hp, Wp = g.Wp, P = Hp * Wp, rs = g.Wpad * C;
  // Values per channels-last image, plus slack for the junk lane of C == 1.
  const int64_t img = g.Hpad * g.Wpad * C + K;
  const int64_t nw = Cout * Cin * 9;
  const bool want_w = gw != nullptr;
  if (want_w) {
    std::fill(gw, gw + nw, T(0));
    if (gb != nullptr) std::fill(gb, gb + Cout, T(0));
  }
  if (s.N == 0) return;
  // Weights as wcl[co][ky][kx*C + ci] (zero for ci >= Cin and the junk lane).
  std::vector<T> wcl(gx != nullptr ? Cout * 3 * K : 0, T(0));
  if (gx != nullptr)
    for (int64_t co = 0; co < Cout; ++co)
      for (int64_t ci = 0; ci < Cin; ++ci)
        for (int t = 0; t < 9; ++t) wcl[(co * 3 + t / 3) * K + (t % 3) * C + ci] = w[(co * Cin + ci) * 9 + t];
  const int64_t nchunks = ceil_div(s.N, kBatchChunk);
  std::vector<T> partial(want_w ? nchunks * (nw + Cout) : 0, T(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
    // Zeroed once: the border, the channels >= Cin and the slack are never written.
    std::vector<T> xcl(want_w ? kBatchChunk * img : 0, T(0));
    std::vector<T> dX(gx != nullptr ? img : 0);
    WinnerList<T> list(C > 1 ? P : 0);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t n0 = k * kBatchChunk, nb = std::min(s.N, n0 + kBatchChunk) - n0;
      if (want_w) {
        for (int64_t j = 0; j < nb; ++j) pack_image_cl<T, C>(x + (n0 + j) * Cin * s.H * s.W, xcl.data() + j * img, g);
        T* pw = partial.data() + k * (nw + Cout);
        for (int64_t co = 0; co < Cout; ++co) {
          T acc[U][3][K];
          LF_UNROLL
          for (int u = 0; u < U; ++u)
            LF_UNROLL
            for (int r = 0; r < 3; ++r) {
              LF_SIMD
              for (int l = 0; l < K; ++l) acc[u][r][l] = T(0);
            }
          T bias[U];
          LF_UNROLL
          for (int u = 0; u < U; ++u) bias[u] = T(0);
          for (int64_t j = 0; j < nb; ++j) {
            const int64_t src = ((n0 + j) * Cout + co) * P;
            winners_weight_grad<T, C>(xcl.data() + j * img, g_out + src, idx + src, Hp, Wp, rs, list, acc, bias);
          }
          // The U sets summed in a fixed order.
          for (int64_t ci = 0; ci < Cin; ++ci)
            for (int t = 0; t < 9; ++t) {
              T v = T(0);
              for (int u = 0; u < U; ++u) v += acc[u][t / 3][(t % 3) * C + ci];
              pw[(co * Cin + ci) * 9 + t] = v;
            }
          T bsum = T(0);
          for (int u = 0; u < U; ++u) bsum += bias[u];
          pw[nw + co] = bsum;
        }
      }
      if (gx != nullptr) {
        for (int64_t j = 0; j < nb; ++j) {
          std::fill(dX.begin(), dX.end(), T(0));
          for (int64_t co = 0; co < Cout; ++co) {
            T wr[3][K];
            LF_UNROLL
            for (int r = 0; r < 3; ++r) {
              LF_SIMD
              for (int l = 0; l < K; ++l) wr[r][l] = wcl[(co * 3 + r) * K + l];
            }
            const int64_t src = ((n0 + j) * Cout + co) * P;
            winners_input_grad<T, C>(dX.data(), g_out + src, idx + src, Hp, Wp, rs, list, wr);
          }
          // Channels-last padded -> NCHW (drop the border).
          unpack_image_cl<T, C>(dX.data(), gx + (n0 + j) * Cin * s.H * s.W, g);
        }
      }
    }
  });
  if (want_w) {
    for (int64_t k = 0; k < nchunks; ++k) {
      const T* pw = partial.data() + k * (nw + Cout);
      for (int64_t i = 0; i < nw; ++i) gw[i] += pw[i];
      if (gb != nullptr)
        for (int64_t co = 0; co < Cout; ++co) gb[co] += pw[nw + co];
    }
  }
}

template <typename T>
void fused_backward_winners(const T* x, const T* w, const T* g_out, const uint8_t* idx, T* gx, T* gw, T* gb,
                            const ConvShape& s) {
  if (s.Cin == 1)
    fused_backward_winners_c<T, 1>(x, w, g_out, idx, gx, gw, gb, s);
  else
    fused_backward_winners_c<T, kClC>(x, w, g_out, idx, gx, gw, gb, s);
}

}  // namespace cpu
}  // namespace lenet_fast
