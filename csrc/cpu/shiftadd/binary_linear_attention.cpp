// CPU kernels of ShiftAddViT's binary linear attention (the MatAdd core of LinAngularAttention_binary).
//
// Forward, three passes over the tokens, each cut into fixed chunks of one (image, head) problem so
// that the result does not depend on the thread count:
//   1. the norms of q and k, and the sums of the normalized values (in double, one partial per chunk,
//      added in chunk order): the global means;
//   2. k's codes, bit-packed in 64-bit words (bit = kn > mean), and each chunk's partial state
//      k_b^T v: for every set bit i of a token's code, v's row is added to state row i. Nothing is
//      multiplied by a code. The partials of a problem are added in chunk order;
//   3. q's codes, then per token 0.5 v + (1/pi) (the sum of the state rows of its set bits), its norm,
//      the normalized row stored.
// q and k are read twice, v twice; no float copy of the codes or of the normalized q and k is made.
//
// Non-finite inputs give what the official eager code gives: a token whose normalized q holds a NaN
// (a NaN or an infinity in q, or a zero q) has a NaN output row; a problem with such a k token, or
// with a NaN or infinity in v, has every output row NaN (its straight-through k_b^T v state holds a
// NaN or an infinity, which the dense q_b product spreads to every row). A NaN mean sets no bit.
//
// Backward: with du = (g - out (g . out)) / ||u||, dv = 0.5 du + k_b dS, dS = (1/pi) q_b^T du (again
// additions over set bits), dq_n = (1/pi) S du over the clamp's support and through the
// normalization, dk likewise with dS^T v. Two passes: du, dv's first term, dq and the partial dS per
// chunk; then dk and dv's second term. S du and dS v are taken from the transposed d x dv matrices,
// as sums of their rows scaled by du's (v's) elements, so that no per-token dot product is a serial
// chain of additions.
//
// Speed: the head dims of ShiftAddViT (16, 32, 64 with d == dv) are compile-time constants of their
// own instantiations, so every per-token loop is fully unrolled and vectorized; sums (norms, means,
// dot products) are kept in kLanes partial sums added in a fixed order (deterministic, and not a
// serial dependency chain); the codes are packed from vector compares.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"

namespace vitk {
namespace cpu {
namespace {

using shiftadd_detail::Acc;

constexpr int64_t kChunk = 512;
constexpr double kInvPi = 0.318309886183790671537767526745028724;
constexpr int kLanes = 8;

// Element strides of a [B, N, heads, d] tensor.
template <typename T>
struct View4 {
  const T* base;
  int64_t s0, s1, s2, s3;
  explicit View4(const at::Tensor& t)
      : base(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
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

struct Shape {
  int64_t B, N, nh, d, dv, words, chunks;
  int64_t problems() const { return B * nh; }
  int64_t tasks() const { return B * nh * chunks; }
  Range chunk(int64_t c) const { return tile_range(N, kChunk, c); }
};

Shape shape_of(const at::Tensor& q, const at::Tensor& v) {
  const int64_t N = q.size(1), d = q.size(3);
  return Shape{q.size(0), N, q.size(2), d, v.size(3), ceil_div(d, 64), ceil_div(N, kChunk)};
}

// Eight lanes of double: the sums below keep their terms in them (term i in lane i % 8, a short tail
// zero-padded) and add the lanes in order at the end: deterministic, vectorized, and no serial chain.
typedef double D8 __attribute__((vector_size(64)));
typedef float F8 __attribute__((vector_size(32)));

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
template <typename A>
inline D8 load8_tail(const A* p, int64_t n) {
  A t[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return load8(t);
}
inline double lanes_total(D8 v) {
  double s = 0;
  for (int j = 0; j < kLanes; ++j) s += v[j];
  return s;
}

// The sum over i < n of f(x[i]) (or f(x[i], y[i])), f applied lane-wise to D8s, with f(0) == 0.
template <typename A, typename F>
inline double lane_sum(const A* x, int64_t n, F f) {
  D8 acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += f(load8(x + i));
  if (i < n) acc += f(load8_tail(x + i, n - i));
  return lanes_total(acc);
}

template <typename A>
inline A dot(const A* a, const A* b, int64_t n) {
  D8 acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load8(a + i) * load8(b + i);
  if (i < n) acc += load8_tail(a + i, n - i) * load8_tail(b + i, n - i);
  return static_cast<A>(lanes_total(acc));
}

// The sum of a row, in double.
template <typename A>
inline double row_sum(const A* x, int64_t n) {
  return lane_sum(x, n, [](D8 v) { return v; });
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

// The normalized row (x * (1 / norm), the same float operations in every pass, so that a value equal
// to the mean in one pass is equal to it in the next) and whether it holds a NaN (a normalized value
// cannot be infinite: an infinite norm scales every value by 0).
template <typename A>
inline bool normalize(A* x, int64_t n, A norm) {
  const A inv = A(1) / norm;
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
  return nonfinite(x, n);
}

// Bits x > mean packed into words (bits past n stay 0).
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

inline void pack(const float* x, int64_t n, double mean, uint64_t* words) {
  const float m = float_at_or_below(mean);
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
#else
    for (int64_t i = 0; i < end; ++i) bits |= static_cast<uint64_t>(xw[i] > m) << i;
#endif
    words[w] = bits;
  }
}

// dst[0, n) = the sum of the rows of `rows` (row stride ld) whose bit is set in `words`: a product of a
// binary code with a matrix, as additions. With DV > 0 (then n == DV) the sum stays in vector
// registers until it is stored.
template <int DV, typename A>
inline void sum_set_rows(A* dst, const A* rows, int64_t ld, int64_t n, const uint64_t* words, int64_t nwords) {
  if constexpr (DV > 0 && (DV * sizeof(A)) % 64 == 0) {
    typedef A V __attribute__((vector_size(64)));
    constexpr int kW = 64 / sizeof(A), kV = DV / kW;
    V acc[kV] = {};
    for (int64_t w = 0; w < nwords; ++w) {
      uint64_t bits = words[w];
      while (bits) {
        const int64_t i = w * 64 + __builtin_ctzll(bits);
        bits &= bits - 1;
        const A* r = rows + i * ld;
        for (int c = 0; c < kV; ++c) {
          V x;
          std::memcpy(&x, r + c * kW, sizeof(V));
          acc[c] += x;
        }
      }
    }
    std::memcpy(dst, acc, sizeof(acc));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = A(0);
    for (int64_t w = 0; w < nwords; ++w) {
      uint64_t bits = words[w];
      while (bits) {
        const int64_t i = w * 64 + __builtin_ctzll(bits);
        bits &= bits - 1;
        const A* r = rows + i * ld;
        for (int64_t j = 0; j < n; ++j) dst[j] += r[j];
      }
    }
  }
}

// rows[i] += src for every set bit i of `words`: k_b^T v (and q_b^T du) one token at a time.
template <typename A>
inline void scatter_to_set_rows(A* rows, int64_t ld, const A* src, int64_t n, const uint64_t* words, int64_t nwords) {
  for (int64_t w = 0; w < nwords; ++w) {
    uint64_t bits = words[w];
    while (bits) {
      const int64_t i = w * 64 + __builtin_ctzll(bits);
      bits &= bits - 1;
      A* r = rows + i * ld;
      for (int64_t j = 0; j < n; ++j) r[j] += src[j];
    }
  }
}

// Sums the per-chunk partials [problems, chunks, slot] of each problem in chunk order into dst
// [problems, slot], scaled by `mult`.
template <typename A>
void reduce_chunks(const Shape& sh, const std::vector<A>& partial, int64_t slot, A mult, A* dst) {
  at::parallel_for(0, sh.problems(), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      A* out = dst + p * slot;
      const A* first = partial.data() + p * sh.chunks * slot;
      std::copy(first, first + slot, out);
      for (int64_t c = 1; c < sh.chunks; ++c) {
        const A* part = first + c * slot;
        for (int64_t i = 0; i < slot; ++i) out[i] += part[i];
      }
      for (int64_t i = 0; i < slot; ++i) out[i] *= mult;
    }
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

template <typename T, int D, int DV>
void forward_impl(const Shape& sh, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  uint64_t* codes, Acc<T>* norms, Acc<T>* state) {
  using A = Acc<T>;
  const View4<T> Q(q), K(k), V(v);
  const int64_t N = sh.N, d = D ? D : sh.d, dv = DV ? DV : sh.dv, nw = sh.words, P = sh.problems();
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
      const int64_t p = t / sh.chunks, b = p / sh.nh, h = p % sh.nh;
      const Range r = sh.chunk(t % sh.chunks);
      double sq = 0, sk = 0;
      for (int64_t n = r.begin; n < r.end; ++n) {
        Q.load(b, n, h, d, row.data());
        const A nq = norm_of(row.data(), d);
        normalize(row.data(), d, nq);
        sq += row_sum(row.data(), d);
        qnorm[p * N + n] = nq;
        K.load(b, n, h, d, row.data());
        const A nk = norm_of(row.data(), d);
        normalize(row.data(), d, nk);
        sk += row_sum(row.data(), d);
        knorm[p * N + n] = nk;
      }
      sums[2 * t] = sq;
      sums[2 * t + 1] = sk;
    }
  });
  double total_q = 0, total_k = 0;
  for (int64_t t = 0; t < sh.tasks(); ++t) {
    total_q += sums[2 * t];
    total_k += sums[2 * t + 1];
  }
  const double count = static_cast<double>(P) * static_cast<double>(N) * static_cast<double>(d);
  const double mean_q = total_q / count, mean_k = total_k / count;

  // Pass 2: k's codes and the partial states; which problems hold a non-finite k_b^T v.
  const int64_t slot = d * dv;
  std::vector<A> partial(sh.tasks() * slot);
  std::vector<uint8_t> poisoned(sh.tasks(), 0);
  at::parallel_for(0, sh.tasks(), 1, [&](int64_t t0, int64_t t1) {
    [[maybe_unused]] const int64_t d = D ? D : sh.d, dv = DV ? DV : sh.dv;    // constants when D, DV > 0
    std::vector<A> row(d), vrow(dv);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / sh.chunks, b = p / sh.nh, h = p % sh.nh;
      const Range r = sh.chunk(t % sh.chunks);
      A* S = partial.data() + t * slot;
      std::fill(S, S + slot, A(0));
      bool bad = false;
      for (int64_t n = r.begin; n < r.end; ++n) {
        K.load(b, n, h, d, row.data());
        bad |= normalize(row.data(), d, knorm[p * N + n]);
        uint64_t* code = kcodes + (p * N + n) * nw;
        pack(row.data(), d, mean_k, code);
        V.load(b, n, h, dv, vrow.data());
        bad |= nonfinite(vrow.data(), dv);
        scatter_to_set_rows(S, dv, vrow.data(), dv, code, nw);
      }
      poisoned[t] = bad;
    }
  });
  std::vector<A> S(P * slot);
  reduce_chunks(sh, partial, slot, A(1), S.data());
  std::vector<uint8_t> problem_nan(P, 0);
  for (int64_t t = 0; t < sh.tasks(); ++t) problem_nan[t / sh.chunks] |= poisoned[t];
  if (state != nullptr) std::copy(S.begin(), S.end(), state);

  // Pass 3: q's codes and the output rows.
  T* o = out.data_ptr<T>();
  const A inv_pi = static_cast<A>(kInvPi);
  at::parallel_for(0, sh.tasks(), 1, [&](int64_t t0, int64_t t1) {
    [[maybe_unused]] const int64_t d = D ? D : sh.d, dv = DV ? DV : sh.dv;    // constants when D, DV > 0
    std::vector<A> row(d), vrow(dv), acc(dv);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / sh.chunks, b = p / sh.nh, h = p % sh.nh;
      const Range r = sh.chunk(t % sh.chunks);
      const A* Sp = S.data() + p * slot;
      for (int64_t n = r.begin; n < r.end; ++n) {
        Q.load(b, n, h, d, row.data());
        const bool nan = normalize(row.data(), d, qnorm[p * N + n]) || problem_nan[p];
        uint64_t* code = qcodes + (p * N + n) * nw;
        pack(row.data(), d, mean_q, code);
        sum_set_rows<DV>(acc.data(), Sp, dv, dv, code, nw);
        V.load(b, n, h, dv, vrow.data());
        for (int64_t j = 0; j < dv; ++j) acc[j] = A(0.5) * vrow[j] + inv_pi * acc[j];
        const A nu = nan ? std::numeric_limits<A>::quiet_NaN() : norm_of(acc.data(), dv);
        unorm[p * N + n] = nu;
        const A inv = A(1) / nu;
        T* dst = o + ((b * N + n) * sh.nh + h) * dv;
        for (int64_t j = 0; j < dv; ++j) dst[j] = static_cast<T>(acc[j] * inv);
      }
    }
  });
}

template <typename T, int D, int DV>
void backward_impl(const Shape& sh, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const uint64_t* codes, const Acc<T>* norms,
                   const Acc<T>* state, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv_t) {
  using A = Acc<T>;
  const View4<T> Q(q), K(k), V(v), G(grad_out), O(out);
  const int64_t N = sh.N, d = D ? D : sh.d, dv = DV ? DV : sh.dv, nw = sh.words, P = sh.problems(), plane = P * N;
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
  std::vector<A> partial(sh.tasks() * slot);
  at::parallel_for(0, sh.tasks(), 1, [&](int64_t t0, int64_t t1) {
    [[maybe_unused]] const int64_t d = D ? D : sh.d, dv = DV ? DV : sh.dv;    // constants when D, DV > 0
    std::vector<A> g(dv), o(dv), xn(d), grad(d);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / sh.chunks, b = p / sh.nh, h = p % sh.nh;
      const Range r = sh.chunk(t % sh.chunks);
      const A* Stp = St.data() + p * slot;
      A* dS = partial.data() + t * slot;
      std::fill(dS, dS + slot, A(0));
      for (int64_t n = r.begin; n < r.end; ++n) {
        const int64_t row = p * N + n;
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
        scatter_to_set_rows(dS, dv, g.data(), dv, qcodes + row * nw, nw);
      }
    }
  });
  std::vector<A> dS(P * slot);
  reduce_chunks(sh, partial, slot, inv_pi, dS.data());
  const std::vector<A> dSt = transposed(dS.data(), P, d, dv);

  // Pass B: dk and dv += k_b dS.
  at::parallel_for(0, sh.tasks(), 1, [&](int64_t t0, int64_t t1) {
    [[maybe_unused]] const int64_t d = D ? D : sh.d, dv = DV ? DV : sh.dv;    // constants when D, DV > 0
    std::vector<A> vrow(dv), xn(d), grad(d), acc(dv);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / sh.chunks, b = p / sh.nh, h = p % sh.nh;
      const Range r = sh.chunk(t % sh.chunks);
      const A* dSp = dS.data() + p * slot;
      const A* dStp = dSt.data() + p * slot;
      for (int64_t n = r.begin; n < r.end; ++n) {
        const int64_t row = p * N + n;
        V.load(b, n, h, dv, vrow.data());
        rows_times(grad.data(), dStp, d, vrow.data(), dv, A(1));
        K.load(b, n, h, d, xn.data());
        normalize(xn.data(), d, knorm[row]);
        through_norm<T>(xn.data(), grad.data(), d, knorm[row], dkp + ((b * N + n) * sh.nh + h) * d);
        sum_set_rows<DV>(acc.data(), dSp, dv, dv, kcodes + row * nw, nw);
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
