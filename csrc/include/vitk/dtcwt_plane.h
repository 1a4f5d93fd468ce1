// One level of the 2-D dual-tree complex wavelet transform on one image plane, torch-free: the
// engine behind dtcwt2d, idtcwt2d, their adjoints and svt_spectral_mix.
//
// Both directions are separable filter banks over the half-sample symmetric extension of the plane.
// Each 1-D filtering with an odd symmetric filter over that extension is a symmetric matrix (the
// reflected taps pair up), so the adjoint of the analysis bank is the synthesis bank run with the
// analysis filters, and the other way round: one analysis and one synthesis routine serve all four
// ops, told which filter pair to use.
//
// Analysis of an H x W plane (H, W even): every row filtered with the lowpass and the highpass
// (rows of the L and Hh planes, held in cache), then per pair of output rows the four column
// filterings (ll, lh, hl, hh) and the quad-to-complex combination of lh, hh and hl straight into
// the six orientation rows, so no full-size highpass plane exists. Synthesis: the quads of the six
// orientations back into three planes, then per output row the column filters summed into a low and
// a high row, each extended and row-filtered into the output row.
//
// Rows are read, and written, through callables so the callers choose layouts and dtypes (strided
// inputs, channels-last, odd-size padding, the adjoint's folding) without copies.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace vitk {
namespace dtcwt {

// The longest filter half-length (near_sym_b's 19-tap filters).
constexpr int kMaxHalf = 9;

// Kingsbury's near_sym_b level-1 filters (all symmetric): analysis lowpass h0 (13 taps) and
// highpass h1 (19 taps); the synthesis pair g0[n] = (-1)^(n+1) h1[n], g1[n] = (-1)^n h0[n].
constexpr double kH0[13] = {-0.0017578125, 0.0, 0.022265625, -0.046875, -0.0482421875, 0.296875, 0.55546875,
                            0.296875, -0.0482421875, -0.046875, 0.022265625, 0.0, -0.0017578125};
constexpr double kH1[19] = {-7.062639508928571e-05, 0.0, 0.0013419015066964285, -0.0018833705357142855,
                            -0.007156808035714285, 0.023856026785714284, 0.05564313616071428,
                            -0.05168805803571428, -0.29975760323660716, 0.5594308035714286,
                            -0.29975760323660716, -0.05168805803571428, 0.05564313616071428,
                            0.023856026785714284, -0.007156808035714285, -0.0018833705357142855,
                            0.0013419015066964285, 0.0, -7.062639508928571e-05};
constexpr double kInvSqrt2 = 0.70710678118654752440;

// A symmetric odd-length filter as its centre tap and the taps to one side: y[j] = c x[j] +
// sum_d side[d-1] (x[j-d] + x[j+d]), half the multiplies of the full form.
template <typename acc_t>
struct Filter {
  int half = 0;
  acc_t centre = 0;
  acc_t side[kMaxHalf] = {};
};

template <typename acc_t>
Filter<acc_t> make_filter(const double* taps, int n) {
  Filter<acc_t> f;
  f.half = n / 2;
  f.centre = static_cast<acc_t>(taps[f.half]);
  for (int d = 1; d <= f.half; ++d) f.side[d - 1] = static_cast<acc_t>(taps[f.half + d]);
  return f;
}

// The lowpass and highpass of one bank.
template <typename acc_t>
struct Bank {
  Filter<acc_t> lo, hi;
};

// analysis(h0, h1) is the forward transform and synthesis(h0, h1) its adjoint;
// synthesis(g0, g1) is the inverse and analysis(g0, g1) its adjoint.
template <typename acc_t>
Bank<acc_t> analysis_bank() {
  return {make_filter<acc_t>(kH0, 13), make_filter<acc_t>(kH1, 19)};
}
template <typename acc_t>
Bank<acc_t> synthesis_bank() {
  double g0[19], g1[13];
  for (int n = 0; n < 19; ++n) g0[n] = (n % 2 ? 1.0 : -1.0) * kH1[n];
  for (int n = 0; n < 13; ++n) g1[n] = (n % 2 ? -1.0 : 1.0) * kH0[n];
  return {make_filter<acc_t>(g0, 19), make_filter<acc_t>(g1, 13)};
}

// Index p of the half-sample symmetric extension of a length-n signal (any p, repeated reflections).
inline int64_t reflect(int64_t p, int64_t n) {
  const int64_t period = 2 * n;
  p %= period;
  if (p < 0) p += period;
  return p < n ? p : period - 1 - p;
}

// The positions the extension's 2 * kMaxHalf values come from, for a line of length n: x[-d]
// = x[at[d - 1]] and x[n - 1 + d] = x[at[kMaxHalf + d - 1]]. Computed once per plane size (the
// modulo in reflect costs more than the copies).
struct Extension {
  int64_t n = -1;
  int64_t at[2 * kMaxHalf];
  void size_for(int64_t len) {
    if (len == n) return;
    n = len;
    for (int d = 1; d <= kMaxHalf; ++d) {
      at[d - 1] = reflect(-d, n);
      at[kMaxHalf + d - 1] = reflect(n - 1 + d, n);
    }
  }
};

// ext holds x[-kMaxHalf .. n + kMaxHalf) for x = ext + kMaxHalf, x[0..n) already written.
template <typename acc_t>
inline void extend(acc_t* ext, const Extension& e) {
  acc_t* x = ext + kMaxHalf;
  for (int d = 1; d <= kMaxHalf; ++d) {
    x[-d] = x[e.at[d - 1]];
    x[e.n - 1 + d] = x[e.at[kMaxHalf + d - 1]];
  }
}

// Output positions are produced kLanes at a time (one 64-byte chunk), every tap accumulated in
// registers before the one store: per tap pair only the two input loads remain. The lines a filter
// reads are given as pointers per tap offset d in [-kMaxHalf, kMaxHalf] (taps[kMaxHalf + d]): a row
// with its extension, or the reflected rows of a plane for a column filter. Buffers are padded so a
// chunk may read and write up to kLanes - 1 values past the end of a line.
//
// The arithmetic is on GCC vector types (the widest the target has, up to 64 bytes; a chunk is
// kUnroll of them) and the half-lengths are template arguments (the banks hold 6 and 9), so the tap
// loop unrolls with no test per tap and the accumulators are values in registers. Written as
// `omp simd` loops over arrays, GCC kept the accumulators in stack arrays, reloading and storing them
// at every tap (a 56 x 56 forward plane on one thread: 9.5 ns per pixel then, 7.1 now).
template <typename acc_t>
constexpr int kLanes = 64 / static_cast<int>(sizeof(acc_t));

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#else
constexpr int kVectorBytes = 32;
#endif
constexpr int kUnroll = 64 / kVectorBytes;

template <typename acc_t>
struct Vector {
  typedef acc_t type __attribute__((vector_size(kVectorBytes)));
};
template <typename acc_t>
constexpr int kVectorLanes = kVectorBytes / static_cast<int>(sizeof(acc_t));

template <typename acc_t>
inline typename Vector<acc_t>::type vload(const acc_t* p) {
  typename Vector<acc_t>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename acc_t>
inline void vstore(acc_t* p, typename Vector<acc_t>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// The taps of a filter as a flat array: c[0] the centre, c[d] the pair at distance d, zero past
// its half-length up to N.
template <int N, typename acc_t>
inline void flat_taps(const Filter<acc_t>& f, acc_t* c) {
  c[0] = f.centre;
  for (int d = 1; d <= N; ++d) c[d] = d <= f.half ? f.side[d - 1] : acc_t(0);
}

// y1 = f1 * lines, y2 = f2 * lines (two filters over the same input, sharing its loads), for
// filters of half-lengths H1 and H2.
template <int H1, int H2, typename acc_t>
inline void filter_pair(const acc_t* const* taps, int64_t n, const Filter<acc_t>& f1, const Filter<acc_t>& f2,
                        acc_t* __restrict y1, acc_t* __restrict y2) {
  using vec = typename Vector<acc_t>::type;
  constexpr int L = kVectorLanes<acc_t>, U = kUnroll;
  constexpr int Hm = H1 > H2 ? H1 : H2;
  acc_t c1[Hm + 1], c2[Hm + 1];
  flat_taps<Hm>(f1, c1);
  flat_taps<Hm>(f2, c2);
  for (int64_t j0 = 0; j0 < n; j0 += U * L) {
    vec a1[U], a2[U];
#pragma GCC unroll 2
    for (int u = 0; u < U; ++u) {
      const vec x = vload(taps[kMaxHalf] + j0 + u * L);
      a1[u] = c1[0] * x;
      a2[u] = c2[0] * x;
    }
    // Zero taps are applied too, so a NaN or inf anywhere in the support gives NaN as in a convolution.
#pragma GCC unroll 16
    for (int d = 1; d <= Hm; ++d) {
#pragma GCC unroll 2
      for (int u = 0; u < U; ++u) {
        const vec sum = vload(taps[kMaxHalf - d] + j0 + u * L) + vload(taps[kMaxHalf + d] + j0 + u * L);
        if (d <= H1) a1[u] += c1[d] * sum;
        if (d <= H2) a2[u] += c2[d] * sum;
      }
    }
#pragma GCC unroll 2
    for (int u = 0; u < U; ++u) {
      vstore(y1 + j0 + u * L, a1[u]);
      vstore(y2 + j0 + u * L, a2[u]);
    }
  }
}

// acc[u] += c[d] * (x[j - d] + x[j + d]) for d = 1..H, over the chunk at j0 of the lines `taps`.
template <int H, typename acc_t>
inline void add_tap_pairs(typename Vector<acc_t>::type* acc, const acc_t* const* taps, const acc_t* c, int64_t j0) {
  constexpr int L = kVectorLanes<acc_t>;
#pragma GCC unroll 16
  for (int d = 1; d <= H; ++d) {
#pragma GCC unroll 2
    for (int u = 0; u < kUnroll; ++u)
      acc[u] += c[d] * (vload(taps[kMaxHalf - d] + j0 + u * L) + vload(taps[kMaxHalf + d] + j0 + u * L));
  }
}

// y = fa * lines_a + fb * lines_b (two filtered inputs summed, as the synthesis bank does), for
// filters of half-lengths HA and HB: both centre taps, then a's pairs, then b's.
template <int HA, int HB, typename acc_t>
inline void filter_sum(const acc_t* const* ta, const Filter<acc_t>& fa, const acc_t* const* tb,
                       const Filter<acc_t>& fb, int64_t n, acc_t* __restrict y) {
  constexpr int L = kVectorLanes<acc_t>;
  acc_t ca[HA + 1], cb[HB + 1];
  flat_taps<HA>(fa, ca);
  flat_taps<HB>(fb, cb);
  for (int64_t j0 = 0; j0 < n; j0 += kUnroll * L) {
    typename Vector<acc_t>::type acc[kUnroll];
#pragma GCC unroll 2
    for (int u = 0; u < kUnroll; ++u)
      acc[u] = ca[0] * vload(ta[kMaxHalf] + j0 + u * L) + cb[0] * vload(tb[kMaxHalf] + j0 + u * L);
    add_tap_pairs<HA>(acc, ta, ca, j0);
    add_tap_pairs<HB>(acc, tb, cb, j0);
#pragma GCC unroll 2
    for (int u = 0; u < kUnroll; ++u) vstore(y + j0 + u * L, acc[u]);
  }
}

// The tap pointers of an extended line x (x[-kMaxHalf .. n + kMaxHalf) valid).
template <typename acc_t>
inline void line_taps(const acc_t* x, const acc_t** taps) {
  for (int d = -kMaxHalf; d <= kMaxHalf; ++d) taps[kMaxHalf + d] = x + d;
}

// The tap pointers of a column filter at output row i of plane [H][W]: its reflected rows, from the
// table rows[i + kMaxHalf + d] of reflected row indices (Scratch::rows_at).
template <typename acc_t>
inline void column_taps(const acc_t* plane, int64_t W, const int64_t* rows, int64_t i, const acc_t** taps) {
  for (int d = -kMaxHalf; d <= kMaxHalf; ++d) taps[kMaxHalf + d] = plane + rows[i + kMaxHalf + d] * W;
}

// The quad map and its inverse (also its transpose), on x = (x0[2j], x0[2j + 1], x1[2j], x1[2j + 1]):
// the quads a b / c d to the complex pair z1 = (a - d) + i(b + c), z2 = (a + d) + i(b - c), and back.
// map() is the per-value form (the tail of a row); vmap() does whole vectors of interleaved pairs as
// a swap of each pair's two values and an alternating sign. GCC left the per-value loop
// scalar, two values per instruction, which took about 40% of the analysis outside the filters.
template <typename acc_t>
inline typename Vector<acc_t>::type swap_pairs(typename Vector<acc_t>::type v) {
  typedef typename std::conditional<sizeof(acc_t) == 4, int32_t, int64_t>::type lane_t;
  typedef lane_t mask_t __attribute__((vector_size(kVectorBytes)));
  mask_t m;
  for (int l = 0; l < kVectorLanes<acc_t>; ++l) m[l] = l ^ 1;
  return __builtin_shuffle(v, m);
}
// (-1, +1, -1, +1, ...)
template <typename acc_t>
inline typename Vector<acc_t>::type minus_plus() {
  typename Vector<acc_t>::type n;
  for (int l = 0; l < kVectorLanes<acc_t>; ++l) n[l] = l % 2 ? acc_t(1) : acc_t(-1);
  return n;
}

struct QuadsToComplex {
  template <typename acc_t>
  static void map(acc_t a, acc_t b, acc_t c, acc_t d, acc_t* o) {
    o[0] = a - d;
    o[1] = b + c;
    o[2] = a + d;
    o[3] = b - c;
  }
  // x0 = (a, b), x1 = (c, d) per pair: o0 = x0 + (-d, c), o1 = x0 - (-d, c).
  template <typename acc_t, typename vec>
  static void vmap(vec x0, vec x1, vec& o0, vec& o1) {
    const vec t = minus_plus<acc_t>() * swap_pairs<acc_t>(x1);
    o0 = x0 + t;
    o1 = x0 - t;
  }
};
struct ComplexToQuads {
  template <typename acc_t>
  static void map(acc_t p, acc_t q, acc_t u, acc_t v, acc_t* o) {
    o[0] = p + u;
    o[1] = q + v;
    o[2] = q - v;
    o[3] = u - p;
  }
  // z1 = (p, q), z2 = (u, v) per pair: o0 = z1 + z2, o1 = (q - v, u - p) = -(-1, +1) swap(z1 - z2).
  template <typename acc_t, typename vec>
  static void vmap(vec z1, vec z2, vec& o0, vec& o1) {
    o0 = z1 + z2;
    o1 = -minus_plus<acc_t>() * swap_pairs<acc_t>(z1 - z2);
  }
};

// (o0[2j], o0[2j + 1], o1[2j], o1[2j + 1]) = Map(x) / sqrt(2) for j < w: pairs interleaved in each row.
template <typename Map, typename acc_t>
inline void quad_map(const acc_t* __restrict x0, const acc_t* __restrict x1, int64_t w, acc_t* __restrict o0,
                     acc_t* __restrict o1) {
  using vec = typename Vector<acc_t>::type;
  constexpr int L = kVectorLanes<acc_t>;
  const acc_t s = static_cast<acc_t>(kInvSqrt2);
  int64_t j = 0;
  for (; 2 * j + L <= 2 * w; j += L / 2) {
    vec p, q;
    Map::template vmap<acc_t>(vload(x0 + 2 * j), vload(x1 + 2 * j), p, q);
    vstore(o0 + 2 * j, s * p);
    vstore(o1 + 2 * j, s * q);
  }
  for (; j < w; ++j) {
    acc_t o[4];
    Map::map(x0[2 * j], x0[2 * j + 1], x1[2 * j], x1[2 * j + 1], o);
    o0[2 * j] = s * o[0];
    o0[2 * j + 1] = s * o[1];
    o1[2 * j] = s * o[2];
    o1[2 * j + 1] = s * o[3];
  }
}

// Rows r0 (even) and r1 (odd) of a subband, W = 2w values each, into the two complex rows of its
// orientations, interleaved (re, im), scaled by 1/sqrt(2).
template <typename acc_t>
inline void quads_to_complex(const acc_t* r0, const acc_t* r1, int64_t w, acc_t* z1, acc_t* z2) {
  quad_map<QuadsToComplex>(r0, r1, w, z1, z2);
}

// The inverse: two complex rows back into rows r0 and r1 of the subband.
template <typename acc_t>
inline void complex_to_quads(const acc_t* z1, const acc_t* z2, int64_t w, acc_t* r0, acc_t* r1) {
  quad_map<ComplexToQuads>(z1, z2, w, r0, r1);
}

// Which subband (0 lh, 1 hl, 2 hh) and which of its two complex images each orientation is, in the
// order 15, 45, 75, 105, 135, 165 degrees.
constexpr int kOrientBand[6] = {0, 2, 1, 1, 2, 0};
constexpr int kOrientPart[6] = {0, 0, 0, 1, 1, 1};

// Per-thread buffers, sized once per plane size, zeroed once (the padding chunks read stays finite),
// with the extension's positions and the table of reflected row indices for that size.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> planes, rows;
  std::vector<int64_t> rows_at;  // rows_at[i + kMaxHalf] = reflect(i, H) for i in [-kMaxHalf, H + kMaxHalf)
  Extension ext;
  int64_t pitch = 0, height = -1;
  void size_for(int64_t H, int64_t W, int n_planes) {
    const size_t want = static_cast<size_t>(n_planes * (H * W + kLanes<acc_t>));
    if (planes.size() < want) planes.resize(want);
    pitch = (W + kLanes<acc_t> - 1) / kLanes<acc_t> * kLanes<acc_t> + 2 * kMaxHalf + kLanes<acc_t>;
    if (rows.size() < static_cast<size_t>(10 * pitch)) rows.resize(static_cast<size_t>(10 * pitch));
    ext.size_for(W);
    if (height != H) {
      height = H;
      rows_at.resize(static_cast<size_t>(H + 2 * kMaxHalf));
      for (int64_t i = -kMaxHalf; i < H + kMaxHalf; ++i) rows_at[i + kMaxHalf] = reflect(i, H);
    }
  }
  // Each plane is followed by one chunk of padding, so a chunk run past its last row stays its own.
  acc_t* plane(int k, int64_t H, int64_t W) { return planes.data() + k * (H * W + kLanes<acc_t>); }
  acc_t* row(int k) { return rows.data() + k * pitch + kMaxHalf; }
};

// Both banks pair a 13-tap and a 19-tap filter (half-lengths 6 and 9): the lowpass is the short one
// in analysis_bank, the long one in synthesis_bank. f(lo_half, hi_half) runs with them as constants.
template <typename acc_t, typename F>
inline void with_halves(const Bank<acc_t>& bank, F&& f) {
  if (bank.lo.half == 6)
    f(std::integral_constant<int, 6>{}, std::integral_constant<int, 9>{});
  else
    f(std::integral_constant<int, 9>{}, std::integral_constant<int, 6>{});
}

// Analysis of one H x W plane (both even). load_row(r, dst) writes row r (W values);
// store_low(r, row) takes row r of ll; store_band(o, i, row) row i of orientation o (2w = W values,
// interleaved re, im).
template <typename acc_t, typename LoadRow, typename StoreLow, typename StoreBand>
void analysis(int64_t H, int64_t W, const Bank<acc_t>& bank, Scratch<acc_t>& s, LoadRow&& load_row,
              StoreLow&& store_low, StoreBand&& store_band) {
  with_halves(bank, [&](auto lo_half, auto hi_half) {
    constexpr int HL = decltype(lo_half)::value, HH = decltype(hi_half)::value;
    s.size_for(H, W, 2);
    acc_t* L = s.plane(0, H, W);
    acc_t* Hh = s.plane(1, H, W);
    acc_t* ext = s.row(0);
    const int64_t* rows_at = s.rows_at.data();
    const acc_t* taps[2 * kMaxHalf + 1];
    line_taps<acc_t>(ext, taps);
    // Row r's outputs run up to kLanes - 1 values into row r + 1, which is written after it.
    for (int64_t r = 0; r < H; ++r) {
      load_row(r, ext);
      extend(ext - kMaxHalf, s.ext);
      filter_pair<HL, HH>(taps, W, bank.lo, bank.hi, L + r * W, Hh + r * W);
    }
    const int64_t w = W / 2;
    acc_t* band[3][2] = {{s.row(1), s.row(2)}, {s.row(3), s.row(4)}, {s.row(5), s.row(6)}};
    acc_t* z[2] = {s.row(7), s.row(8)};
    acc_t* low = s.row(9);
    for (int64_t i = 0; i < H / 2; ++i) {
      for (int k = 0; k < 2; ++k) {
        const int64_t r = 2 * i + k;
        column_taps<acc_t>(L, W, rows_at, r, taps);
        filter_pair<HL, HH>(taps, W, bank.lo, bank.hi, low, band[0][k]);
        store_low(r, static_cast<const acc_t*>(low));
        column_taps<acc_t>(Hh, W, rows_at, r, taps);
        filter_pair<HL, HH>(taps, W, bank.lo, bank.hi, band[1][k], band[2][k]);
      }
      for (int b = 0; b < 3; ++b) {
        quads_to_complex(band[b][0], band[b][1], w, z[0], z[1]);
        for (int o = 0; o < 6; ++o)
          if (kOrientBand[o] == b) store_band(o, i, static_cast<const acc_t*>(z[kOrientPart[o]]));
      }
    }
  });
}

// Synthesis of one H x W plane (both even). load_low(r, dst) writes row r of ll (W values);
// load_band(o, i, dst) row i of orientation o (W interleaved values); store(r, row) takes output row r.
template <typename acc_t, typename LoadLow, typename LoadBand, typename Store>
void synthesis(int64_t H, int64_t W, const Bank<acc_t>& bank, Scratch<acc_t>& s, LoadLow&& load_low,
               LoadBand&& load_band, Store&& store) {
  with_halves(bank, [&](auto lo_half, auto hi_half) {
    constexpr int HL = decltype(lo_half)::value, HH = decltype(hi_half)::value;
    s.size_for(H, W, 4);
    acc_t* P[4] = {s.plane(0, H, W), s.plane(1, H, W), s.plane(2, H, W), s.plane(3, H, W)};  // ll lh hl hh
    const int64_t w = W / 2;
    const int64_t* rows_at = s.rows_at.data();
    acc_t* z[2] = {s.row(0), s.row(1)};
    for (int64_t r = 0; r < H; ++r) load_low(r, P[0] + r * W);
    for (int64_t i = 0; i < H / 2; ++i) {
      for (int b = 0; b < 3; ++b) {
        for (int o = 0; o < 6; ++o)
          if (kOrientBand[o] == b) load_band(o, i, z[kOrientPart[o]]);
        complex_to_quads(z[0], z[1], w, P[1 + b] + 2 * i * W, P[1 + b] + (2 * i + 1) * W);
      }
    }
    acc_t* lo = s.row(2);
    acc_t* hi = s.row(3);
    acc_t* y = s.row(4);
    const acc_t* ta[2 * kMaxHalf + 1];
    const acc_t* tb[2 * kMaxHalf + 1];
    const acc_t* tl[2 * kMaxHalf + 1];
    const acc_t* th[2 * kMaxHalf + 1];
    line_taps<acc_t>(lo, tl);
    line_taps<acc_t>(hi, th);
    for (int64_t r = 0; r < H; ++r) {
      column_taps<acc_t>(P[0], W, rows_at, r, ta);
      column_taps<acc_t>(P[1], W, rows_at, r, tb);
      filter_sum<HL, HH>(ta, bank.lo, tb, bank.hi, W, lo);
      column_taps<acc_t>(P[2], W, rows_at, r, ta);
      column_taps<acc_t>(P[3], W, rows_at, r, tb);
      filter_sum<HL, HH>(ta, bank.lo, tb, bank.hi, W, hi);
      extend(lo - kMaxHalf, s.ext);
      extend(hi - kMaxHalf, s.ext);
      filter_sum<HL, HH>(tl, bank.lo, th, bank.hi, W, y);
      store(r, static_cast<const acc_t*>(y));
    }
  });
}

}  // namespace dtcwt
}  // namespace vitk
