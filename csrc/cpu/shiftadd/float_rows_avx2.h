// The per-token work of the binary linear attention for float rows of ShiftAddViT's head dims (16, 32,
// 64, q's and v's alike), with AVX2 and FMA: a row lives in D / 8 registers from its load to its
// store, and each step is a handful of instructions. The generic code of binary_linear_attention.cpp
// copies every row through a buffer and reduces it element by element; on a 32-wide head that was
// most of the kernel's time. Sums keep eight lanes (term i in lane i % 8) added in lanes_total's tree;
// the norms and the row sums of the means add a row's terms in float first (see norm and add_to), so
// the results may differ from the generic code's in the last bits.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace vitk {
namespace cpu {
namespace shiftadd_detail {

// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)) of the lanes lo = l0..l3, hi = l4..l7.
inline double lane_tree(__m256d lo, __m256d hi) {
  const __m256d s = _mm256_add_pd(lo, hi);
  const __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  return _mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t)));
}

inline __m256d low_pd(__m256 x) { return _mm256_cvtps_pd(_mm256_castps256_ps128(x)); }
inline __m256d high_pd(__m256 x) { return _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)); }

template <int D>
struct FloatRow {
  static_assert(D % 8 == 0 && D <= 64, "a row is whole AVX registers, and its code one 64-bit word");
  static constexpr int kV = D / 8;
  __m256 v[kV];

  static FloatRow load(const float* p) {
    FloatRow r;
    for (int c = 0; c < kV; ++c) r.v[c] = _mm256_loadu_ps(p + 8 * c);
    return r;
  }
  void store(float* p) const {
    for (int c = 0; c < kV; ++c) _mm256_storeu_ps(p + 8 * c, v[c]);
  }
  FloatRow scaled(float s) const {
    const __m256 m = _mm256_set1_ps(s);
    FloatRow r;
    for (int c = 0; c < kV; ++c) r.v[c] = _mm256_mul_ps(v[c], m);
    return r;
  }
  // sqrt of the sum of squares. The squares are summed in float lanes when that is exact enough: a
  // sum between 1e-30 and 1e30 has no square that overflowed and none that underflowed by more than
  // a part in 1e8 of it. Otherwise (and for NaN) in double lanes, as norm_of, so that no finite row
  // overflows or underflows.
  float norm() const {
    __m256 sq = _mm256_mul_ps(v[0], v[0]);
    for (int c = 1; c < kV; ++c) sq = _mm256_fmadd_ps(v[c], v[c], sq);
    const double s = lane_tree(low_pd(sq), high_pd(sq));
    if (s >= 1e-30 && s <= 1e30) return static_cast<float>(__builtin_sqrt(s));
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    for (int c = 0; c < kV; ++c) {
      const __m256d a = low_pd(v[c]), b = high_pd(v[c]);
      lo = _mm256_add_pd(lo, _mm256_mul_pd(a, a));
      hi = _mm256_add_pd(hi, _mm256_mul_pd(b, b));
    }
    return static_cast<float>(__builtin_sqrt(lane_tree(lo, hi)));
  }
  // The dot product with o in double, as dot.
  float dot(const FloatRow& o) const {
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    for (int c = 0; c < kV; ++c) {
      lo = _mm256_add_pd(lo, _mm256_mul_pd(low_pd(v[c]), low_pd(o.v[c])));
      hi = _mm256_add_pd(hi, _mm256_mul_pd(high_pd(v[c]), high_pd(o.v[c])));
    }
    return static_cast<float>(lane_tree(lo, hi));
  }
  // acc (lanes lo, hi) += the row's elements, lane by lane (lane i % 8 of a row is summed in float
  // first: D / 8 terms).
  void add_to(__m256d& lo, __m256d& hi) const {
    __m256 t = v[0];
    for (int c = 1; c < kV; ++c) t = _mm256_add_ps(t, v[c]);
    lo = _mm256_add_pd(lo, low_pd(t));
    hi = _mm256_add_pd(hi, high_pd(t));
  }
  bool has_nan() const {
    __m256 m = _mm256_cmp_ps(v[0], v[0], _CMP_UNORD_Q);
    for (int c = 1; c < kV; ++c) m = _mm256_or_ps(m, _mm256_cmp_ps(v[c], v[c], _CMP_UNORD_Q));
    return _mm256_movemask_ps(m) != 0;
  }
  // A NaN or an infinity: x - x is NaN exactly then.
  bool nonfinite() const {
    __m256 m = _mm256_setzero_ps();
    for (int c = 0; c < kV; ++c) {
      const __m256 z = _mm256_sub_ps(v[c], v[c]);
      m = _mm256_or_ps(m, _mm256_cmp_ps(z, z, _CMP_UNORD_Q));
    }
    return _mm256_movemask_ps(m) != 0;
  }
  // Bit i = element i > m (false for a NaN).
  uint64_t code(float m) const {
    const __m256 t = _mm256_set1_ps(m);
    uint64_t bits = 0;
    for (int c = 0; c < kV; ++c)
      bits |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(v[c], t, _CMP_GT_OQ))) << (8 * c);
    return bits;
  }
  // hist [D / 4, 16, D]: hist[g][nibble g of the code] += the row, for every g (histogram_add).
  void add_to_histogram(float* hist, uint64_t code) const {
    for (int g = 0; g < D / 4; ++g) {
      float* r = hist + (g * 16 + ((code >> (4 * g)) & 15)) * D;
      for (int c = 0; c < kV; ++c) _mm256_storeu_ps(r + 8 * c, _mm256_add_ps(_mm256_loadu_ps(r + 8 * c), v[c]));
    }
  }
  // The sum of one table row per nibble of the code (code_times; table [D / 4, 16, D]).
  static FloatRow from_table(const float* table, uint64_t code) {
    FloatRow r;
    for (int c = 0; c < kV; ++c) r.v[c] = _mm256_setzero_ps();
    for (int g = 0; g < D / 4; ++g) {
      const float* t = table + (g * 16 + ((code >> (4 * g)) & 15)) * D;
      for (int c = 0; c < kV; ++c) r.v[c] = _mm256_add_ps(r.v[c], _mm256_loadu_ps(t + 8 * c));
    }
    return r;
  }
  // scale * the sum over j of x[j] * rows[j] (rows [D, D] row-major), as rows_times.
  static FloatRow rows_times(const float* rows, const FloatRow& x, float scale) {
    alignas(32) float xs[D];
    x.store_aligned(xs);
    FloatRow r;
    for (int c = 0; c < kV; ++c) r.v[c] = _mm256_setzero_ps();
    for (int j = 0; j < D; ++j) {
      const __m256 xj = _mm256_broadcast_ss(xs + j);
      for (int c = 0; c < kV; ++c) r.v[c] = _mm256_fmadd_ps(xj, _mm256_loadu_ps(rows + j * D + 8 * c), r.v[c]);
    }
    return r.scaled(scale);
  }
  // rows [D, D] = the histogram [D / 4, 16, D] folded (fold_histogram): row 4g + j adds the entries
  // of group g whose index has bit j, in increasing index.
  static void fold(const float* hist, float* rows) {
    for (int row = 0; row < D; ++row) {
      const float* hg = hist + (row / 4) * 16 * D;
      FloatRow acc;
      for (int c = 0; c < kV; ++c) acc.v[c] = _mm256_setzero_ps();
      for (int e = 1; e < 16; ++e) {
        if (!((e >> (row % 4)) & 1)) continue;
        for (int c = 0; c < kV; ++c) acc.v[c] = _mm256_add_ps(acc.v[c], _mm256_loadu_ps(hg + e * D + 8 * c));
      }
      acc.store(rows + row * D);
    }
  }
  // table [D / 4, 16, D] = the subset sums of the rows [D, D] (subset_tables).
  static void tables(const float* rows, float* table) {
    for (int g = 0; g < D / 4; ++g) {
      float* tg = table + g * 16 * D;
      for (int c = 0; c < kV; ++c) _mm256_storeu_ps(tg + 8 * c, _mm256_setzero_ps());
      for (int e = 1; e < 16; ++e) {
        const float* base = tg + (e & (e - 1)) * D;
        const float* row = rows + (4 * g + __builtin_ctz(e)) * D;
        for (int c = 0; c < kV; ++c)
          _mm256_storeu_ps(tg + e * D + 8 * c, _mm256_add_ps(_mm256_loadu_ps(base + 8 * c), _mm256_loadu_ps(row + 8 * c)));
      }
    }
  }
  void store_aligned(float* p) const {
    for (int c = 0; c < kV; ++c) _mm256_store_ps(p + 8 * c, v[c]);
  }
};

// (grad, zeroed off the clamp's support [0, 1] of xn, minus xn times their dot product) / norm: the
// gradient through the normalization, as through_norm.
template <int D>
inline FloatRow<D> through_norm_row(const FloatRow<D>& xn, const FloatRow<D>& grad, float norm) {
  FloatRow<D> g;
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  for (int c = 0; c < FloatRow<D>::kV; ++c) {
    const __m256 inside = _mm256_and_ps(_mm256_cmp_ps(xn.v[c], zero, _CMP_GE_OQ), _mm256_cmp_ps(xn.v[c], one, _CMP_LE_OQ));
    g.v[c] = _mm256_and_ps(grad.v[c], inside);
  }
  const __m256 proj = _mm256_set1_ps(xn.dot(g));
  const __m256 inv = _mm256_set1_ps(1.0f / norm);
  FloatRow<D> r;
  for (int c = 0; c < FloatRow<D>::kV; ++c) r.v[c] = _mm256_mul_ps(_mm256_fnmadd_ps(xn.v[c], proj, g.v[c]), inv);
  return r;
}

}  // namespace shiftadd_detail
}  // namespace cpu
}  // namespace vitk
