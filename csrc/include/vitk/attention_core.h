// The attention core of the CPU kernels: one online-softmax loop over fp32 tiles, written once and
// specialised per family by a score modifier. Torch-free (the families pack their tensors into the
// fp32 buffers described below and unpack the results), so every attention family -- shifted
// windows, varlen segments, polyline / decay / Gaussian-mixture masks, reduced attention -- runs
// the same micro-kernels and the same softmax arithmetic.
//
// Problem. One head of one attention problem: M queries against N keys, q/k of width dqk, v of
// width dv (dqk and dv independent, either may be 1). The family packs, in fp32:
//   q   [M][ldq]     query rows already multiplied by `scale`
//   kt  [dqk][ldkt]  keys transposed, so the score loop vectorizes over keys (ldkt >= pad(N))
//   v   [N][ldv]     values (forward), ldv = pad(dv)
// and for the backward additionally k [N][ldq] (rows), vt [dv][ldkt], dO [M][ldv], lse [M] and
// Drow [M] = rowsum(dO * O). "pad(n)" is n rounded up to 16 lanes; every padding lane/column is
// zero, which the micro-kernels rely on (they always compute whole 16-lane vectors).
//
// Scores. The core computes the raw tile R = (scale q) k^T for a block of query rows [q0, q0+m)
// and keys [k0, k0+n) (problem-local indices) and hands it to the modifier, which turns it in place
// into the final logits (add a bias, a mask, -inf for absent keys; or multiply, for families whose
// mask scales the scores). The softmax runs on those logits; lse = log-sum-exp of each row's logits
// is saved for the backward, never the probabilities.
//
// Modifier interface (a template parameter; see NoModifier):
//   static constexpr bool kNeedsRaw;   // backward() needs the raw tile R (multiplicative modifiers)
//   void forward(int64_t q0, int64_t m, int64_t k0, int64_t n, float* s, int64_t lds);
//        s[i*lds + j] (i < m, j < n) holds R for query q0+i, key k0+j; replace it by the logit
//        (-inf: the key is absent for that query). Row padding lanes j in [n, pad(n)) exist and are
//        ignored afterwards, so a modifier may process whole 16-lane vectors.
//   void backward(int64_t q0, int64_t m, int64_t k0, int64_t n, const float* raw, float* ds,
//                 int64_t lds, bool param_grads);
//        ds holds dLoss/dLogits for the same tile (raw: R when kNeedsRaw, else nullptr); its padding
//        lanes are exact zeros. Replace ds by dLoss/dR (an additive modifier leaves it alone; a
//        multiplicative L = R * w writes ds * w and accumulates ds * R into dw) and, when
//        param_grads, accumulate the gradients of the modifier's own parameters. Across a whole
//        backward the core passes param_grads = true exactly once per tile (also in the two-pass
//        schedule), so parameter gradients are never counted twice.
// A modifier is a per-task object: the core calls it from one thread only, and in a fixed order for
// a given problem, so a modifier that accumulates per task is deterministic.
//
// Prefetching. A family that gathers rows from large strided tensors queues the next task's cache
// lines in a PrefetchQueue and hands it to the problem; the core issues a few per query row.
#pragma once

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>

#include "vitk/tiling.h"

namespace vitk {
namespace attn {

constexpr int64_t kLanes = 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

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

// e^x to about 2 ulp: exactly 0 below -87 (so the -inf logits of absent keys give exactly 0 and no
// denormal ever enters the products), inf above 88.7, NaN stays NaN. 2^n * e^r with
// n = round(x log2 e), |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (truncation < 1.3e-7),
// and the 2^n scaling and the zeroing done together by one masked scalef.
inline vf exp(vf x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, set1(-87.f), _CMP_NLT_UQ);
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
// t = x log2 e + 1.5 * 2^23, 2^n is built in the exponent field, and lanes with x < -87 (where that
// field would underflow; also -inf) are cleared by a mask made from the sign of x + 87. Meant for
// softmax arguments (x <= ~0): no overflow handling above 88.
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
  const uint32_t e = (tb - 0x4B400000u + 127u) << 23;
  float sc;
  std::memcpy(&sc, &e, sizeof(sc));
  const float y = p * sc, lo = x + 87.f;
  uint32_t yb, lb;
  std::memcpy(&yb, &y, sizeof(yb));
  std::memcpy(&lb, &lo, sizeof(lb));
  yb &= ~static_cast<uint32_t>(static_cast<int32_t>(lb) >> 31);
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

// ------------------------------------------------------------------------------ micro-kernels
//
// One register-blocked kernel serves every product of the forward and backward:
//   C[r][0:16V) (=|+=) sum_{k<K} a(r, k) * B[k*ldb + 0:16V),   r < R,
// with a(r, k) = A[r*astride + k] (a row-major A) or, when ATrans, A[k*astride + r] (A read
// transposed, so the R broadcasts of one k are adjacent). S = Q K^T, dP = dO V^T (B = K^T / V^T), O += P V and
// dQ += dS K (B = V / K rows) use row-major A; dV += P^T dO and dK += dS^T Q use ATrans. The R x V
// accumulators stay in registers across the whole K loop; B rows are streamed once per row group.

#ifdef __AVX512F__
// Panels of at most 3 vectors with 8 rows (24 accumulators out of 32 zmm registers) measured
// faster than wider panels with fewer rows on Zen 4, e.g. 1.7x for P V with dv = 80 (5 vectors:
// panels 3 + 2 at 8 rows, against one panel at 4 rows): the broadcasts of A are shared by more FMAs.
constexpr int kMaxV = 3;      // widest panel, in vectors
constexpr int kAccRegs = 24;  // accumulator budget out of 32 zmm registers
#else
constexpr int kMaxV = 4;
constexpr int kAccRegs = 4;
#endif
constexpr int kMaxR = 8;

constexpr int rows_for(int V) { return std::max(1, std::min(kMaxR, kAccRegs / V)); }

#ifdef __AVX512F__
template <int R, int V, bool Acc, bool ATrans>
inline void micro(const float* __restrict A, int64_t astride, const float* __restrict B, int64_t ldb, int64_t K,
                  float* __restrict C, int64_t ldc) {
  using namespace simd;
  vf c[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) c[r][v] = Acc ? load(C + r * ldc + 16 * v) : zero();
  if (ATrans) {
    const float* a = A;
    for (int64_t k = 0; k < K; ++k, a += astride, B += ldb) {
      vf b[V];
      for (int v = 0; v < V; ++v) b[v] = load(B + 16 * v);
      for (int r = 0; r < R; ++r) {
        const vf x = set1(a[r]);
        for (int v = 0; v < V; ++v) c[r][v] = fmadd(x, b[v], c[r][v]);
      }
    }
  } else {
    for (int64_t k = 0; k < K; ++k, B += ldb) {
      vf b[V];
      for (int v = 0; v < V; ++v) b[v] = load(B + 16 * v);
      for (int r = 0; r < R; ++r) {
        const vf x = set1(A[r * astride + k]);
        for (int v = 0; v < V; ++v) c[r][v] = fmadd(x, b[v], c[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store(C + r * ldc + 16 * v, c[r][v]);
}
#else
// Plain loops over the 16V lanes of each row; the compiler keeps the accumulators in vector
// registers of whatever width the target has.
template <int R, int V, bool Acc, bool ATrans>
inline void micro(const float* __restrict A, int64_t astride, const float* __restrict B, int64_t ldb, int64_t K,
                  float* __restrict C, int64_t ldc) {
  constexpr int L = 16 * V;
  float c[R][L];
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < L; ++l) c[r][l] = Acc ? C[r * ldc + l] : 0.f;
  for (int64_t k = 0; k < K; ++k, B += ldb) {
    for (int r = 0; r < R; ++r) {
      const float x = ATrans ? A[k * astride + r] : A[r * astride + k];
      for (int l = 0; l < L; ++l) c[r][l] += x * B[l];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < L; ++l) C[r * ldc + l] = c[r][l];
}
#endif

template <int V, bool Acc, bool ATrans>
inline void micro_rows(int R, const float* A, int64_t astride, const float* B, int64_t ldb, int64_t K, float* C,
                       int64_t ldc) {
  constexpr int RM = rows_for(V);
  switch (R) {
    case 1: micro<1, V, Acc, ATrans>(A, astride, B, ldb, K, C, ldc); break;
    case 2: if constexpr (RM >= 2) micro<2, V, Acc, ATrans>(A, astride, B, ldb, K, C, ldc); break;
    case 3: if constexpr (RM >= 3) micro<3, V, Acc, ATrans>(A, astride, B, ldb, K, C, ldc); break;
    case 4: if constexpr (RM >= 4) micro<4, V, Acc, ATrans>(A, astride, B, ldb, K, C, ldc); break;
    case 5: if constexpr (RM >= 5) micro<5, V, Acc, ATrans>(A, astride, B, ldb, K, C, ldc); break;
    case 6: if constexpr (RM >= 6) micro<6, V, Acc, ATrans>(A, astride, B, ldb, K, C, ldc); break;
    case 7: if constexpr (RM >= 7) micro<7, V, Acc, ATrans>(A, astride, B, ldb, K, C, ldc); break;
    case 8: if constexpr (RM >= 8) micro<8, V, Acc, ATrans>(A, astride, B, ldb, K, C, ldc); break;
    default: break;
  }
}

// C[M][0:ncols) (=|+=) a(M x K) * B[K][0:ncols), ncols a multiple of 16. Without ATrans a(i, k) =
// A[i*astride + k]; with ATrans a(i, k) = A[k*astride + i]. Panels of up to kMaxV vectors are the
// outer loop, so one panel of B stays in L1 while every row group passes over it.
template <bool Acc, bool ATrans>
void gemm(int64_t M, int64_t ncols, int64_t K, const float* A, int64_t astride, const float* B, int64_t ldb,
          float* C, int64_t ldc) {
  if (M <= 0 || ncols <= 0) return;
  if (K <= 0) {
    if (!Acc)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + ncols, 0.f);
    return;
  }
  const int64_t W = ncols / kLanes;
  const int64_t panels = ceil_div(W, kMaxV);
  for (int64_t p = 0; p < panels; ++p) {
    const Range pv = split_range(W, panels, p);
    const int V = static_cast<int>(pv.size());
    const float* Bp = B + pv.begin * kLanes;
    float* Cp = C + pv.begin * kLanes;
    const int RM = rows_for(V);
    for (int64_t i = 0; i < M; i += RM) {
      const int R = static_cast<int>(std::min<int64_t>(RM, M - i));
      const float* Ai = ATrans ? A + i : A + i * astride;
      float* Ci = Cp + i * ldc;
      switch (V) {
        case 1: micro_rows<1, Acc, ATrans>(R, Ai, astride, Bp, ldb, K, Ci, ldc); break;
        case 2: micro_rows<2, Acc, ATrans>(R, Ai, astride, Bp, ldb, K, Ci, ldc); break;
        case 3: micro_rows<3, Acc, ATrans>(R, Ai, astride, Bp, ldb, K, Ci, ldc); break;
#if !defined(__AVX512F__)
        case 4: micro_rows<4, Acc, ATrans>(R, Ai, astride, Bp, ldb, K, Ci, ldc); break;
#endif
        default: break;
      }
    }
  }
}

// ------------------------------------------------------------------------------ prefetching

// Cache lines of the next task, issued a few at a time from inside the current task's loops.
// Families gather each task's rows from scattered places of large tensors, so packing would wait on
// memory at every row; prefetching the next task's lines hides that, but only when spread out: a
// burst of hundreds of prefetches fills the miss buffers and stalls the computation behind it.
class PrefetchQueue {
 public:
  void clear() {
    lines_.clear();
    next_ = 0;
  }
  // Every line of [p, p + bytes).
  void add(const void* p, int64_t bytes) {
    if (p == nullptr || bytes <= 0) return;
    uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63);
    const uintptr_t e = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes);
    for (; a < e; a += 64) lines_.push_back(a);
  }
  // Spreads the queued lines over `steps` calls of step().
  void plan(int64_t steps) { per_step_ = ceil_div(static_cast<int64_t>(lines_.size()), std::max<int64_t>(1, steps)); }
  void step() {
    const int64_t end = std::min<int64_t>(static_cast<int64_t>(lines_.size()), next_ + per_step_);
    for (; next_ < end; ++next_) issue(lines_[next_]);
  }
  void drain() {
    for (; next_ < static_cast<int64_t>(lines_.size()); ++next_) issue(lines_[next_]);
  }

 private:
  // Into L2 (prefetcht1), also for lines the task will only write: a task's lines (tens of KB)
  // would otherwise push the current task's packed tiles out of L1. On Zen 4, t1 was never slower
  // than t0 in our measurements and up to 15% faster on whole kernels.
  static void issue(uintptr_t v) { __builtin_prefetch(reinterpret_cast<const char*>(v), 0, 2); }
  std::vector<uintptr_t> lines_;
  int64_t next_ = 0, per_step_ = 0;
};

// ------------------------------------------------------------------------------ scheduling

// Hands out batches of consecutive task indices to the workers of a parallel region on demand, so
// a worker that is slowed down (another process on its core, a heavier task) simply takes fewer
// batches instead of holding everyone up at the end, as a static split would. Batches shrink as the
// work runs out (OpenMP's "guided" rule: remaining / (2 workers)): long batches first, where the
// next-task prefetch inside a batch pays off, short ones at the end for the balance. Which worker
// runs a task never changes a result: tasks write disjoint outputs, and anything they reduce is
// reduced per task or per fixed chunk of tasks.
class TaskSource {
 public:
  TaskSource(int64_t n, int64_t workers) : n_(n), div_(2 * std::max<int64_t>(1, workers)) {}
  bool next(Range& r) {
    int64_t b = next_.load(std::memory_order_relaxed);
    for (;;) {
      if (b >= n_) return false;
      const int64_t e = b + std::max<int64_t>(1, (n_ - b) / div_);
      if (next_.compare_exchange_weak(b, e, std::memory_order_relaxed)) {
        r = Range{b, e};
        return true;
      }
    }
  }

 private:
  std::atomic<int64_t> next_{0};
  int64_t n_, div_;
};

// Runs body(source) on at most one worker per thread (none idle for lack of tasks), all pulling
// batches of [0, ntasks) from one shared TaskSource; each worker fences its streamed stores before
// it ends, so every output is visible once the region joins.
template <class Body>
void run_workers(int64_t ntasks, Body&& body) {
  if (ntasks <= 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), ntasks);
  TaskSource source(ntasks, workers);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    body(source);
    simd::stream_fence();
  });
}

// ------------------------------------------------------------------------------ problems

struct FwdProblem {
  int64_t M = 0, N = 0, dqk = 0, dv = 0;
  const float* q = nullptr;   // [M][ldq], scaled
  int64_t ldq = 0;
  const float* kt = nullptr;  // [dqk][ldkt], zero beyond N up to pad(N)
  int64_t ldkt = 0;
  const float* v = nullptr;   // [N][ldv], ldv = pad(dv), zero beyond dv
  int64_t ldv = 0;
  float* o = nullptr;         // [M][ldo] out: normalized output (pad(dv) columns written)
  int64_t ldo = 0;
  float* lse = nullptr;       // [M] out: natural-log log-sum-exp (-inf for a row with no key)
  PrefetchQueue* prefetch = nullptr;  // optional: step() is called once per query row per key tile
};

struct BwdProblem {
  int64_t M = 0, N = 0, dqk = 0, dv = 0;
  const float* q = nullptr;     // [M][ldq], scaled, ldq = pad(dqk), zero padded
  const float* k = nullptr;     // [N][ldq], zero padded
  int64_t ldq = 0;
  const float* kt = nullptr;    // [dqk][ldkt]
  const float* vt = nullptr;    // [dv][ldkt]
  int64_t ldkt = 0;
  const float* dout = nullptr;  // [M][ldv], ldv = pad(dv), zero padded (and zero rows to ignore)
  int64_t ldv = 0;
  const float* lse = nullptr;   // [M] from the forward; +inf drops a row (P = 0)
  const float* drow = nullptr;  // [M] rowsum(dO * O)
  float* dq = nullptr;          // [M][ldq] accumulated: sum dS K (the caller multiplies by scale)
  float* dk = nullptr;          // [N][ldq] accumulated: sum dS^T (scale q)
  float* dvv = nullptr;         // [N][ldv] accumulated: sum P^T dO
  PrefetchQueue* prefetch = nullptr;  // optional: step() is called once per query row per tile
};

// Tile sizes. A problem of up to kSingleKeyTile keys is one key tile, so windows (N = 49..256)
// never pay the online-softmax rescale; longer ones are cut into nearly equal tiles of at most
// kKeyTile keys (multiples of 16, so every tile starts on a vector boundary).
constexpr int64_t kSingleKeyTile = 256;
constexpr int64_t kKeyTile = 128;
constexpr int64_t kQueryBlock = 128;

inline int64_t key_tile(int64_t N) {
  if (N <= kSingleKeyTile) return N;
  return round_up(ceil_div(N, ceil_div(N, kKeyTile)), kLanes);
}
inline int64_t query_block(int64_t M) {
  if (M <= kQueryBlock) return M;
  return ceil_div(M, ceil_div(M, kQueryBlock));
}

// Per-thread working memory of the core (score and dP tiles, running row state).
struct Scratch {
  Buffer s, dp, raw, m, l;
};

struct NoModifier {
  static constexpr bool kNeedsRaw = false;
  void forward(int64_t, int64_t, int64_t, int64_t, float*, int64_t) {}
  void backward(int64_t, int64_t, int64_t, int64_t, const float*, float*, int64_t, bool) {}
};

// Forward of query rows [qr.begin, qr.end) against all N keys.
template <class Mod>
void attention_forward(const FwdProblem& p, Mod& mod, Scratch& ws, Range qr) {
  const int64_t N = p.N;
  const int64_t owidth = pad_lanes(p.dv);
  if (qr.size() <= 0) return;
  if (N <= 0) {
    for (int64_t i = qr.begin; i < qr.end; ++i) {
      std::fill(p.o + i * p.ldo, p.o + i * p.ldo + owidth, 0.f);
      p.lse[i] = kNegInf;
    }
    return;
  }
  const int64_t bn_max = key_tile(N), bm_max = query_block(qr.size());
  const int64_t lds = pad_lanes(bn_max);
  float* s = ws.s.grow(bm_max * lds);
  float* mrow = ws.m.grow(bm_max);
  float* lrow = ws.l.grow(bm_max);
  for (int64_t q0 = qr.begin; q0 < qr.end; q0 += bm_max) {
    const int64_t bm = std::min(bm_max, qr.end - q0);
    float* o = p.o + q0 * p.ldo;
    for (int64_t k0 = 0; k0 < N; k0 += bn_max) {
      const int64_t bn = std::min(bn_max, N - k0), bnp = pad_lanes(bn);
      const bool first = k0 == 0;
      gemm<false, false>(bm, bnp, p.dqk, p.q + q0 * p.ldq, p.ldq, p.kt + k0, p.ldkt, s, lds);
      mod.forward(q0, bm, k0, bn, s, lds);
      for (int64_t i = 0; i < bm; ++i) {
        if (p.prefetch != nullptr) p.prefetch->step();
        float* row = s + i * lds;
        const float m_old = first ? kNegInf : mrow[i];
        const float m_new = std::max(m_old, simd::row_max(row, bn));
        // A row with no key so far keeps m = -inf; subtracting 0 instead keeps exp(-inf) = 0
        // rather than exp(nan).
        const float m_use = m_new == kNegInf ? 0.f : m_new;
        const float sum = simd::row_exp_sum(row, bn, m_use);
        if (first) {
          lrow[i] = sum;
        } else {
          const float alpha = std::exp(m_old - m_use);
          lrow[i] = lrow[i] * alpha + sum;
          if (alpha != 1.f) simd::row_scale(o + i * p.ldo, owidth, alpha);
        }
        mrow[i] = m_new;
      }
      if (first)
        gemm<false, false>(bm, owidth, bn, s, lds, p.v + k0 * p.ldv, p.ldv, o, p.ldo);
      else
        gemm<true, false>(bm, owidth, bn, s, lds, p.v + k0 * p.ldv, p.ldv, o, p.ldo);
    }
    for (int64_t i = 0; i < bm; ++i) {
      float* orow = o + i * p.ldo;
      const float l = lrow[i];
      if (l > 0.f) {
        simd::row_scale(orow, owidth, 1.f / l);
        p.lse[q0 + i] = mrow[i] + std::log(l);
      } else {
        std::fill(orow, orow + owidth, 0.f);
        p.lse[q0 + i] = kNegInf;
      }
    }
  }
}

// What a backward call produces. The one-pass schedule asks for everything over the whole problem;
// the two-pass schedule (for few, long problems, so that threads can split them without
// write conflicts) runs kKeyValue|kParams over key ranges, then kQuery over query ranges.
enum BwdWhat : unsigned { kQuery = 1u, kKeyValue = 2u, kParams = 4u, kAll = 7u };

// Backward of query rows qr against keys kr: accumulates into dq rows qr (kQuery) and dk/dv rows kr
// (kKeyValue). kr.begin must be 0 or a multiple of 16 (ranges are cut on the key-tile grid, whose
// tiles start on vector boundaries). Key tiles are the outer loop so dk/dv tiles stay hot while
// queries stream past.
template <class Mod>
void attention_backward(const BwdProblem& p, Mod& mod, Scratch& ws, Range qr, Range kr, unsigned what) {
  assert(kr.begin % kLanes == 0);
  if (qr.size() <= 0 || kr.size() <= 0) return;
  const int64_t bn_max = key_tile(p.N), bm_max = query_block(qr.size());
  const int64_t lds = pad_lanes(bn_max);
  float* s = ws.s.grow(bm_max * lds);
  float* dp = ws.dp.grow(bm_max * lds);
  float* raw = Mod::kNeedsRaw ? ws.raw.grow(bm_max * lds) : nullptr;
  const int64_t qwidth = p.ldq, vwidth = p.ldv;
  for (int64_t k0 = kr.begin; k0 < kr.end; k0 += bn_max) {
    const int64_t bn = std::min(bn_max, kr.end - k0), bnp = pad_lanes(bn);
    for (int64_t q0 = qr.begin; q0 < qr.end; q0 += bm_max) {
      const int64_t bm = std::min(bm_max, qr.end - q0);
      gemm<false, false>(bm, bnp, p.dqk, p.q + q0 * p.ldq, p.ldq, p.kt + k0, p.ldkt, s, lds);
      if (Mod::kNeedsRaw) std::copy(s, s + bm * lds, raw);
      mod.forward(q0, bm, k0, bn, s, lds);
      // P = exp(logits - lse), 0 in the padding lanes.
      for (int64_t i = 0; i < bm; ++i) {
        if (p.prefetch != nullptr) p.prefetch->step();
        float li = p.lse[q0 + i];
        if (li == kNegInf) li = kPosInf;  // a row that saw no key has no gradient
        simd::row_exp(s + i * lds, bn, li);
      }
      gemm<false, false>(bm, bnp, p.dv, p.dout + q0 * p.ldv, p.ldv, p.vt + k0, p.ldkt, dp, lds);
      if (what & kKeyValue)
        gemm<true, true>(bn, vwidth, bm, s, lds, p.dout + q0 * p.ldv, p.ldv, p.dvv + k0 * p.ldv, p.ldv);
      // dS = P (dP - Drow), written over dP; exact zeros in the padding lanes (P = 0 there).
      for (int64_t i = 0; i < bm; ++i) simd::row_ds(s + i * lds, dp + i * lds, bnp, p.drow[q0 + i]);
      mod.backward(q0, bm, k0, bn, raw, dp, lds, (what & kParams) != 0);
      if (what & kKeyValue)
        gemm<true, true>(bn, qwidth, bm, dp, lds, p.q + q0 * p.ldq, p.ldq, p.dk + k0 * p.ldq, p.ldq);
      if (what & kQuery)
        gemm<true, false>(bm, qwidth, bn, dp, lds, p.k + k0 * p.ldq, p.ldq, p.dq + q0 * p.ldq, p.ldq);
    }
  }
}

// ------------------------------------------------------------------------------ packing helpers

// Row gathers from strided tensors into the fp32 layouts above; `src(i)` is a pointer to row i's
// first element (nullptr for an absent row, which packs as zeros), sd the element stride along d.

template <typename T, class RowPtr>
inline void pack_rows(int64_t n, int64_t d, int64_t sd, RowPtr src, float mult, float* dst, int64_t ld) {
  for (int64_t i = 0; i < n; ++i) {
    const T* r = src(i);
    float* o = dst + i * ld;
    if (r == nullptr) {
      std::fill(o, o + d, 0.f);
    } else if (sd == 1) {
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(r[c]) * mult;
    } else {
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(r[c * sd]) * mult;
    }
  }
}

#ifdef __AVX512F__
// In-register transpose of a 16 x 16 fp32 block: r[i] holds row i on entry and column i on exit.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}
#endif

// Transposed: dst[c][i] = row i, element c, for i < n. dst columns up to n rounded to 16 must exist
// and be zero past n (the AVX-512 path writes zeros there, the portable one leaves them alone).
// Blocks of 16 rows x 16 elements go through registers (a 16 x 16 transpose), so every store is a
// whole 16-float run of a destination row.
template <typename T, class RowPtr>
inline void pack_cols(int64_t n, int64_t d, int64_t sd, RowPtr src, float* dst, int64_t ld) {
#ifdef __AVX512F__
  alignas(64) float tmp[16 * 16];
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const int64_t in = std::min<int64_t>(16, n - i0);
    const T* rp[16];
    for (int64_t i = 0; i < 16; ++i) rp[i] = i < in ? src(i0 + i) : nullptr;
    for (int64_t c0 = 0; c0 < d; c0 += 16) {
      const int64_t cn = std::min<int64_t>(16, d - c0);
      const __mmask16 cm = simd::tail_mask(cn);
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i) {
        const T* row = rp[i];
        if (row == nullptr) {
          r[i] = _mm512_setzero_ps();
        } else if (std::is_same<T, float>::value && sd == 1) {
          r[i] = _mm512_maskz_loadu_ps(cm, reinterpret_cast<const float*>(row) + c0);
        } else {
          float* t = tmp + i * 16;
          for (int64_t c = 0; c < 16; ++c) t[c] = c < cn ? static_cast<float>(row[(c0 + c) * sd]) : 0.f;
          r[i] = _mm512_load_ps(t);
        }
      }
      transpose16(r);
      for (int64_t c = 0; c < cn; ++c) _mm512_storeu_ps(dst + (c0 + c) * ld + i0, r[c]);
    }
  }
#else
  for (int64_t i = 0; i < n; ++i) {
    const T* r = src(i);
    float* o = dst + i;
    if (r == nullptr) {
      for (int64_t c = 0; c < d; ++c) o[c * ld] = 0.f;
    } else if (sd == 1) {
      for (int64_t c = 0; c < d; ++c) o[c * ld] = static_cast<float>(r[c]);
    } else {
      for (int64_t c = 0; c < d; ++c) o[c * ld] = static_cast<float>(r[c * sd]);
    }
  }
#endif
}

}  // namespace attn
}  // namespace vitk
