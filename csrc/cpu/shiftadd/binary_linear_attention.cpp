// CPU kernels of ShiftAddViT's binary linear attention (the MatAdd core of LinAngularAttention_binary).
//
// Forward, three passes over the tokens, each cut into fixed chunks of one image's tokens (all heads of
// a token) so that the result does not depend on the thread count:
//   1. the norms of q and k, and the sums of the normalized values (in double lanes, one partial per
//      chunk, added in chunk order): the global means;
//   2. k's codes, bit-packed in 64-bit words (bit = kn > mean), and each chunk's partial state
//      k_b^T v. The code is cut into nibbles; v is added to one histogram row per nibble (the row of
//      that nibble's value), and at the end of the chunk each state row is the sum of the histogram
//      rows whose nibble value has its bit: additions only, and no branch on a code's bits;
//   3. q's codes, then per token 0.5 v + (1/pi) q_b S, its norm, the normalized row stored. q_b S is
//      one lookup per nibble in tables of S's subset sums (16 per group of four rows), added up.
// Passes 2 and 3 of one image run back to back on one thread when there are enough images, so that
// pass 3 reads v from cache. q and k are read twice, v twice; no float copy of the codes or of the
// normalized q and k is made.
//
// Non-finite inputs give what the official eager code gives: a token whose normalized q holds a NaN
// (a NaN or an infinity in q, or a zero q) has a NaN output row; a problem with such a k token, or
// with a NaN or infinity in v, has every output row NaN (its straight-through k_b^T v state holds a
// NaN or an infinity, which the dense q_b product spreads to every row). A NaN mean sets no bit.
//
// Backward: with du = (g - out (g . out)) / ||u||, dv = 0.5 du + k_b dS, dS = (1/pi) q_b^T du (again
// a nibble histogram), dq_n = (1/pi) S du over the clamp's support and through the normalization, dk
// likewise with dS^T v. Two passes: du, dv's first term, dq and the partial dS per chunk; then dk and
// dv's second term (a subset-table lookup of dS). S du and dS v are taken from the transposed d x dv
// matrices, as sums of their rows scaled by du's (v's) elements.
//
// Speed: the head dims of ShiftAddViT (16, 32, 64 with d == dv) are compile-time constants of their
// own instantiations; in float with AVX2 their per-token work is float_rows_avx2.h's, on rows held in
// registers. Sums (norms, means, dot products) are kept in kLanes partial sums added in a fixed tree
// (deterministic, and no serial dependency chain); the codes are packed from vector compares.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <limits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "common.h"
#if defined(__AVX2__) && defined(__FMA__)
#include "float_rows_avx2.h"
#endif

namespace vitk {
namespace cpu {
namespace {

using shiftadd_detail::Acc;
#if defined(__AVX2__) && defined(__FMA__)
using shiftadd_detail::FloatRow;
using shiftadd_detail::through_norm_row;
#endif

constexpr int64_t kChunk = 512;
constexpr int64_t kMaxChunks = 16;
constexpr double kInvPi = 0.318309886183790671537767526745028724;
constexpr int kLanes = 8;

// Element strides of a [B, N, heads, d] tensor.
template <typename T>
struct View4 {
  const T* base;
  int64_t s0, s1, s2, s3;
  explicit View4(const at::Tensor& t)
      : base(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  const T* row(int64_t b, int64_t n, int64_t h) const { return base + b * s0 + n * s1 + h * s2; }
  template <typename A>
  void load(int64_t b, int64_t n, int64_t h, int64_t d, A* dst) const {
    const T* p = base + b * s0 + n * s1 + h * s2;
    if (s3 == 1) {
      for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<A>(p[e]);
    } else {
      for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<A>(p[e * s3]);
    }
  }
};

// A task is one chunk of one image's tokens, all heads of each token. The chunk length depends on the
// shape only, so the result does not depend on the thread count: about kChunk token-heads, and at most
// kMaxChunks chunks per image, so that the per-chunk partial states stay O(images x heads x d x dv)
// whatever N is.
struct Shape {
  int64_t B, N, nh, d, dv, words, chunk_len, chunks;
  int64_t problems() const { return B * nh; }
  int64_t tasks() const { return B * chunks; }
  Range chunk(int64_t c) const { return tile_range(N, chunk_len, c); }
};

// Whether the rows of T at head dims D, DV go through float_rows_avx2.h (then also every tensor's last
// dimension must be contiguous, checked at run time).
template <typename T, int D, int DV>
constexpr bool kFloatRows =
#if defined(__AVX2__) && defined(__FMA__)
    std::is_same_v<T, float> && D == DV && D > 0 && D % 8 == 0 && D <= 64;
#else
    false;
#endif

inline bool unit_rows(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (t->size(3) > 1 && t->stride(3) != 1) return false;
  return true;
}

Shape shape_of(const at::Tensor& q, const at::Tensor& v) {
  const int64_t N = q.size(1), nh = q.size(2), d = q.size(3);
  const int64_t len = std::max({int64_t{64}, kChunk / std::max<int64_t>(1, nh), ceil_div(N, kMaxChunks)});
  return Shape{q.size(0), N, nh, d, v.size(3), ceil_div(d, 64), len, ceil_div(N, len)};
}

// Eight lanes of double: the sums below keep their terms in them (term i in lane i % 8, a short tail
// zero-padded) and add the lanes in a fixed tree at the end: deterministic, vectorized, and a short
// dependency chain (the rows are independent, so the core overlaps several of them).
typedef float F8 __attribute__((vector_size(32)));
#if defined(__AVX2__)
// Two AVX registers, written out: GCC lowers a 64-byte vector type on AVX2 through the stack, which
// put a store and a reload into every operation.
struct D8 {
  __m256d lo, hi;    // lanes 0-3, 4-7
  friend D8 operator+(D8 a, D8 b) { return {_mm256_add_pd(a.lo, b.lo), _mm256_add_pd(a.hi, b.hi)}; }
  friend D8 operator-(D8 a, D8 b) { return {_mm256_sub_pd(a.lo, b.lo), _mm256_sub_pd(a.hi, b.hi)}; }
  friend D8 operator*(D8 a, D8 b) { return {_mm256_mul_pd(a.lo, b.lo), _mm256_mul_pd(a.hi, b.hi)}; }
  D8& operator+=(D8 b) { return *this = *this + b; }
};
inline D8 zero8() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }
inline D8 load8(const float* p) {
  const __m256 v = _mm256_loadu_ps(p);
  return {_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))};
}
inline D8 load8(const double* p) { return {_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4)}; }
// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), as the generic version below adds them.
inline double lanes_total(D8 v) {
  const __m256d s = _mm256_add_pd(v.lo, v.hi);
  const __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  return _mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t)));
}
#else
typedef double D8 __attribute__((vector_size(64)));
inline D8 zero8() { return D8{}; }
inline D8 load8(const float* p) {
  F8 v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, D8);
}
inline D8 load8(const double* p) {
  D8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline double lanes_total(D8 v) {
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}
#endif
template <typename A>
inline D8 load8_tail(const A* p, int64_t n) {
  A t[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return load8(t);
}

// The sum over i < n of f(x[i]) (or f(x[i], y[i])), f applied lane-wise to D8s, with f(0) == 0.
template <typename A, typename F>
inline double lane_sum(const A* x, int64_t n, F f) {
  D8 acc = zero8();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += f(load8(x + i));
  if (i < n) acc += f(load8_tail(x + i, n - i));
  return lanes_total(acc);
}

template <typename A>
inline A dot(const A* a, const A* b, int64_t n) {
  D8 acc = zero8();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load8(a + i) * load8(b + i);
  if (i < n) acc += load8_tail(a + i, n - i) * load8_tail(b + i, n - i);
  return static_cast<A>(lanes_total(acc));
}

// acc += the row's terms, lane by lane (summed over a chunk's rows, added up once at its end).
template <typename A>
inline void add_row(D8& acc, const A* x, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load8(x + i);
  if (i < n) acc += load8_tail(x + i, n - i);
}

// sqrt of the sum of squares, accumulated in double so that no finite row overflows or underflows.
template <typename A>
inline A norm_of(const A* x, int64_t n) {
  return static_cast<A>(std::sqrt(lane_sum(x, n, [](D8 v) { return v * v; })));
}

// Whether x[0, n) holds a NaN or an infinity: x - x is 0 for a finite x and NaN otherwise, and their
// lane sum is NaN as soon as one term is.
template <typename A>
inline bool nonfinite(const A* x, int64_t n) {
  return !(lane_sum(x, n, [](D8 v) { return v - v; }) == 0.0);
}

// The same in float lanes: x - x needs no wider type, and a float row skips the conversions.
inline bool nonfinite(const float* x, int64_t n) {
  F8 acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    F8 v;
    std::memcpy(&v, x + i, sizeof(v));
    acc += v - v;
  }
  for (; i < n; ++i) acc[0] += x[i] - x[i];
  return !(((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) == 0.0f);
}

// The normalized row (x * (1 / norm), the same float operations in every pass, so that a value equal
// to the mean in one pass is equal to it in the next) and whether it holds a NaN (a normalized value
// cannot be infinite: an infinite norm scales every value by 0).
template <typename A>
inline bool normalize(A* x, int64_t n, A norm) {
  const A inv = A(1) / norm;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
  return nonfinite(x, n);
}

// Bits x > m packed into words (bits past n stay 0); m is threshold<A>(the mean).
inline void pack(const double* x, int64_t n, double mean, uint64_t* words) {
  for (int64_t w = 0; w * 64 < n; ++w) {
    uint64_t bits = 0;
    const int64_t end = std::min<int64_t>(64, n - w * 64);
    for (int64_t i = 0; i < end; ++i) bits |= static_cast<uint64_t>(x[w * 64 + i] > mean) << i;
    words[w] = bits;
  }
}

// For float x, x > mean (a double) is x > the largest float not above mean; a NaN mean stays NaN and
// sets no bit.
inline float float_at_or_below(double mean) {
  float m = static_cast<float>(mean);
  if (static_cast<double>(m) > mean) m = std::nextafter(m, -std::numeric_limits<float>::infinity());
  return m;
}

// What pack compares A values with: the mean itself in double, float_at_or_below(mean) in float.
template <typename A>
inline A threshold(double mean) {
  if constexpr (std::is_same_v<A, float>) {
    return float_at_or_below(mean);
  } else {
    return mean;
  }
}

inline void pack(const float* x, int64_t n, float m, uint64_t* words) {
  for (int64_t w = 0; w * 64 < n; ++w) {
    const int64_t end = std::min<int64_t>(64, n - w * 64);
    const float* xw = x + w * 64;
    uint64_t bits = 0;
#if defined(__AVX512F__)
    const __m512 mv = _mm512_set1_ps(m);
    for (int64_t c = 0; c < end; c += 16) {
      const int64_t len = std::min<int64_t>(16, end - c);
      const __mmask16 live = len == 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << len) - 1);
      const __m512 xv = _mm512_maskz_loadu_ps(live, xw + c);
      bits |= static_cast<uint64_t>(_mm512_mask_cmp_ps_mask(live, xv, mv, _CMP_GT_OQ)) << c;
    }
#elif defined(__AVX2__)
    // 8 compares per instruction; their sign bits are the code's bits.
    const __m256 mv = _mm256_set1_ps(m);
    int64_t c = 0;
    for (; c + 8 <= end; c += 8)
      bits |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(xw + c), mv, _CMP_GT_OQ))) << c;
    for (; c < end; ++c) bits |= static_cast<uint64_t>(xw[c] > m) << c;
#else
    for (int64_t i = 0; i < end; ++i) bits |= static_cast<uint64_t>(xw[i] > m) << i;
#endif
    words[w] = bits;
  }
}

// A code times a [d, n] matrix, as additions, four bits at a time. The d rows are cut into groups of
// four (a nibble of the code); a group's table holds the sums of its rows over all 16 subsets, so the
// product is the sum of d / 4 table rows, one per nibble, with no branch on the code's bits. The other
// way round (the sum of codes^T x over tokens), each token adds x to one histogram row per nibble, and
// the histograms become the matrix's rows at the end of the chunk.
constexpr int kSubsets = 16;

inline int64_t nibble_groups(int64_t d) { return ceil_div(d, 4); }

inline unsigned nibble(const uint64_t* words, int64_t g) {
  return static_cast<unsigned>(words[g >> 4] >> ((g & 15) * 4)) & 15u;
}

// table [groups, 16, n]: table[g][c] = the sum of rows[4g + j] over the set bits j of c. A bit past d
// is never set in a code, so those entries are left as the sum of the rows that exist.
template <typename A>
void subset_tables(const A* rows, int64_t d, int64_t n, A* table) {
  for (int64_t g = 0; g < nibble_groups(d); ++g) {
    A* tg = table + g * kSubsets * n;
    std::fill(tg, tg + n, A(0));
    for (int c = 1; c < kSubsets; ++c) {
      const int64_t row = 4 * g + __builtin_ctz(c);
      const A* base = tg + (c & (c - 1)) * n;
      A* dst = tg + c * n;
      if (row < d) {
        for (int64_t i = 0; i < n; ++i) dst[i] = base[i] + rows[row * n + i];
      } else {
        std::copy(base, base + n, dst);
      }
    }
  }
}

// rows [d, n] = the histogram [groups, 16, n] folded: rows[4g + j] = the sum of hist[g][c] over the c
// with bit j set, in increasing c.
template <typename A>
void fold_histogram(const A* hist, int64_t d, int64_t n, A* rows) {
  for (int64_t row = 0; row < d; ++row) {
    const int64_t g = row / 4, j = row % 4;
    A* dst = rows + row * n;
    std::fill(dst, dst + n, A(0));
    for (int c = 1; c < kSubsets; ++c) {
      if (!((c >> j) & 1)) continue;
      const A* h = hist + (g * kSubsets + c) * n;
      for (int64_t i = 0; i < n; ++i) dst[i] += h[i];
    }
  }
}

// Whether rows of DV elements of A are whole 32-byte vectors (one AVX2 register each): then the sums
// below stay in registers.
template <int DV, typename A>
constexpr bool kWholeVectors = DV > 0 && (DV * sizeof(A)) % 32 == 0 && DV * sizeof(A) <= 256;

// dst[0, n) = the code's product with the matrix of `table` (from subset_tables; n == DV when DV > 0).
template <int DV, typename A>
inline void code_times(A* dst, const A* table, int64_t groups, int64_t n, const uint64_t* words) {
  if constexpr (kWholeVectors<DV, A>) {
    typedef A V __attribute__((vector_size(32)));
    constexpr int kW = 32 / sizeof(A), kV = DV / kW;
    V acc[kV];
    for (int c = 0; c < kV; ++c) acc[c] = V{};
    for (int64_t g = 0; g < groups; ++g) {
      const A* r = table + (g * kSubsets + nibble(words, g)) * DV;
      for (int c = 0; c < kV; ++c) {
        V x;
        std::memcpy(&x, r + c * kW, sizeof(V));
        acc[c] += x;
      }
    }
    for (int c = 0; c < kV; ++c) std::memcpy(dst + c * kW, &acc[c], sizeof(V));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = A(0);
    for (int64_t g = 0; g < groups; ++g) {
      const A* r = table + (g * kSubsets + nibble(words, g)) * n;
      for (int64_t i = 0; i < n; ++i) dst[i] += r[i];
    }
  }
}

// hist[g][nibble g of the code] += src for every group g (n == DV when DV > 0).
template <int DV, typename A>
inline void histogram_add(A* hist, int64_t groups, const A* src, int64_t n, const uint64_t* words) {
  if constexpr (kWholeVectors<DV, A>) {
    typedef A V __attribute__((vector_size(32)));
    constexpr int kW = 32 / sizeof(A), kV = DV / kW;
    V x[kV];
    for (int c = 0; c < kV; ++c) std::memcpy(&x[c], src + c * kW, sizeof(V));
    for (int64_t g = 0; g < groups; ++g) {
      A* r = hist + (g * kSubsets + nibble(words, g)) * DV;
      for (int c = 0; c < kV; ++c) {
        V y;
        std::memcpy(&y, r + c * kW, sizeof(V));
        y += x[c];
        std::memcpy(r + c * kW, &y, sizeof(V));
      }
    }
  } else {
    for (int64_t g = 0; g < groups; ++g) {
      A* r = hist + (g * kSubsets + nibble(words, g)) * n;
      for (int64_t i = 0; i < n; ++i) r[i] += src[i];
    }
  }
}

// fold_histogram, through FloatRow where the rows are whole registers.
template <typename T, int D, int DV, typename A>
void fold(const A* hist, int64_t d, int64_t dv, A* rows) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (kFloatRows<T, D, DV>) {
    FloatRow<D>::fold(hist, rows);
    return;
  }
#endif
  fold_histogram(hist, d, dv, rows);
}

// The subset tables of one image's heads (m [B, heads, d, dv]) into tables [heads, groups, 16, dv]:
// each task builds those of its own image, in a buffer it reuses.
template <typename A, int D = 0>
void image_tables(const Shape& sh, const A* m, int64_t b, A* tables) {
  const int64_t slot = sh.d * sh.dv, tslot = nibble_groups(sh.d) * kSubsets * sh.dv;
  for (int64_t h = 0; h < sh.nh; ++h) {
#if defined(__AVX2__) && defined(__FMA__)
    if constexpr (D > 0) {
      FloatRow<D>::tables(m + (b * sh.nh + h) * slot, tables + h * tslot);
      continue;
    }
#endif
    subset_tables(m + (b * sh.nh + h) * slot, sh.d, sh.dv, tables + h * tslot);
  }
}
// dst [slot] = problem p's (image b, head h) partials of [B, chunks, heads, slot], added in chunk
// order, times `mult`.
template <typename A>
void reduce_problem(const Shape& sh, const std::vector<A>& partial, int64_t slot, A mult, int64_t p, A* dst) {
  const int64_t b = p / sh.nh, h = p % sh.nh;
  const A* first = partial.data() + (b * sh.chunks * sh.nh + h) * slot;
  std::copy(first, first + slot, dst);
  for (int64_t c = 1; c < sh.chunks; ++c) {
    const A* part = first + c * sh.nh * slot;
    for (int64_t i = 0; i < slot; ++i) dst[i] += part[i];
  }
  for (int64_t i = 0; i < slot; ++i) dst[i] *= mult;
}

// The same for every problem, into dst [B, heads, slot].
template <typename A>
void reduce_chunks(const Shape& sh, const std::vector<A>& partial, int64_t slot, A mult, A* dst) {
  at::parallel_for(0, sh.problems(), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) reduce_problem(sh, partial, slot, mult, p, dst + p * slot);
  });
}

// [count, rows, cols] -> [count, cols, rows].
template <typename A>
std::vector<A> transposed(const A* m, int64_t count, int64_t rows, int64_t cols) {
  std::vector<A> t(count * rows * cols);
  for (int64_t p = 0; p < count; ++p)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) t[(p * cols + j) * rows + i] = m[(p * rows + i) * cols + j];
  return t;
}

// dst[0, n) = scale * sum over j < k of x[j] * rows[j] (rows [k, n] row-major): M x from M's transpose.
template <typename A>
inline void rows_times(A* dst, const A* rows, int64_t n, const A* x, int64_t k, A scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = A(0);
  for (int64_t j = 0; j < k; ++j) {
    const A xj = x[j];
    const A* r = rows + j * n;
    for (int64_t i = 0; i < n; ++i) dst[i] += xj * r[i];
  }
  for (int64_t i = 0; i < n; ++i) dst[i] *= scale;
}

// dx = (dxn - xn (dxn . xn)) / ||x|| with dxn zeroed off the clamp's support [0, 1]; xn is recomputed
// from x as the forward computed it, dxn arrives in `grad`.
template <typename T, typename A>
inline void through_norm(const A* xn, A* grad, int64_t d, A norm, T* dst) {
  for (int64_t i = 0; i < d; ++i) grad[i] = (xn[i] >= A(0) && xn[i] <= A(1)) ? grad[i] : A(0);
  const A proj = dot(xn, grad, d);
  const A inv = A(1) / norm;
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<T>((grad[i] - xn[i] * proj) * inv);
}

#if defined(__AVX2__) && defined(__FMA__)
// The forward's per-task loops for float rows (kFloatRows), each a function of plain values: inside a
// lambda that captures by reference, every store of a code, a flag or a float made the compiler
// reload the captured sizes, pointers and thresholds for the next token.
struct FloatTask {
  View4<float> X, Y;      // the two inputs the pass reads (q and k, k and v, q and v)
  int64_t b, begin, end, nh, N;
};

// Pass 1: the norms of q and k, and the lane sums of their normalized values.
template <int D>
void norms_task(FloatTask t, float* qnorm, float* knorm, D8& sq, D8& sk) {
  for (int64_t n = t.begin; n < t.end; ++n) {
    for (int64_t h = 0, row = t.b * t.nh * t.N + n; h < t.nh; ++h, row += t.N) {
      const auto x = FloatRow<D>::load(t.X.row(t.b, n, h)), y = FloatRow<D>::load(t.Y.row(t.b, n, h));
      const float nq = x.norm(), nk = y.norm();
      x.scaled(1.0f / nq).add_to(sq.lo, sq.hi);
      y.scaled(1.0f / nk).add_to(sk.lo, sk.hi);
      qnorm[row] = nq;
      knorm[row] = nk;
    }
  }
}

// Pass 2: k's codes, v added to the heads' histograms [heads, D / 4, 16, D], and per head whether a
// normalized k holds a NaN or v a NaN or an infinity (bad[h] set). Head by head, so that one head's
// histogram (16 KB at D = 32) stays in the L1 cache while the chunk's rows come from L2.
template <int D>
void k_task(FloatTask t, const float* knorm, float above, uint64_t* kcodes, float* hist, int32_t* bad) {
  constexpr int64_t kHist = D / 4 * 16 * D;
  for (int64_t h = 0; h < t.nh; ++h) {
    for (int64_t n = t.begin, row = (t.b * t.nh + h) * t.N + n; n < t.end; ++n, ++row) {
      const auto x = FloatRow<D>::load(t.X.row(t.b, n, h)).scaled(1.0f / knorm[row]);
      const uint64_t code = x.code(above);
      kcodes[row] = code;
      const auto y = FloatRow<D>::load(t.Y.row(t.b, n, h));
      bad[h] |= x.has_nan() | y.nonfinite();
      y.add_to_histogram(hist + h * kHist, code);
    }
  }
}

// Pass 3: q's codes and the output rows [B, N, heads, D], from the heads' subset tables, head by head
// as k_task.
template <int D>
void q_task(FloatTask t, const float* qnorm, float above, const uint8_t* nan_heads, const float* tables,
            uint64_t* qcodes, float* unorm, float* out) {
  constexpr int64_t kTable = D / 4 * 16 * D;
  const __m256 half = _mm256_set1_ps(0.5f), ip = _mm256_set1_ps(static_cast<float>(kInvPi));
  for (int64_t h = 0; h < t.nh; ++h) {
    for (int64_t n = t.begin, row = (t.b * t.nh + h) * t.N + n; n < t.end; ++n, ++row) {
      const auto x = FloatRow<D>::load(t.X.row(t.b, n, h)).scaled(1.0f / qnorm[row]);
      const bool nan = x.has_nan() || nan_heads[h];
      const uint64_t code = x.code(above);
      qcodes[row] = code;
      const auto st = FloatRow<D>::from_table(tables + h * kTable, code);
      const auto y = FloatRow<D>::load(t.Y.row(t.b, n, h));
      FloatRow<D> u;
      for (int c = 0; c < FloatRow<D>::kV; ++c) u.v[c] = _mm256_fmadd_ps(half, y.v[c], _mm256_mul_ps(ip, st.v[c]));
      const float nu = nan ? std::numeric_limits<float>::quiet_NaN() : u.norm();
      unorm[row] = nu;
      u.scaled(1.0f / nu).store(out + ((t.b * t.N + n) * t.nh + h) * D);
    }
  }
}
#endif

template <typename T, int D, int DV>
void forward_impl(const Shape& sh, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  uint64_t* codes, Acc<T>* norms, Acc<T>* state) {
  using A = Acc<T>;
  const View4<T> Q(q), K(k), V(v);
  const int64_t N = sh.N, d = D ? D : sh.d, dv = DV ? DV : sh.dv, nw = sh.words, P = sh.problems();
  [[maybe_unused]] const bool fast = kFloatRows<T, D, DV> && unit_rows({&q, &k, &v, &out});
  const int64_t plane = P * N;                     // one [B, heads, N] plane of the codes or norms
  uint64_t* qcodes = codes;
  uint64_t* kcodes = codes + plane * nw;
  A* qnorm = norms;
  A* knorm = norms + plane;
  A* unorm = norms + 2 * plane;

  // Pass 1: norms and the partial sums of the normalized values.
  std::vector<double> sums(2 * sh.tasks());
  at::parallel_for(0, sh.tasks(), 1, [&](int64_t t0, int64_t t1) {
    [[maybe_unused]] const int64_t d = D ? D : sh.d, dv = DV ? DV : sh.dv;    // constants when D, DV > 0
    std::vector<A> row(d);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / sh.chunks;
      const Range r = sh.chunk(t % sh.chunks);
      D8 sq = zero8(), sk = zero8();
#if defined(__AVX2__) && defined(__FMA__)
      if constexpr (kFloatRows<T, D, DV>) {
        if (fast) {
          norms_task<D>(FloatTask{Q, K, b, r.begin, r.end, sh.nh, N}, qnorm, knorm, sq, sk);
          sums[2 * t] = lanes_total(sq);
          sums[2 * t + 1] = lanes_total(sk);
          continue;
        }
      }
#endif
      for (int64_t n = r.begin; n < r.end; ++n)
      for (int64_t h = 0, p = b * sh.nh; h < sh.nh; ++h, ++p) {
        Q.load(b, n, h, d, row.data());
        const A nq = norm_of(row.data(), d);
        normalize(row.data(), d, nq);
        add_row(sq, row.data(), d);
        qnorm[p * N + n] = nq;
        K.load(b, n, h, d, row.data());
        const A nk = norm_of(row.data(), d);
        normalize(row.data(), d, nk);
        add_row(sk, row.data(), d);
        knorm[p * N + n] = nk;
      }
      sums[2 * t] = lanes_total(sq);
      sums[2 * t + 1] = lanes_total(sk);
    }
  });
  double total_q = 0, total_k = 0;
  for (int64_t t = 0; t < sh.tasks(); ++t) {
    total_q += sums[2 * t];
    total_k += sums[2 * t + 1];
  }
  const double count = static_cast<double>(P) * static_cast<double>(N) * static_cast<double>(d);
  const A above_q = threshold<A>(total_q / count), above_k = threshold<A>(total_k / count);

  // Passes 2 and 3. Pass 3 of an image needs only that image's states, so when there are images
  // enough to keep every thread busy, a thread runs both passes on one image after the other, and
  // pass 3 finds v (and the image's other rows) still in cache. Otherwise each pass is spread over
  // all chunks. Both ways add the same partials in the same order.
  const int64_t slot = d * dv;
  const int64_t groups = nibble_groups(d), hslot = groups * kSubsets * dv;
  std::vector<A> partial(sh.tasks() * sh.nh * slot);
  std::vector<int32_t> poisoned(sh.tasks() * sh.nh, 0);
  std::vector<A> S(P * slot);
  std::vector<uint8_t> problem_nan(P, 0);
  T* o = out.data_ptr<T>();
  const A inv_pi = static_cast<A>(kInvPi);
  struct Scratch {
    std::vector<A> row, vrow, acc, hist, tables;
    int64_t tables_of = -1;                     // the image whose subset tables `tables` holds
  };
  const auto scratch = [&] { return Scratch{std::vector<A>(d), std::vector<A>(dv), std::vector<A>(dv),
                                            std::vector<A>(sh.nh * hslot), std::vector<A>(sh.nh * hslot)}; };

  // Pass 2 on task t: k's codes and the partial states, and which heads hold a non-finite k_b^T v.
  const auto k_pass = [&](int64_t t, Scratch& s) {
    [[maybe_unused]] const int64_t d = D ? D : sh.d, dv = DV ? DV : sh.dv;    // constants when D, DV > 0
    const int64_t b = t / sh.chunks;
    const Range r = sh.chunk(t % sh.chunks);
    std::fill(s.hist.begin(), s.hist.end(), A(0));
#if defined(__AVX2__) && defined(__FMA__)
    if constexpr (kFloatRows<T, D, DV>) {
      if (fast) k_task<D>(FloatTask{K, V, b, r.begin, r.end, sh.nh, N}, knorm, above_k, kcodes, s.hist.data(),
                          poisoned.data() + t * sh.nh);
    }
#endif
    for (int64_t n = r.begin; n < r.end && !(kFloatRows<T, D, DV> && fast); ++n) {
      for (int64_t h = 0, p = b * sh.nh; h < sh.nh; ++h, ++p) {
        int32_t& bad = poisoned[t * sh.nh + h];
        K.load(b, n, h, d, s.row.data());
        bad |= normalize(s.row.data(), d, knorm[p * N + n]);
        uint64_t* code = kcodes + (p * N + n) * nw;
        pack(s.row.data(), d, above_k, code);
        V.load(b, n, h, dv, s.vrow.data());
        bad |= nonfinite(s.vrow.data(), dv);
        histogram_add<DV>(s.hist.data() + h * hslot, groups, s.vrow.data(), dv, code);
      }
    }
    for (int64_t h = 0; h < sh.nh; ++h)
      fold<T, D, DV>(s.hist.data() + h * hslot, d, dv, partial.data() + (t * sh.nh + h) * slot);
  };

  // Image b's states (its chunks' partials added in order) and NaN flags.
  const auto finish_image = [&](int64_t b) {
    for (int64_t h = 0, p = b * sh.nh; h < sh.nh; ++h, ++p) {
      reduce_problem(sh, partial, slot, A(1), p, S.data() + p * slot);
      for (int64_t c = 0; c < sh.chunks; ++c) problem_nan[p] |= poisoned[(b * sh.chunks + c) * sh.nh + h];
      if (state != nullptr) std::copy(S.begin() + p * slot, S.begin() + (p + 1) * slot, state + p * slot);
    }
  };

  // Pass 3 on task t: q's codes and the output rows.
  const auto q_pass = [&](int64_t t, Scratch& s) {
    [[maybe_unused]] const int64_t d = D ? D : sh.d, dv = DV ? DV : sh.dv;    // constants when D, DV > 0
    const int64_t b = t / sh.chunks;
    const Range r = sh.chunk(t % sh.chunks);
    if (b != s.tables_of) image_tables<A, kFloatRows<T, D, DV> ? D : 0>(sh, S.data(), s.tables_of = b, s.tables.data());
#if defined(__AVX2__) && defined(__FMA__)
    if constexpr (kFloatRows<T, D, DV>) {
      if (fast) {
        q_task<D>(FloatTask{Q, V, b, r.begin, r.end, sh.nh, N}, qnorm, above_q, problem_nan.data() + b * sh.nh,
                  s.tables.data(), qcodes, unorm, o);
        return;
      }
    }
#endif
    for (int64_t n = r.begin; n < r.end; ++n) {
      for (int64_t h = 0, p = b * sh.nh; h < sh.nh; ++h, ++p) {
        A* acc = s.acc.data();
        Q.load(b, n, h, d, s.row.data());
        const bool nan = normalize(s.row.data(), d, qnorm[p * N + n]) || problem_nan[p];
        uint64_t* code = qcodes + (p * N + n) * nw;
        pack(s.row.data(), d, above_q, code);
        code_times<DV>(acc, s.tables.data() + h * hslot, groups, dv, code);
        V.load(b, n, h, dv, s.vrow.data());
        for (int64_t j = 0; j < dv; ++j) acc[j] = A(0.5) * s.vrow[j] + inv_pi * acc[j];
        const A nu = nan ? std::numeric_limits<A>::quiet_NaN() : norm_of(acc, dv);
        unorm[p * N + n] = nu;
        const A inv = A(1) / nu;
        T* dst = o + ((b * N + n) * sh.nh + h) * dv;
        for (int64_t j = 0; j < dv; ++j) dst[j] = static_cast<T>(acc[j] * inv);
      }
    }
  };

  if (sh.B >= 4 * at::get_num_threads()) {
    at::parallel_for(0, sh.B, 1, [&](int64_t b0, int64_t b1) {
      Scratch s = scratch();
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t c = 0; c < sh.chunks; ++c) k_pass(b * sh.chunks + c, s);
        finish_image(b);
        for (int64_t c = 0; c < sh.chunks; ++c) q_pass(b * sh.chunks + c, s);
      }
    });
  } else {
    at::parallel_for(0, sh.tasks(), 1, [&](int64_t t0, int64_t t1) {
      Scratch s = scratch();
      for (int64_t t = t0; t < t1; ++t) k_pass(t, s);
    });
    at::parallel_for(0, sh.B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) finish_image(b);
    });
    at::parallel_for(0, sh.tasks(), 1, [&](int64_t t0, int64_t t1) {
      Scratch s = scratch();
      for (int64_t t = t0; t < t1; ++t) q_pass(t, s);
    });
  }
}

template <typename T, int D, int DV>
void backward_impl(const Shape& sh, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const uint64_t* codes, const Acc<T>* norms,
                   const Acc<T>* state, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv_t) {
  using A = Acc<T>;
  const View4<T> Q(q), K(k), V(v), G(grad_out), O(out);
  const int64_t N = sh.N, d = D ? D : sh.d, dv = DV ? DV : sh.dv, nw = sh.words, P = sh.problems(), plane = P * N;
  [[maybe_unused]] const bool fast =
      kFloatRows<T, D, DV> && unit_rows({&grad_out, &q, &k, &v, &out}) && dq.stride(3) == 1 && dv_t.stride(3) == 1;
  const uint64_t* qcodes = codes;
  const uint64_t* kcodes = codes + plane * nw;
  const A *qnorm = norms, *knorm = norms + plane, *unorm = norms + 2 * plane;
  const A inv_pi = static_cast<A>(kInvPi);
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv_t.data_ptr<T>();
  const int64_t slot = d * dv;

  // S^T [dv, d] per problem: S du is then a sum of its rows scaled by du's elements.
  const std::vector<A> St = transposed(state, P, d, dv);

  // Pass A: du, dv = 0.5 du, dq, and the partial q_b^T du.
  const int64_t groups = nibble_groups(d), hslot = groups * kSubsets * dv;
  std::vector<A> partial(sh.tasks() * sh.nh * slot);
  at::parallel_for(0, sh.tasks(), 1, [&](int64_t t0, int64_t t1) {
    [[maybe_unused]] const int64_t d = D ? D : sh.d, dv = DV ? DV : sh.dv;    // constants when D, DV > 0
    std::vector<A> g(dv), o(dv), xn(d), grad(d), hist(sh.nh * hslot);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / sh.chunks;
      const Range r = sh.chunk(t % sh.chunks);
      std::fill(hist.begin(), hist.end(), A(0));
      for (int64_t n = r.begin; n < r.end; ++n)
      for (int64_t h = 0, p = b * sh.nh; h < sh.nh; ++h, ++p) {
        const A* Stp = St.data() + p * slot;
        const int64_t row = p * N + n;
#if defined(__AVX2__) && defined(__FMA__)
        if constexpr (kFloatRows<T, D, DV>) {
          if (fast) {
            const auto gr = FloatRow<D>::load(G.row(b, n, h)), ou = FloatRow<D>::load(O.row(b, n, h));
            const __m256 go = _mm256_set1_ps(gr.dot(ou)), inv_u = _mm256_set1_ps(1.0f / unorm[row]);
            FloatRow<D> du;
            for (int c = 0; c < FloatRow<D>::kV; ++c) du.v[c] = _mm256_mul_ps(_mm256_fnmadd_ps(ou.v[c], go, gr.v[c]), inv_u);
            du.scaled(0.5f).store(dvp + ((b * N + n) * sh.nh + h) * dv);
            const auto grad = FloatRow<D>::rows_times(Stp, du, inv_pi);
            const auto xn = FloatRow<D>::load(Q.row(b, n, h)).scaled(1.0f / qnorm[row]);
            through_norm_row(xn, grad, qnorm[row]).store(dqp + ((b * N + n) * sh.nh + h) * d);
            du.add_to_histogram(hist.data() + h * hslot, qcodes[row]);
            continue;
          }
        }
#endif
        G.load(b, n, h, dv, g.data());
        O.load(b, n, h, dv, o.data());
        const A go = dot(g.data(), o.data(), dv);
        const A inv_u = A(1) / unorm[row];
        for (int64_t j = 0; j < dv; ++j) g[j] = (g[j] - o[j] * go) * inv_u;     // g is du from here on
        T* dvrow = dvp + ((b * N + n) * sh.nh + h) * dv;
        for (int64_t j = 0; j < dv; ++j) dvrow[j] = static_cast<T>(A(0.5) * g[j]);
        rows_times(grad.data(), Stp, d, g.data(), dv, inv_pi);
        Q.load(b, n, h, d, xn.data());
        normalize(xn.data(), d, qnorm[row]);
        through_norm<T>(xn.data(), grad.data(), d, qnorm[row], dqp + ((b * N + n) * sh.nh + h) * d);
        histogram_add<DV>(hist.data() + h * hslot, groups, g.data(), dv, qcodes + row * nw);
      }
      for (int64_t h = 0; h < sh.nh; ++h)
        fold<T, D, DV>(hist.data() + h * hslot, d, dv, partial.data() + (t * sh.nh + h) * slot);
    }
  });
  std::vector<A> dS(P * slot);
  reduce_chunks(sh, partial, slot, inv_pi, dS.data());
  const std::vector<A> dSt = transposed(dS.data(), P, d, dv);

  // Pass B: dk and dv += k_b dS.
  at::parallel_for(0, sh.tasks(), 1, [&](int64_t t0, int64_t t1) {
    [[maybe_unused]] const int64_t d = D ? D : sh.d, dv = DV ? DV : sh.dv;    // constants when D, DV > 0
    std::vector<A> vrow(dv), xn(d), grad(d), acc(dv), tables(sh.nh * hslot);
    int64_t tables_of = -1;                     // the image whose tables `tables` holds
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / sh.chunks;
      const Range r = sh.chunk(t % sh.chunks);
      if (b != tables_of) image_tables<A, kFloatRows<T, D, DV> ? D : 0>(sh, dS.data(), tables_of = b, tables.data());
      for (int64_t n = r.begin; n < r.end; ++n)
      for (int64_t h = 0, p = b * sh.nh; h < sh.nh; ++h, ++p) {
        const A* dStp = dSt.data() + p * slot;
        const int64_t row = p * N + n;
#if defined(__AVX2__) && defined(__FMA__)
        if constexpr (kFloatRows<T, D, DV>) {
          if (fast) {
            const auto grad = FloatRow<D>::rows_times(dStp, FloatRow<D>::load(V.row(b, n, h)), 1.0f);
            const auto xn = FloatRow<D>::load(K.row(b, n, h)).scaled(1.0f / knorm[row]);
            through_norm_row(xn, grad, knorm[row]).store(dkp + ((b * N + n) * sh.nh + h) * d);
            float* dvrow = dvp + ((b * N + n) * sh.nh + h) * dv;
            const auto acc = FloatRow<D>::from_table(tables.data() + h * hslot, kcodes[row]);
            auto prev = FloatRow<D>::load(dvrow);
            for (int c = 0; c < FloatRow<D>::kV; ++c) prev.v[c] = _mm256_add_ps(prev.v[c], acc.v[c]);
            prev.store(dvrow);
            continue;
          }
        }
#endif
        V.load(b, n, h, dv, vrow.data());
        rows_times(grad.data(), dStp, d, vrow.data(), dv, A(1));
        K.load(b, n, h, d, xn.data());
        normalize(xn.data(), d, knorm[row]);
        through_norm<T>(xn.data(), grad.data(), d, knorm[row], dkp + ((b * N + n) * sh.nh + h) * d);
        code_times<DV>(acc.data(), tables.data() + h * hslot, groups, dv, kcodes + row * nw);
        T* dvrow = dvp + ((b * N + n) * sh.nh + h) * dv;
        for (int64_t j = 0; j < dv; ++j) dvrow[j] = static_cast<T>(static_cast<A>(dvrow[j]) + acc[j]);
      }
    }
  });
}

// Calls f(HeadDims<d, dv>{}) with ShiftAddViT's head dims as constants (16, 32, 64, d == dv), else with
// HeadDims<0, 0>{} (the sizes read from sh at run time).
template <int D, int DV>
struct HeadDims {
  static constexpr int d = D, dv = DV;
};
template <typename F>
void with_head_dims(const Shape& sh, F&& f) {
  if (sh.d == sh.dv && sh.d == 32) return f(HeadDims<32, 32>{});
  if (sh.d == sh.dv && sh.d == 16) return f(HeadDims<16, 16>{});
  if (sh.d == sh.dv && sh.d == 64) return f(HeadDims<64, 64>{});
  f(HeadDims<0, 0>{});
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}}) {
    check_dtype_in(t, name, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
    check_device_type(t, name, c10::DeviceType::CPU);
    check_dim_in(t, name, 4, 4);
  }
  check_same_dtype(q, "q", k, "k");
  check_same_dtype(q, "q", v, "v");
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "k: expected the shape of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes().slice(0, 3) == q.sizes().slice(0, 3), "v: expected shape ", q.sizes().slice(0, 3),
                    " + [head_dim_v], got ", v.sizes());
  check_nonempty_dim(q, "q", 3, "head_dim");
  check_nonempty_dim(v, "v", 3, "head_dim");
}

at::ScalarType acc_type(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_saved(const at::Tensor& q, const at::Tensor& v, const at::Tensor& codes, const at::Tensor& norms,
                 const at::Tensor& state) {
  const int64_t B = q.size(0), N = q.size(1), nh = q.size(2), d = q.size(3), dv = v.size(3);
  check_dtype_in(codes, "codes", {at::kLong});
  check_same_device(q, "q", codes, "codes");
  const std::vector<int64_t> cshape{2, B, nh, N, ceil_div(d, 64)};
  TORCH_CHECK_VALUE(codes.sizes() == at::IntArrayRef(cshape), "codes: expected shape ", cshape, ", got ",
                    codes.sizes(), " (an empty one means the forward ran with save_for_backward=False)");
  const at::ScalarType acc = acc_type(q);
  check_dtype_in(norms, "norms", {acc});
  check_same_device(q, "q", norms, "norms");
  const std::vector<int64_t> nshape{3, B, nh, N};
  TORCH_CHECK_VALUE(norms.sizes() == at::IntArrayRef(nshape), "norms: expected shape ", nshape, ", got ",
                    norms.sizes());
  check_dtype_in(state, "state", {acc});
  check_same_device(q, "q", state, "state");
  const std::vector<int64_t> sshape{B, nh, d, dv};
  TORCH_CHECK_VALUE(state.sizes() == at::IntArrayRef(sshape), "state: expected shape ", sshape, ", got ",
                    state.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> binary_linear_attention_fwd(const at::Tensor& q,
                                                                                     const at::Tensor& k,
                                                                                     const at::Tensor& v,
                                                                                     bool save_for_backward) {
  check_qkv(q, k, v);
  const Shape sh = shape_of(q, v);
  at::Tensor out = at::empty({sh.B, sh.N, sh.nh, sh.dv}, q.options());
  const auto acc = q.options().dtype(acc_type(q));
  at::Tensor codes = at::empty({2, sh.B, sh.nh, sh.N, sh.words}, q.options().dtype(at::kLong));
  at::Tensor norms = at::empty({3, sh.B, sh.nh, sh.N}, acc);
  at::Tensor state = save_for_backward ? at::empty({sh.B, sh.nh, sh.d, sh.dv}, acc) : at::empty({0}, acc);
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "binary_linear_attention_fwd", [&] {
      with_head_dims(sh, [&](auto dims) {
        forward_impl<scalar_t, decltype(dims)::d, decltype(dims)::dv>(
            sh, q, k, v, out, reinterpret_cast<uint64_t*>(codes.data_ptr<int64_t>()), norms.data_ptr<Acc<scalar_t>>(),
            save_for_backward ? state.data_ptr<Acc<scalar_t>>() : nullptr);
      });
    });
  } else if (save_for_backward) {
    state.zero_();
  }
  if (!save_for_backward) return {out, at::empty({0}, codes.options()), at::empty({0}, acc), state};
  return {out, codes, norms, state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> binary_linear_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& codes, const at::Tensor& norms, const at::Tensor& state) {
  check_qkv(q, k, v);
  const std::vector<int64_t> oshape{q.size(0), q.size(1), q.size(2), v.size(3)};
  check_like(grad_out, "grad_out", q, oshape);
  check_like(out, "out", q, oshape);
  check_saved(q, v, codes, norms, state);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), q.options());
  at::Tensor dv = at::empty(v.sizes(), q.options());
  const Shape sh = shape_of(q, v);
  if (dq.numel() == 0) return {dq, dk, dv};
  const at::Tensor n = norms.contiguous(), s = state.contiguous(), c = codes.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "binary_linear_attention_bwd", [&] {
    with_head_dims(sh, [&](auto dims) {
      backward_impl<scalar_t, decltype(dims)::d, decltype(dims)::dv>(
          sh, grad_out, q, k, v, out, reinterpret_cast<const uint64_t*>(c.data_ptr<int64_t>()),
          n.data_ptr<Acc<scalar_t>>(), s.data_ptr<Acc<scalar_t>>(), dq, dk, dv);
    });
  });
  return {dq, dk, dv};
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "binary_linear_attention_fwd", vitk::Backend::kCpu, &vitk::cpu::binary_linear_attention_fwd);
  VITK_IMPL(m, "binary_linear_attention_bwd", vitk::Backend::kCpu, &vitk::cpu::binary_linear_attention_bwd);
}
