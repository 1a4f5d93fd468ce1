// The lowbit family's inner loops, torch-free. Each kernel has up to three paths, chosen at build time:
// AVX-512 (VNNI for the integer GEMM), AVX2 (int16 operands; see int8_tile), and plain loops, which
// `make portable` (x86-64-v2) builds and tests. A build for an AMX CPU adds the tile GEMMs of
// vitk/lowbit_amx.h, chosen at run time.
//
// Integer GEMM (int8_linear, dynamic_int8_linear, int4_int8_linear). Weights are stored in blocks of
// 16 output channels, one 64-byte row per 4 values of k ("k-quad"): block b, k-quad q holds
// w[16b + j][4q + i] at byte 4j + i, which is exactly the operand layout of AVX-512 VNNI's vpdpbusd
// (lane j accumulates the dot product of 4 bytes). A last 64-byte row holds 16 int32 per-channel
// corrections. vpdpbusd multiplies unsigned by signed bytes, so one side is made unsigned:
//   * int8 activations: x + 128 (or the uint8 asymmetric codes) times signed weights; the zero point
//     comes back as acc - zp[m] * rowsum(w_q)[n], the correction row holding rowsum(w_q);
//   * int4 weights with int8 activations: the weights' 4-bit codes c + 8 in 0..15 times signed x,
//     corrected by acc - 8 * rowsum(x_q)[m] (the correction row holds ones).
// A micro-tile of MR rows x NR blocks keeps its MR x NR int32 accumulators in registers over the whole
// of K (k stepped by 4), then converts, scales, adds the bias, applies the activation and stores,
// so the int32 sums never reach memory. Without VNNI the same layouts go through plain loops.
//
// Float GEMM over decoded weights (int4_linear, shift_linear): a dot-product tile (MR rows of x
// against NR decoded weight rows, 16 values of k per vector), fp32 accumulation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define VITK_LOWBIT_VNNI 1
#else
#define VITK_LOWBIT_VNNI 0
#endif

// AVX2 without VNNI: the integer GEMM multiplies int16 copies of both operands (see int8_tile).
#if !VITK_LOWBIT_VNNI && defined(__AVX2__)
#define VITK_LOWBIT_WIDE 1
#else
#define VITK_LOWBIT_WIDE 0
#endif

#if defined(__BMI2__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace vitk {
namespace lowbit {

constexpr int kBlockN = 16;      // output channels per weight block
constexpr int kQuadBytes = 64;   // one k-quad of a block
// The most columns of K an int32 accumulator can take: |255 * 128| per product (uint8 x int8 with the
// +128 shift), so K * 32640 < 2^31.
constexpr int64_t kMaxK = 65536;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Bytes of one block of blocked int8 weights: ceil(K/4) k-quads plus the correction row.
inline int64_t block_bytes(int64_t K) { return (ceil_div(K, 4) + 1) * kQuadBytes; }

enum class Act : int { kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3 };

typedef float v16f __attribute__((vector_size(64)));
// The 16-lane helpers are forced inline: without AVX-512 a v16f argument is passed in memory, and GCC
// left them as out-of-line calls through the PLT inside the GEMM epilogue.
#define VITK_LB_INLINE inline __attribute__((always_inline))
typedef int32_t v16i __attribute__((vector_size(64)));

#if VITK_LOWBIT_VNNI
// acc += dot4(a unsigned bytes, b signed bytes) per int32 lane, in place. Written as asm with a
// read-write operand because GCC, given the intrinsic's three-operand form, keeps a tile's
// accumulators on the stack (two spills per vpdpbusd: half the speed).
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}
#endif

VITK_LB_INLINE v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
// Every lane x, one broadcast (v16f{} + x would add 0.f first, since -0.f + 0.f is +0.f; a loop over the
// lanes becomes 16 masked broadcasts).
VITK_LB_INLINE v16f splat(float x) { return v16f{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
// where_lt(x, y, a, b) = x < y ? a : b per lane (false for NaN, so NaN x keeps b). Without AVX-512,
// GCC lowers a 16-lane float comparison or select one lane at a time (vcomiss, vcmpltss, a blend per
// lane: a GELU epilogue took longer than the int8 GEMM before it); two 8-lane halves keep them to
// vcmpps and vblendvps.
#if defined(__AVX512F__)
VITK_LB_INLINE v16f where_lt(v16f x, v16f y, v16f a, v16f b) { return x < y ? a : b; }
#else
VITK_LB_INLINE v16f where_lt(v16f x, v16f y, v16f a, v16f b) {
  typedef float v8f __attribute__((vector_size(32)));
  v8f xh[2], yh[2], ah[2], bh[2], rh[2];
  std::memcpy(xh, &x, sizeof(x));
  std::memcpy(yh, &y, sizeof(y));
  std::memcpy(ah, &a, sizeof(a));
  std::memcpy(bh, &b, sizeof(b));
  for (int h = 0; h < 2; ++h) rh[h] = xh[h] < yh[h] ? ah[h] : bh[h];
  v16f r;
  std::memcpy(&r, rh, sizeof(r));
  return r;
}
#endif
VITK_LB_INLINE v16f where_gt(v16f x, v16f y, v16f a, v16f b) { return where_lt(y, x, a, b); }

// ---------------------------------------------------------------- activations (fp32, 16 lanes)
// c0 + c1 x + c2 x^2 + ..., in Horner's order (coefficients lowest power first).
VITK_LB_INLINE v16f horner(v16f, float c) { return splat(c); }
template <class... Rest>
VITK_LB_INLINE v16f horner(v16f x, float c, Rest... rest) {
  return horner(x, rest...) * x + c;
}

// 1 / q: on AVX-512 the 14-bit reciprocal estimate and one Newton step (about 1 ulp), since a zmm
// division issues only every ~16 cycles and the GELU epilogue's one division per 16 outputs then cost as
// much as a K = 768 int8 GEMM on AMX tiles.
VITK_LB_INLINE v16f reciprocal(v16f q) {
#if defined(__AVX512F__)
  const v16f r = reinterpret_cast<v16f>(_mm512_rcp14_ps(reinterpret_cast<__m512>(q)));
  return r * (2.f - q * r);
#else
  return 1.f / q;
#endif
}

// erf as x P(x^2) / Q(x^2) on x clamped to [-4, 4] (beyond, erf is 1 to fp32 precision): the rational
// minimax form XLA and Eigen use for fp32, absolute error below 5e-7. No exponential: with A&S 7.1.26 and
// an exp, a GELU epilogue cost as much as the int8 GEMM under it on Swin-T's K = 96 layers.
VITK_LB_INLINE v16f erf16(v16f x) {
  x = where_gt(x, splat(4.f), splat(4.f), x);
  x = where_lt(x, splat(-4.f), splat(-4.f), x);
  const v16f x2 = x * x;
  const v16f p = horner(x2, -1.60960333262415e-02f, -2.95459980854025e-03f, -7.34990630326855e-04f,
                        -5.69250639462346e-05f, -2.10102402082508e-06f, 2.77068142495902e-08f,
                        -2.72614225801306e-10f);
  const v16f q = horner(x2, -1.42647390514189e-02f, -7.37332916720468e-03f, -1.68282697438203e-03f,
                        -2.13374055278905e-04f, -1.45660718464996e-05f);
  // Exactly +-1 at the clamp (the reciprocal's last ulp would leave 1 + erf(-inf) = 6e-8, and GELU(-inf)
  // -inf instead of the reference's NaN).
  const v16f r = x * p * reciprocal(q);
  return where_lt(x, splat(-3.999f), splat(-1.f), where_gt(x, splat(3.999f), splat(1.f), r));
}

// tanh in the same rational form on u clamped to +-7.905 (XLA's and Eigen's fp32 coefficients; absolute
// error below 4e-7).
VITK_LB_INLINE v16f tanh16(v16f u) {
  const float lim = 7.90531110763549805f;
  u = where_gt(u, splat(lim), splat(lim), u);
  u = where_lt(u, splat(-lim), splat(-lim), u);
  const v16f u2 = u * u;
  const v16f p = horner(u2, 4.89352455891786e-03f, 6.37261928875436e-04f, 1.48572235717979e-05f,
                        5.12229709037114e-08f, -8.60467152213735e-11f, 2.00018790482477e-13f,
                        -2.76076847742355e-16f);
  const v16f q = horner(u2, 4.89352518554385e-03f, 2.26843463243900e-03f, 1.18534705686654e-04f,
                        1.19825839466702e-06f);
  const v16f r = u * p * reciprocal(q);
  return where_lt(u, splat(-7.9f), splat(-1.f), where_gt(u, splat(7.9f), splat(1.f), r));
}

// NaN stays NaN through every branch (the clamps above compare false for it, and so does v < 0).
VITK_LB_INLINE v16f activate(v16f v, Act act) {
  switch (act) {
    case Act::kRelu: return where_lt(v, splat(0.f), splat(0.f), v);
    case Act::kGelu: return 0.5f * v * (1.f + erf16(v * 0.70710678118654752f));
    case Act::kGeluTanh: return 0.5f * v * (1.f + tanh16(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    default: return v;
  }
}

// ---------------------------------------------------------------- per-token quantization
struct RowQuant {
  float scale;
  int32_t zero_point;
};

// Quantizes one fp32 row of K values into q (int8 when symmetric, else uint8 codes stored in the
// same bytes). Symmetric: scale = amax|x| / 127, q = clamp(round(x / scale), -127, 127). Asymmetric:
// the range [min(x, 0), max(x, 0)] over 255 steps, zero point round(-lo / scale) in 0..255. round is
// half to even; x / scale is a true division, as the reference's. A scale that would be 0 (a zero
// row, or one so small the division underflows) is 1. A row holding NaN or an infinity gets q = 0,
// zero point 0 and scale NaN, so every output computed from it is NaN.
// flip is xor-ed into every stored code (0x80 turns int8 codes into the biased uint8 VNNI operand).
inline RowQuant quantize_row(const float* x, int64_t K, bool symmetric, uint8_t* q, uint8_t flip = 0) {
  const int64_t K16 = K / 16 * 16;
  v16f vmax = splat(0.f), vmin = splat(0.f), bad = splat(0.f);
  for (int64_t k = 0; k < K16; k += 16) {
    v16f v = load16(x + k);
    bad += v - v;  // NaN as soon as one value is NaN or infinite
    vmax = where_gt(v, vmax, v, vmax);
    vmin = where_lt(v, vmin, v, vmin);
  }
  float hi = 0.f, lo = 0.f, nonfinite = 0.f;
  for (int l = 0; l < 16; ++l) {
    hi = std::max(hi, vmax[l]);
    lo = std::min(lo, vmin[l]);
    nonfinite += bad[l];
  }
  for (int64_t k = K16; k < K; ++k) {
    nonfinite += x[k] - x[k];
    hi = std::max(hi, x[k]);
    lo = std::min(lo, x[k]);
  }
  if (nonfinite != 0.f) {
    std::memset(q, flip, K);
    return {std::nanf(""), 0};
  }
  const float magic = 12582912.f;
  float scale;
  int32_t zp = 0;
  if (symmetric) {
    scale = std::max(hi, -lo) / 127.f;
  } else {
    scale = (hi - lo) / 255.f;
  }
  if (scale == 0.f) scale = 1.f;
  if (!symmetric) {
    float z = (-lo / scale + magic) - magic;
    zp = static_cast<int32_t>(std::min(std::max(z, 0.f), 255.f));
  }
  const float qlo = symmetric ? -127.f : 0.f, qhi = symmetric ? 127.f : 255.f;
  const float zf = static_cast<float>(zp);
  auto code = [&](v16f v) {
    v16f r = (v / scale + magic) - magic + zf;
    r = where_lt(r, splat(qlo), splat(qlo), r);
    r = where_gt(r, splat(qhi), splat(qhi), r);
    return __builtin_convertvector(r, v16i);
  };
  typedef uint8_t v16b __attribute__((vector_size(16)));
  const v16b vflip = v16b{} + flip;
  for (int64_t k = 0; k < K16; k += 16) {
    const v16b c = __builtin_convertvector(code(load16(x + k)), v16b) ^ vflip;
    std::memcpy(q + k, &c, 16);
  }
  if (K16 < K) {
    float tail[16] = {};
    std::memcpy(tail, x + K16, (K - K16) * sizeof(float));
    const v16b c = __builtin_convertvector(code(load16(tail)), v16b) ^ vflip;
    std::memcpy(q + K16, &c, K - K16);
  }
  return {scale, zp};
}

// ---------------------------------------------------------------- integer micro-tile
// Per-row inputs of a tile: the row's packed bytes (ceil(K/4) * 4 of them, the pad zero-contributing),
// its correction factor (acc - rowc * colc[n]), its fp32 scale, and where its outputs go.
struct IntRows {
  const uint8_t* a[6];
  const int16_t* a16[6];  // VITK_LOWBIT_WIDE: the same row widened to int16 (widen_row)
  int32_t rowc[6];
  float scale[6];
  float* out[6];  // where row i's 16 * NR fp32 outputs go: the output row itself, or a staging row
};

// Epilogue of one 16-channel vector: scale, bias, activation.
struct Epilogue {
  const float* w_scale;  // per output channel, or null (1)
  const float* bias;     // per output channel, or null
  Act act;
};

VITK_LB_INLINE v16f finish(v16f v, float row_scale, const Epilogue& ep, int64_t n0, int valid) {
  v16f ws = splat(1.f), bs = splat(0.f);
  if (valid == 16) {
    if (ep.w_scale) ws = load16(ep.w_scale + n0);
    if (ep.bias) bs = load16(ep.bias + n0);
  } else {
    for (int l = 0; l < valid; ++l) {
      if (ep.w_scale) ws[l] = ep.w_scale[n0 + l];
      if (ep.bias) bs[l] = ep.bias[n0 + l];
    }
  }
  v = v * row_scale * ws;
  if (ep.bias) v = v + bs;
  return activate(v, ep.act);
}

#if defined(__AVX512F__)
// The epilogue of 16 exact int32 sums of one row: minus the zero-point correction rowc * colc[n], then
// finish. Shared by the vpdpbusd tile and the AMX kernels, so both give the same bits.
VITK_LB_INLINE v16f finish_sums(__m512i acc, int32_t rowc, __m512i colc, float row_scale, const Epilogue& ep,
                                int64_t n0, int valid) {
  const __m512i c = _mm512_sub_epi32(acc, _mm512_mullo_epi32(_mm512_set1_epi32(rowc), colc));
  return finish(reinterpret_cast<v16f>(_mm512_cvtepi32_ps(c)), row_scale, ep, n0, valid);
}
#endif

#if VITK_LOWBIT_WIDE
// Bytes of one block widened to int16: the k-quads' 64 values each, then the correction row as is.
inline int64_t wide_block_bytes(int64_t K) { return ceil_div(K, 4) * kQuadBytes * 2 + kQuadBytes; }

inline void widen_block(const int8_t* src, int64_t KQ, bool is_unsigned, int16_t* dst) {
  for (int64_t i = 0; i < KQ * kQuadBytes; ++i)
    dst[i] = is_unsigned ? static_cast<int16_t>(static_cast<uint8_t>(src[i])) : static_cast<int16_t>(src[i]);
  std::memcpy(dst + KQ * kQuadBytes, src + KQ * kQuadBytes, kQuadBytes);
}

inline void widen_row(const uint8_t* a, int64_t n, bool is_signed, int16_t* dst) {
  for (int64_t i = 0; i < n; ++i)
    dst[i] = is_signed ? static_cast<int16_t>(static_cast<int8_t>(a[i])) : static_cast<int16_t>(a[i]);
}

// R rows against one widened weight block over KQ k-quads: each row's 16 channel sums.
template <int R>
inline void wide_rows(const int16_t* const* a, const int16_t* w, int64_t KQ, int32_t (*sums)[16]) {
  __m256i acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < 4; ++t) acc[r][t] = _mm256_setzero_si256();
  for (int64_t q = 0; q < KQ; ++q) {
    const int16_t* wq = w + q * kQuadBytes;
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) {
      int64_t a4;
      std::memcpy(&a4, a[r] + 4 * q, sizeof(a4));
      const __m256i av = _mm256_set1_epi64x(a4);
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t)
        acc[r][t] = _mm256_add_epi32(
            acc[r][t], _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 16 * t)), av));
    }
  }
  // acc[r][2h] holds channels 8h..8h+3 as lane pairs, acc[r][2h+1] channels 8h+4..8h+7: vphaddd adds the
  // pairs within 128-bit lanes, leaving 64-bit pieces (c0 c1)(c4 c5)(c2 c3)(c6 c7), which vpermq orders.
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums[r] + 8 * h),
                          _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][2 * h], acc[r][2 * h + 1]), 0xD8));
}
#endif

// MR rows x NR weight blocks over KQ k-quads. weight_unsigned: the weight bytes are the unsigned
// operand (int4 codes) and the activations the signed one; otherwise the reverse.
template <int MR, int NR, bool weight_unsigned>
inline void int8_tile(const IntRows& rows, const int8_t* w, int64_t block_stride, int64_t KQ, int64_t n0, int64_t N,
                      const Epilogue& ep) {
#if VITK_LOWBIT_VNNI
  __m512i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
  const uint8_t* a[MR];
  for (int i = 0; i < MR; ++i) a[i] = rows.a[i];
  for (int64_t q = 0; q < KQ; ++q) {
    __m512i wv[NR];
    for (int j = 0; j < NR; ++j)
      wv[j] = _mm512_loadu_si512(reinterpret_cast<const void*>(w + j * block_stride + q * kQuadBytes));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t a4;
      std::memcpy(&a4, a[i] + 4 * q, 4);
      const __m512i xb = _mm512_set1_epi32(a4);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = weight_unsigned ? dpbusd(acc[i][j], wv[j], xb) : dpbusd(acc[i][j], xb, wv[j]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    const __m512i colc = _mm512_loadu_si512(reinterpret_cast<const void*>(w + j * block_stride + KQ * kQuadBytes));
    const int64_t nj = n0 + 16 * j;
    const int valid = static_cast<int>(std::min<int64_t>(16, N - nj));
    for (int i = 0; i < MR; ++i) {
      const v16f v = finish_sums(acc[i][j], rows.rowc[i], colc, rows.scale[i], ep, nj, valid);
      std::memcpy(rows.out[i] + 16 * j, &v, sizeof(v));
    }
  }
#elif VITK_LOWBIT_WIDE
  // No vpdpbusd, and vpmaddubsw's int16 pair sums would saturate (255 * 128 * 2 > 2^15): both
  // operands come widened to int16 (widen_block, widen_row) and vpmaddwd multiplies them exactly.
  // 16 int16 of a k-quad row (4 channels x 4 k) fill a ymm; against the row's 4 activations repeated,
  // int32 lane 2c holds channel c's k 0-1 and lane 2c+1 its k 2-3, folded after the K loop. A row keeps
  // 4 ymm accumulators per weight block, so rows go two at a time, the weights as memory operands
  // (with three, GCC kept 8 of the 12 accumulators on the stack).
  for (int i0 = 0; i0 < MR; i0 += 2) {
    const int nrows = std::min(2, MR - i0);
    for (int j = 0; j < NR; ++j) {
      const int16_t* wj = reinterpret_cast<const int16_t*>(w + j * block_stride);
      int32_t sums[2][16];
      if (nrows == 2)
        wide_rows<2>(rows.a16 + i0, wj, KQ, sums);
      else
        wide_rows<1>(rows.a16 + i0, wj, KQ, sums);
      const int32_t* colc = reinterpret_cast<const int32_t*>(wj + KQ * kQuadBytes);
      const int64_t nj = n0 + 16 * j;
      const int valid = static_cast<int>(std::min<int64_t>(16, N - nj));
      for (int r = 0; r < nrows; ++r) {
        const int i = i0 + r;
        const __m256i rc = _mm256_set1_epi32(rows.rowc[i]);
        alignas(32) float f[16];
        for (int h = 0; h < 2; ++h) {
          const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colc + 8 * h));
          const __m256i d = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums[r] + 8 * h)),
                                             _mm256_mullo_epi32(rc, c));
          _mm256_store_ps(f + 8 * h, _mm256_cvtepi32_ps(d));
        }
        v16f v = load16(f);
        v = finish(v, rows.scale[i], ep, nj, valid);
        std::memcpy(rows.out[i] + 16 * j, &v, sizeof(v));
      }
    }
  }
#else
  int32_t acc[MR][NR][16] = {};
  for (int64_t q = 0; q < KQ; ++q)
    for (int j = 0; j < NR; ++j) {
      const int8_t* wq = w + j * block_stride + q * kQuadBytes;
      for (int i = 0; i < MR; ++i) {
        const uint8_t* a = rows.a[i] + 4 * q;
        for (int l = 0; l < 16; ++l) {
          int32_t s = 0;
          for (int t = 0; t < 4; ++t) {
            const int32_t wb = weight_unsigned ? static_cast<int32_t>(static_cast<uint8_t>(wq[4 * l + t]))
                                               : static_cast<int32_t>(wq[4 * l + t]);
            const int32_t ab = weight_unsigned ? static_cast<int32_t>(static_cast<int8_t>(a[t]))
                                               : static_cast<int32_t>(a[t]);
            s += wb * ab;
          }
          acc[i][j][l] += s;
        }
      }
    }
  for (int j = 0; j < NR; ++j) {
    int32_t colc[16];
    std::memcpy(colc, w + j * block_stride + KQ * kQuadBytes, sizeof(colc));
    const int64_t nj = n0 + 16 * j;
    const int valid = static_cast<int>(std::min<int64_t>(16, N - nj));
    for (int i = 0; i < MR; ++i) {
      v16f v;
      for (int l = 0; l < 16; ++l) v[l] = static_cast<float>(acc[i][j][l] - rows.rowc[i] * colc[l]);
      v = finish(v, rows.scale[i], ep, nj, valid);
      std::memcpy(rows.out[i] + 16 * j, &v, sizeof(v));
    }
  }
#endif
}

// ---------------------------------------------------------------- float micro-tile over a decoded panel
// The panel holds 16 * NR decoded output channels for every k, k-major: panel[k * ldp + c]. A tile of
// MR rows of x keeps MR x NR vectors of 16 fp32 sums in registers over the whole of K: per k, NR panel
// loads, MR broadcasts of x[i][k] and MR * NR fused multiply-adds (an outer product, as sgemm does).
template <int MR, int NR>
inline void f32_tile(const float* const* x, const float* panel, int64_t ldp, int64_t K, v16f (*out)[NR]) {
  v16f acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = splat(0.f);
  const float* xr[MR];
  for (int i = 0; i < MR; ++i) xr[i] = x[i];
  for (int64_t k = 0; k < K; ++k) {
    v16f wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load16(panel + k * ldp + 16 * j);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const v16f xb = splat(xr[i][k]);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] += xb * wv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) out[i][j] = acc[i][j];
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// AVX2 has 16 ymm registers, too few for MR x NR v16f sums: the Haswell-class sgemm tile instead, 6 rows
// x 16 channels (12 ymm accumulators, 2 panel loads and a broadcast), over one 16-channel block.
template <int MR>
__attribute__((noinline)) void f32_tile_avx2(const float* const* x, const float* panel, int64_t ldp, int64_t K, v16f* out) {
  static_assert(MR >= 1 && MR <= 6, "f32_tile_avx2: 1 to 6 rows");
  // Named sums, and out of line: inlined into the panel loop, GCC kept most of them on the stack (a
  // load and a store around every FMA); a call per 6 x 16 x K tile costs nothing.
  __m256 s0l = _mm256_setzero_ps(), s0h = s0l, s1l = s0l, s1h = s0l, s2l = s0l, s2h = s0l, s3l = s0l, s3h = s0l,
         s4l = s0l, s4h = s0l, s5l = s0l, s5h = s0l;
  const float* x0 = x[0];
  const float* x1 = x[MR > 1 ? 1 : 0];
  const float* x2 = x[MR > 2 ? 2 : 0];
  const float* x3 = x[MR > 3 ? 3 : 0];
  const float* x4 = x[MR > 4 ? 4 : 0];
  const float* x5 = x[MR > 5 ? 5 : 0];
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + k * ldp), w1 = _mm256_loadu_ps(panel + k * ldp + 8);
#define VITK_F32_ROW(i)                                   \
  if constexpr (MR > i) {                                 \
    const __m256 b = _mm256_broadcast_ss(x##i + k);       \
    s##i##l = _mm256_fmadd_ps(b, w0, s##i##l);            \
    s##i##h = _mm256_fmadd_ps(b, w1, s##i##h);            \
  }
    VITK_F32_ROW(0)
    VITK_F32_ROW(1)
    VITK_F32_ROW(2)
    VITK_F32_ROW(3)
    VITK_F32_ROW(4)
    VITK_F32_ROW(5)
#undef VITK_F32_ROW
  }
  const __m256 lo[6] = {s0l, s1l, s2l, s3l, s4l, s5l}, hi[6] = {s0h, s1h, s2h, s3h, s4h, s5h};
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(reinterpret_cast<float*>(out + i), lo[i]);
    _mm256_storeu_ps(reinterpret_cast<float*>(out + i) + 8, hi[i]);
  }
}

// The 16-entry table lookup of 8 codes: two 8-entry vpermps and a blend on the code's bit 3.
inline __m256 lookup16(__m256i code, __m256 lo, __m256 hi) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, code), b = _mm256_permutevar8x32_ps(hi, code);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
}

// f32_row_dot for AVX2: out[m] = sum_k x[m][k] * table_g(code[k]) for MT rows, x deinterleaved by 8
// (deinterleave(x, K, 8): per 16 values of k, the 8 even ones, then the 8 odd ones).
template <int MT>
inline void f32_row_dot_avx2(const float* const* xd, const uint8_t* row, int64_t K, int64_t G, const float* tables,
                             float* out) {
  // Even and odd halves in separate registers, as f32_row_dot.
  __m256 acc[MT], acc_odd[MT];
  for (int m = 0; m < MT; ++m) acc[m] = acc_odd[m] = _mm256_setzero_ps();
  const int64_t K16 = K / 16 * 16;
  const __m256i low = _mm256_set1_epi32(15);
  __m256 lo = _mm256_loadu_ps(tables), hi = _mm256_loadu_ps(tables + 8);
  const float* next_table = tables;
  int64_t next_group = G;
  for (int64_t k = 0; k < K16; k += 16) {
    if (k >= next_group) {  // G >= 32: at most one group starts per 16 values
      next_table += 16;
      lo = _mm256_loadu_ps(next_table);
      hi = _mm256_loadu_ps(next_table + 8);
      next_group += G;
    }
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2)));
    const __m256 we = lookup16(_mm256_and_si256(v, low), lo, hi);
    const __m256 wo = lookup16(_mm256_srli_epi32(v, 4), lo, hi);
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      acc[m] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xd[m] + k), acc[m]);
      acc_odd[m] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xd[m] + k + 8), acc_odd[m]);
    }
  }
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_add_ps(acc[m], acc_odd[m]);
  for (int m = 0; m < MT; ++m) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc[m]);
    float s = 0.f;
    for (int l = 0; l < 8; ++l) s += lanes[l];
    for (int64_t k = K16; k < K; ++k) s += xd[m][k] * tables[(k / G) * 16 + ((row[k >> 1] >> ((k & 1) * 4)) & 15)];
    out[m] = s;
  }
}
#endif

// ---------------------------------------------------------------- weight decoding
// 4-bit code of k in a packed row (low nibble = even k).
inline int nibble(const uint8_t* row, int64_t k) { return (row[k >> 1] >> ((k & 1) * 4)) & 15; }

// Column j of a k-major panel (panel[k * ldp + j], K values) from one packed row of 4-bit codes through
// a 16-entry table, one table per group of G values of k (tables[g * 16 + code]).
inline void decode_column(const uint8_t* row, int64_t K, int64_t G, const float* tables, float* panel, int64_t ldp) {
  for (int64_t g = 0; g < K / G; ++g) {
    const float* t = tables + g * 16;
    for (int64_t i = g * G / 2; i < (g + 1) * G / 2; ++i) {
      const uint8_t b = row[i];
      panel[(2 * i) * ldp] = t[b & 15];
      panel[(2 * i + 1) * ldp] = t[b >> 4];
    }
  }
}

// The 16 values of int4_linear's codes in one group: (code - zero) * scale, or signed codes * scale.
inline void int4_table(float scale, const float* zero, float* t) {
  // Built per channel and group, the table cost as much as a one-row GEMM over them when scalar.
#if defined(__AVX512F__)
  const __m512 codes = zero ? _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                            : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  _mm512_storeu_ps(t, _mm512_mul_ps(_mm512_sub_ps(codes, _mm512_set1_ps(zero ? *zero : 0.f)), _mm512_set1_ps(scale)));
#else
  if (zero) {
    const float z = *zero;
    for (int c = 0; c < 16; ++c) t[c] = (static_cast<float>(c) - z) * scale;
  } else {
    for (int c = 0; c < 16; ++c) t[c] = static_cast<float>((c ^ 8) - 8) * scale;
  }
#endif
}

// The powers of two of shift_linear's codes: 0 and 8 are zero, 1..7 are 2^-(c-1), 9..15 are -2^-(c-9).
inline void shift_table(float* t) {
  for (int c = 0; c < 16; ++c) {
    const int mag = c & 7;
    t[c] = mag == 0 ? 0.f : std::ldexp(c < 8 ? 1.f : -1.f, -(mag - 1));
  }
}

// The sum of n int8 values stored as bytes. (The byte loop was not vectorized: at K = 768 it cost
// int4_int8_linear a quarter of its GEMM.)
inline int32_t signed_byte_sum(const uint8_t* a, int64_t n) {
  int64_t k = 0, sum = 0;
#if defined(__AVX512BW__)
  // vpsadbw sums 8 unsigned bytes per lane: the bytes xor 0x80 are the values + 128.
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc = _mm512_setzero_si512();
  for (; k + 64 <= n; k += 64) {
    const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(reinterpret_cast<const void*>(a + k)), flip);
    acc = _mm512_add_epi64(acc, _mm512_sad_epu8(v, _mm512_setzero_si512()));
  }
  sum = _mm512_reduce_add_epi64(acc) - 128 * k;
#endif
  for (; k < n; ++k) sum += static_cast<int8_t>(a[k]);
  return static_cast<int32_t>(sum);
}

// ---------------------------------------------------------------- small-M kernels (weights read once)
// For a few rows of x the GEMM is bound by reading the weights, so these decode the packed rows in
// registers and never write a decoded weight: x is first laid out "deinterleaved" per chunk of 2C values
// of k (the C even k, then the C odd k), matching a chunk of C packed bytes whose low nibbles are the
// even k and high nibbles the odd k. The k past the last whole chunk stay in order.
template <typename T>
inline void deinterleave(const T* x, int64_t K, int64_t C, T* out) {
  const int64_t KC = K / (2 * C) * (2 * C);
  for (int64_t c = 0; c < KC; c += 2 * C)
    for (int64_t i = 0; i < C; ++i) {
      out[c + i] = x[c + 2 * i];
      out[c + C + i] = x[c + 2 * i + 1];
    }
  for (int64_t k = KC; k < K; ++k) out[k] = x[k];
}

#if VITK_LOWBIT_VNNI
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// out[m] = sum_k x[m][k] * table_g(code[k]) for MT rows (x deinterleaved by 16), one packed row of
// codes; the table of 16 values changes every G values of k (a vpermps from a register per 16 codes).
template <int MT>
inline void f32_row_dot(const float* const* xd, const uint8_t* row, int64_t K, int64_t G, const float* tables,
                        float* out) {
  // U chunks of 32 values per iteration and the even and odd halves of each into separate registers:
  // with one chain of fma per row, a row or two ran at the fma latency.
  constexpr int U = MT <= 4 ? 2 : 1;
  __m512 acc[U][2][MT];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < MT; ++m) acc[u][0][m] = acc[u][1][m] = _mm512_setzero_ps();
  const int64_t K32 = K / 32 * 32;
  const __m512i low = _mm512_set1_epi32(15);
  auto chunk = [&](int u, int64_t k, __m512 tbl) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
    const __m512 we = _mm512_permutexvar_ps(_mm512_and_si512(v, low), tbl);
    const __m512 wo = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tbl);
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      acc[u][0][m] = _mm512_fmadd_ps(we, _mm512_loadu_ps(xd[m] + k), acc[u][0][m]);
      acc[u][1][m] = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xd[m] + k + 16), acc[u][1][m]);
    }
  };
  // Groups of G >= 32 values (a multiple of 32, or G = K: one group), each with its table.
  const float* table = tables;
  for (int64_t g0 = 0; g0 < K32; g0 += G, table += 16) {
    const __m512 tbl = _mm512_loadu_ps(table);
    const int64_t g1 = std::min(K32, g0 + G);
    int64_t k = g0;
    for (; k + 32 * U <= g1; k += 32 * U)
#pragma GCC unroll 2
      for (int u = 0; u < U; ++u) chunk(u, k + 32 * u, tbl);
    for (; k < g1; k += 32) chunk(0, k, tbl);
  }
  for (int m = 0; m < MT; ++m) {
    __m512 t = _mm512_add_ps(acc[0][0][m], acc[0][1][m]);
    for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, _mm512_add_ps(acc[u][0][m], acc[u][1][m]));
    float s = hsum(t);
    for (int64_t k = K32; k < K; ++k) s += xd[m][k] * tables[(k / G) * 16 + ((row[k >> 1] >> ((k & 1) * 4)) & 15)];
    out[m] = s;
  }
}

// out[m] = sum_k x_q[m][k] * (code[k] + 8) for MT rows of int8 x (deinterleaved by 64), one packed row of
// signed 4-bit codes (their unsigned form, the nibble xor 8, is vpdpbusd's unsigned operand).
template <int MT>
inline void int4_row_dot(const int8_t* const* xd, const uint8_t* row, int64_t K, int32_t* out) {
  __m512i acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_si512();
  const int64_t K128 = K / 128 * 128;
  const __m512i low = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(8);
  for (int64_t k = 0; k < K128; k += 128) {
    const __m512i b = _mm512_loadu_si512(reinterpret_cast<const void*>(row + k / 2));
    const __m512i we = _mm512_xor_si512(_mm512_and_si512(b, low), eight);
    const __m512i wo = _mm512_xor_si512(_mm512_and_si512(_mm512_srli_epi16(b, 4), low), eight);
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      acc[m] = dpbusd(acc[m], we, _mm512_loadu_si512(reinterpret_cast<const void*>(xd[m] + k)));
      acc[m] = dpbusd(acc[m], wo, _mm512_loadu_si512(reinterpret_cast<const void*>(xd[m] + k + 64)));
    }
  }
  for (int m = 0; m < MT; ++m) {
    int32_t s = _mm512_reduce_add_epi32(acc[m]);
    for (int64_t k = K128; k < K; ++k) s += static_cast<int32_t>(xd[m][k]) * (((row[k >> 1] >> ((k & 1) * 4)) & 15) ^ 8);
    out[m] = s;
  }
}
#endif

#if defined(__AVX2__) && !VITK_LOWBIT_VNNI
// int4_row_dot for AVX2, x deinterleaved by 32. vpmaddubsw is exact here (the unsigned codes are at most
// 15, so a pair sums to at most 2 * 15 * 128), and so is the sum of two of its results before vpmaddwd.
template <int MT>
inline void int4_row_dot_avx2(const int8_t* const* xd, const uint8_t* row, int64_t K, int32_t* out) {
  __m256i acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_si256();
  const int64_t K64 = K / 64 * 64;
  const __m256i low = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
  for (int64_t k = 0; k < K64; k += 64) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k / 2));
    const __m256i we = _mm256_xor_si256(_mm256_and_si256(b, low), eight);
    const __m256i wo = _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), low), eight);
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      const __m256i pe = _mm256_maddubs_epi16(we, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xd[m] + k)));
      const __m256i po = _mm256_maddubs_epi16(wo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xd[m] + k + 32)));
      acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(_mm256_add_epi16(pe, po), ones));
    }
  }
  for (int m = 0; m < MT; ++m) {
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[m]);
    int32_t s = 0;
    for (int l = 0; l < 8; ++l) s += lanes[l];
    for (int64_t k = K64; k < K; ++k) s += static_cast<int32_t>(xd[m][k]) * (((row[k >> 1] >> ((k & 1) * 4)) & 15) ^ 8);
    out[m] = s;
  }
}
#endif

// Blocked int8 weights of rows [n0, n0 + 16) from 4-bit codes, as the unsigned operand: code + 8
// of the signed code (= the nibble xor 8), the correction row all ones. Rows past N and k past K are 0.
inline void block_int4_codes(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t N, int64_t K, uint8_t* blk) {
  const int64_t KQ = ceil_div(K, 4), K4 = K / 4;
  if (n0 + 16 > N || K4 < KQ) std::memset(blk, 0, KQ * kQuadBytes);
  for (int j = 0; j < 16 && n0 + j < N; ++j) {
    const uint8_t* row = w + (n0 + j) * row_bytes;
    uint8_t* dst = blk + 4 * j;
    // Two packed bytes (4 codes) become 4 bytes, one per code, each xor 8.
    for (int64_t q = 0; q < K4; ++q) {
      uint32_t v = static_cast<uint32_t>(row[2 * q]) | (static_cast<uint32_t>(row[2 * q + 1]) << 8);
#if defined(__BMI2__)
      v = _pdep_u32(v, 0x0F0F0F0Fu);
#else
      v = (v & 0xFu) | ((v & 0xF0u) << 4) | ((v & 0xF00u) << 8) | ((v & 0xF000u) << 12);
#endif
      v ^= 0x08080808u;
      std::memcpy(dst + q * kQuadBytes, &v, 4);
    }
    for (int64_t k = 4 * K4; k < K; ++k) dst[(k >> 2) * kQuadBytes + (k & 3)] = static_cast<uint8_t>(nibble(row, k) ^ 8);
  }
  int32_t ones[16];
  for (int l = 0; l < 16; ++l) ones[l] = 1;
  std::memcpy(blk + KQ * kQuadBytes, ones, sizeof(ones));
}

// Blocked int8 weights of rows [n0, n0 + 16) of a row-major [N, K] int8 matrix, with rowsum(w) in the
// correction row.
inline void block_int8(const int8_t* w, int64_t row_stride, int64_t n0, int64_t N, int64_t K, int8_t* blk) {
  const int64_t KQ = ceil_div(K, 4);
  std::memset(blk, 0, KQ * kQuadBytes);
  int32_t sums[16] = {};
  for (int j = 0; j < 16 && n0 + j < N; ++j) {
    const int8_t* row = w + (n0 + j) * row_stride;
    int32_t s = 0;
    for (int64_t k = 0; k < K; ++k) {
      blk[(k >> 2) * kQuadBytes + 4 * j + (k & 3)] = row[k];
      s += row[k];
    }
    sums[j] = s;
  }
  std::memcpy(blk + KQ * kQuadBytes, sums, sizeof(sums));
}

}  // namespace lowbit
}  // namespace vitk
