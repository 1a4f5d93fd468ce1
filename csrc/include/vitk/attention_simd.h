// The CPU attention core, layer 1: constants, aligned fp32 buffers and the 16-lane SIMD row
// operations of the softmax (exp with gradual underflow, row max / exp-sum / scale / dS, dot
// products, padded adds, streamed output rows). AVX-512 intrinsics where the target has them,
// otherwise portable scalar loops written so that the compiler vectorizes them at any width.
// Torch-free.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "vitk/tiling.h"

namespace vitk {
namespace attn {

constexpr int64_t kLanes = 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Rows and panels of the packed buffers are whole 16-lane vectors.
inline int64_t pad_lanes(int64_t n) { return round_up(std::max<int64_t>(n, 1), kLanes); }

// ------------------------------------------------------------------------------ buffers

// A float buffer whose data starts on a 64-byte boundary, so padded rows are cache-line aligned and
// full-vector loads never split lines. Grows only; contents are not preserved across grow().
class Buffer {
 public:
  float* grow(int64_t n) {
    if (n > cap_) {
      store_.assign(static_cast<size_t>(n + 16), 0.f);
      cap_ = n;
      const uintptr_t p = reinterpret_cast<uintptr_t>(store_.data());
      data_ = store_.data() + ((64 - (p & 63)) & 63) / sizeof(float);
    }
    return data_;
  }
  // Grows and zeroes the first n floats.
  float* zeros(int64_t n) {
    float* p = grow(n);
    std::fill(p, p + n, 0.f);
    return p;
  }
  float* data() const { return data_; }

 private:
  std::vector<float> store_;
  float* data_ = nullptr;
  int64_t cap_ = 0;
};

// ------------------------------------------------------------------------------ 16-lane SIMD

namespace simd {

#ifdef __AVX512F__

using vf = __m512;
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vf x) { _mm512_storeu_ps(p, x); }
inline vf set1(float s) { return _mm512_set1_ps(s); }
inline vf zero() { return _mm512_setzero_ps(); }
inline vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf max(vf a, vf b) { return _mm512_max_ps(a, b); }
inline float hmax(vf x) { return _mm512_reduce_max_ps(x); }
inline float hsum(vf x) { return _mm512_reduce_add_ps(x); }

// e^x to about 2 ulp, with gradual underflow as in eager softmax: the 2^n scaling is one scalef,
// which rounds into the denormals, so a key 100 logits below the row maximum keeps its tiny nonzero
// weight (an inf value there makes inf, as in eager and the float64 reference, not 0 * inf = NaN).
// Lanes below -104 (where e^x < 2^-150 rounds to 0; also -inf, whose reduction would be NaN) are
// zeroed by the same masked scalef; inf above 88.7; NaN stays NaN. n = round(x log2 e),
// |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (truncation < 1.3e-7).
inline vf exp(vf x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, set1(-104.f), _CMP_NLT_UQ);
  const vf n = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf r = _mm512_fnmadd_ps(n, set1(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, set1(-2.12194440e-4f), r);
  vf p = set1(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, set1(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, set1(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, set1(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, set1(0.5f));
  p = _mm512_fmadd_ps(p, r, set1(1.f));
  p = _mm512_fmadd_ps(p, r, set1(1.f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

#else  // portable: scalar code over whole rows, which the compiler vectorizes at any width

// Same scheme as the AVX-512 exp, branch-free so that row loops vectorize (GCC will not if-convert
// a clamp next to the bit manipulation): n = round(x log2 e) is read off the low mantissa bits of
// t = x log2 e + 1.5 * 2^23, and 2^n is applied as two factors built in the exponent field,
// 2^max(n, -126) * 2^min(n + 126, 0), so that results round into the denormals as the AVX-512
// scalef does. Lanes with x < -104 (where e^x rounds to 0; also -inf) are cleared by a mask made
// from the sign of x + 104; NaN stays NaN. Meant for softmax arguments (x <= ~0): no overflow
// handling above 88.
inline float exp1(float x) {
  const float t = x * 1.44269504088896341f + 12582912.f;
  const float n = t - 12582912.f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  uint32_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const int32_t ni = static_cast<int32_t>(tb - 0x4B400000u);   // n, from t's low mantissa bits
  const int32_t n1 = ni < -126 ? -126 : ni, n2 = ni - n1;       // n2 in [-24, 0] where it matters
  const uint32_t e1 = static_cast<uint32_t>(n1 + 127) << 23;
  const uint32_t e2 = static_cast<uint32_t>((n2 < -126 ? -126 : n2) + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &e1, sizeof(s1));
  std::memcpy(&s2, &e2, sizeof(s2));
  const float y = p * s1 * s2, lo = x + 104.f;
  uint32_t yb, lb, xb;
  std::memcpy(&yb, &y, sizeof(yb));
  std::memcpy(&lb, &lo, sizeof(lb));
  std::memcpy(&xb, &x, sizeof(xb));
  // A NaN x (whose sign bit may be set: x86's default NaN is negative) is kept: y is NaN there.
  const uint32_t nan = static_cast<uint32_t>(-static_cast<int32_t>((xb & 0x7FFFFFFFu) > 0x7F800000u));
  yb &= ~(static_cast<uint32_t>(static_cast<int32_t>(lb) >> 31) & ~nan);
  float out;
  std::memcpy(&out, &yb, sizeof(out));
  return out;
}

#endif

// Row operations of the softmax on x[0, n), where the row buffer extends to n rounded up to 16.
// Lanes past n are never read as data: the AVX-512 versions load the last vector masked (-inf
// fill), so nothing has to be written there first (scalar stores right before a vector load of the
// same line would stall on store forwarding). The portable versions keep 16 independent partial
// results so that the reductions vectorize without reordering any floating-point sum.
#ifdef __AVX512F__
inline __mmask16 tail_mask(int64_t rem) { return rem >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1u); }
inline vf load_or_neginf(const float* x, int64_t rem) {
  return rem >= 16 ? load(x) : _mm512_mask_loadu_ps(set1(kNegInf), tail_mask(rem), x);
}
#endif

inline float row_max(const float* x, int64_t n) {
#ifdef __AVX512F__
  vf m = load_or_neginf(x, n);
  for (int64_t j = kLanes; j < n; j += kLanes) m = max(m, load_or_neginf(x + j, n - j));
  return hmax(m);
#else
  float m[16];
  for (int l = 0; l < 16; ++l) m[l] = kNegInf;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) m[l] = std::max(m[l], x[j + l]);
  for (; j < n; ++j) m[0] = std::max(m[0], x[j]);
  float r = m[0];
  for (int l = 1; l < 16; ++l) r = std::max(r, m[l]);
  return r;
#endif
}
// x = exp(x - m) on [0, n), 0 on [n, pad(n)); returns the sum.
inline float row_exp_sum(float* x, int64_t n, float m) {
#ifdef __AVX512F__
  const vf mv = set1(m);
  vf sum = zero();
  for (int64_t j = 0; j < n; j += kLanes) {
    const vf e = exp(sub(load_or_neginf(x + j, n - j), mv));
    store(x + j, e);
    sum = add(sum, e);
  }
  return hsum(sum);
#else
  float acc[16] = {};
  const int64_t np = round_up(n, 16);
  for (int64_t j = n; j < np; ++j) x[j] = kNegInf;
  for (int64_t j = 0; j < np; j += 16)
    for (int l = 0; l < 16; ++l) {
      x[j + l] = exp1(x[j + l] - m);
      acc[l] += x[j + l];
    }
  float r = 0.f;
  for (int l = 0; l < 16; ++l) r += acc[l];
  return r;
#endif
}
// x = exp(x - m) on [0, n), 0 on [n, pad(n)).
inline void row_exp(float* x, int64_t n, float m) {
#ifdef __AVX512F__
  const vf mv = set1(m);
  for (int64_t j = 0; j < n; j += kLanes) store(x + j, exp(sub(load_or_neginf(x + j, n - j), mv)));
#else
  const int64_t np = round_up(n, 16);
  for (int64_t j = n; j < np; ++j) x[j] = kNegInf;
  for (int64_t j = 0; j < np; ++j) x[j] = exp1(x[j] - m);
#endif
}
// x *= a.
inline void row_scale(float* x, int64_t n, float a) {
#ifdef __AVX512F__
  const vf av = set1(a);
  for (int64_t j = 0; j < n; j += kLanes) store(x + j, mul(load(x + j), av));
#else
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
#endif
}
// dp = p * (dp - d).
inline void row_ds(const float* __restrict p, float* __restrict dp, int64_t n, float d) {
#ifdef __AVX512F__
  const vf dv = set1(d);
  for (int64_t j = 0; j < n; j += kLanes) store(dp + j, mul(load(p + j), sub(load(dp + j), dv)));
#else
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - d);
#endif
}

// sum a[j] b[j] over whole vectors covering [0, n) (the caller zero-pads both to n rounded to 16).
// Used for Drow = rowsum(dO * O); 16 independent partial sums, so it vectorizes portably too.
inline float row_dot(const float* __restrict a, const float* __restrict b, int64_t n) {
#ifdef __AVX512F__
  vf acc = zero();
  for (int64_t j = 0; j < n; j += kLanes) acc = fmadd(load(a + j), load(b + j), acc);
  return hsum(acc);
#else
  float acc[16] = {};
  const int64_t np = round_up(n, 16);
  for (int64_t j = 0; j < np; j += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[j + l] * b[j + l];
  float r = 0.f;
  for (int l = 0; l < 16; ++l) r += acc[l];
  return r;
#endif
}

// dst[j] += a[j] over whole vectors covering [0, n): the caller guarantees that all three arrays
// extend to n rounded up to 16 (padding lanes of a score tile are never read as data).
inline void add_padded(float* __restrict dst, const float* __restrict a, int64_t n) {
#ifdef __AVX512F__
  for (int64_t j = 0; j < n; j += kLanes) store(dst + j, add(load(dst + j), load(a + j)));
#else
  const int64_t np = round_up(n, 16);
  for (int64_t j = 0; j < np; ++j) dst[j] += a[j];
#endif
}
// dst[j] += a[j] + b[j], same contract.
inline void add2_padded(float* __restrict dst, const float* __restrict a, const float* __restrict b, int64_t n) {
#ifdef __AVX512F__
  for (int64_t j = 0; j < n; j += kLanes) store(dst + j, add(load(dst + j), add(load(a + j), load(b + j))));
#else
  const int64_t np = round_up(n, 16);
  for (int64_t j = 0; j < np; ++j) dst[j] += a[j] + b[j];
#endif
}

// Final fp32 output rows (megabytes per call, read by the next layer, not by this kernel): stored
// around the caches with whole-line streaming stores when the row is whole vectors on a 64-byte
// boundary, so they cost no read-for-ownership of the destination lines, which were the hottest
// instructions of the axial and reduced forwards. dst[j] = src[j] * mult, j < n. A worker that
// streamed calls stream_fence() before it ends, so the rows are visible once the region joins.
inline void stream_row(float* __restrict dst, const float* __restrict src, int64_t n, float mult = 1.f) {
#ifdef __AVX512F__
  const vf m = set1(mult);
  if (n % kLanes == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
    for (int64_t j = 0; j < n; j += kLanes) _mm512_stream_ps(dst + j, mul(load(src + j), m));
    return;
  }
  for (int64_t j = 0; j < n; j += kLanes) {
    const __mmask16 t = tail_mask(n - j);
    _mm512_mask_storeu_ps(dst + j, t, mul(_mm512_maskz_loadu_ps(t, src + j), m));
  }
#else
  for (int64_t j = 0; j < n; ++j) dst[j] = src[j] * mult;
#endif
}
inline void stream_fence() {
#ifdef __AVX512F__
  _mm_sfence();
#endif
}

}  // namespace simd

// While alive, results that underflow fp32 flush to zero on this thread (MXCSR FTZ), when `on`.
// Softmax weights of masked keys (e^-100 under Swin's shift mask) are denormals, and on Intel cores
// each one costs a microcode assist: a shifted Swin-T stage-1 window took 4.5x as long as an unshifted
// one. Inputs are still read exactly (no DAZ). Callers turn it on only where a flushed weight cannot
// matter (flush_is_negligible in attention_driver.h).
class FlushUnderflow {
 public:
  explicit FlushUnderflow(bool on) : on_(on) {
#if defined(__SSE__)
    if (on_) {
      saved_ = _mm_getcsr();
      _mm_setcsr(saved_ | 0x8000u);
    }
#endif
  }
  ~FlushUnderflow() {
#if defined(__SSE__)
    if (on_) _mm_setcsr(saved_);
#endif
  }
  FlushUnderflow(const FlushUnderflow&) = delete;
  FlushUnderflow& operator=(const FlushUnderflow&) = delete;

 private:
  bool on_;
  unsigned saved_ = 0;
};

}  // namespace attn
}  // namespace vitk
