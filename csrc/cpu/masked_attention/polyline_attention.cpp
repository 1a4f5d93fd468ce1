// CPU kernels of PPMA's polyline-path masked attention ("whole" attention; RMT's Manhattan
// self-attention is the case of a per-head constant decay): forward and backward on the attention
// core, with the mask computed inside the online softmax from O(N) prefix sums.
//
// Mask. Per (image, head), with row prefix sums A[i][j] = sum_{c<=j} log_alpha[i][c] and column
// prefix sums C[i][j] = sum_{r<=i} log_beta[r][j], query (i1, j1) and key (i2, j2) get
//   logM = sgn(j1-j2) (A[i1][j1] - A[i1][j2]) + sgn(i1-i2) (C[i1][j2] - C[i2][j2])
// (along the query's row, then along the key's column). Tokens are row-major, so the keys of one
// image row are a contiguous run; over such a run the first term is a row of the W x W table
// R_{i1}[j1][.] and the second a run of D_{i1}[i2*W + .], which depends on the query's image row
// only. The modifier builds D for the keys of the current tile once per query image row and R once
// per query (both from double prefix sums, see vitk/decay_mask.h), then adds D + R to the tile row in
// whole vectors, R's values for the lanes of a vector coming from a register permute or two masked
// loads (runs start mid-vector; adding them run by run stalls on store forwarding): O(W) and O(tile)
// side data per call, nothing N x N.
//
// Symmetric form. logM^T is the same mask on the transposed image with the roles of the decays
// swapped (the path goes down the query's column, then along the key's row): on tokens taken in
// column-major order, with log_beta^T as the row decay and log_alpha^T as the column decay, logM^T
// is exactly the formula above. So pass 1 is pass 0 run on a transposed token order; one modifier
// serves both, and its decay gradients are mapped back by strides.
//
// Work. A problem is one (image, head, pass) of N = H*W queries and keys, cut into query chunks,
// one task each; a thread packs a problem once for its consecutive chunks and prefetches the next
// (image, head)'s rows while it computes. Backward: one task per (image, head) doing both passes
// when there are enough of them; otherwise (few long problems) two sweeps, key chunks accumulating
// dk, dv and the decay gradients, then query chunks accumulating dq, with the passes' contributions
// kept apart in fp32 until they are summed. Decay gradients are accumulated per task in double and,
// in the two-sweep schedule, summed over a problem's key chunks (at most kDecayChunks, so the
// partials stay O(N)) in chunk order: deterministic and independent of the thread count.
#include "vitk/masked_attention.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vitk/attention_driver.h"
#include "vitk/checks.h"
#include "vitk/decay_mask.h"
#include "vitk/tiling.h"
#include "vitk/registration.h"

namespace vitk {
namespace cpu {
namespace {

using attn::Buffer;
using attn::pad_lanes;

constexpr int64_t kQueryChunk = 256;
constexpr int64_t kTwoPassMinLen = 512;
constexpr int64_t kTwoPassMaxProblems = 16;
constexpr int64_t kDecayChunks = 8;

// ------------------------------------------------------------------------------ geometry

struct Geom : ImageDims {
  int64_t N = 0, P = 1;
  // Pass p's token t -> image token index i*W + j (pass 0: row-major; pass 1: column-major).
  std::vector<int64_t> order[2];
  int64_t p_cols(int64_t p) const { return p == 0 ? W : H; }  // tokens per row in pass p's geometry
};

Geom make_geom(const at::Tensor& q, const at::Tensor& v, bool symmetric) {
  Geom g;
  static_cast<ImageDims&>(g) = image_dims(q, v);
  g.N = g.H * g.W;
  g.P = symmetric ? 2 : 1;
  g.order[0].resize(g.N);
  for (int64_t t = 0; t < g.N; ++t) g.order[0][t] = t;
  if (symmetric) {
    g.order[1].resize(g.N);
    for (int64_t a = 0; a < g.W; ++a)
      for (int64_t c = 0; c < g.H; ++c) g.order[1][a * g.H + c] = c * g.W + a;
  }
  return g;
}

// Prefix sums of one (image, head) in double: A[i][j] along rows of log_alpha, C[i][j] down columns
// of log_beta, of the finite decays; when there are non-finite ones (special), Ac and Cc are the
// same prefix sums of their codes (see decay::split_nonfinite). Ag, Cg (and Agc, Cgc) are the same
// in the current pass's geometry.
struct Prefixes {
  std::vector<double> A, C, Ag, Cg;
  std::vector<int64_t> Ac, Cc, Agc, Cgc;
  bool special = false;
};

void image_prefix(const Geom& g, const at::Tensor& la, const at::Tensor& lb, int64_t b, int64_t h, Prefixes& pf) {
  const int64_t H = g.H, W = g.W;
  std::vector<double>& A = pf.A;
  std::vector<double>& C = pf.C;
  A.resize(g.N);
  C.resize(g.N);
  const decay::PlaneStrides sa(la), sb(lb);
  for (int64_t i = 0; i < H; ++i) {
    decay::read_line(la, sa.at(b, i, 0, h), sa.s2, W, A.data() + i * W);
    decay::read_line(lb, sb.at(b, i, 0, h), sb.s2, W, C.data() + i * W);
  }
  pf.Ac.resize(g.N);
  pf.Cc.resize(g.N);
  const bool sa_ = decay::split_nonfinite(A.data(), pf.Ac.data(), g.N);
  const bool sb_ = decay::split_nonfinite(C.data(), pf.Cc.data(), g.N);
  pf.special = sa_ || sb_;
  if (pf.special) {
    TORCH_CHECK_VALUE(H + W < (int64_t(1) << decay::kCodeBits), "q: images of H + W >= 2^",
                      decay::kCodeBits, " tokens with non-finite decays are not supported");
    if (!sa_) std::fill(pf.Ac.begin(), pf.Ac.end(), int64_t(0));
    if (!sb_) std::fill(pf.Cc.begin(), pf.Cc.end(), int64_t(0));
  }
  auto rows_then_columns = [&](auto& X, auto& Y) {
    for (int64_t i = 0; i < H; ++i) decay::prefix_sum(X.data() + i * W, W);
    for (int64_t i = 1; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) Y[i * W + j] += Y[(i - 1) * W + j];
  };
  rows_then_columns(A, C);
  if (pf.special) rows_then_columns(pf.Ac, pf.Cc);
}

// The prefix sums in pass p's geometry: pass 0 uses (A, C) as they are; pass 1, on the transposed
// image, uses C^T as its row prefix sums and A^T as its column prefix sums.
template <typename V>
void pass_prefix(const Geom& g, int64_t p, const std::vector<V>& A, const std::vector<V>& C, std::vector<V>& Ag,
                 std::vector<V>& Cg) {
  if (p == 0) {
    Ag = A;
    Cg = C;
  } else {
    Ag.resize(g.N);
    Cg.resize(g.N);
    for (int64_t a = 0; a < g.W; ++a)
      for (int64_t c = 0; c < g.H; ++c) {
        Ag[a * g.H + c] = C[c * g.W + a];
        Cg[a * g.H + c] = A[c * g.W + a];
      }
  }
  // Zero padding past the last row: the modifier reads rows in whole vectors.
  Ag.resize(g.N + attn::kLanes, V(0));
  Cg.resize(g.N + attn::kLanes, V(0));
}

void pass_prefix(const Geom& g, int64_t p, Prefixes& pf) {
  pass_prefix(g, p, pf.A, pf.C, pf.Ag, pf.Cg);
  if (pf.special) pass_prefix(g, p, pf.Ac, pf.Cc, pf.Agc, pf.Cgc);
}

// ------------------------------------------------------------------------------ modifier

// Calls f(i2, j0, x, len) for the runs of keys [k0, k0 + n) that lie in one row of Wg tokens: key row
// i2, columns [j0, j0 + len), tile offset x. One division per call, not one per run.
template <class F>
inline void for_runs(int64_t Wg, int64_t k0, int64_t n, F&& f) {
  int64_t i2 = k0 / Wg, j0 = k0 - i2 * Wg;
  for (int64_t x = 0; x < n; ++i2, j0 = 0) {
    const int64_t len = std::min(Wg - j0, n - x);
    f(i2, j0, x, len);
    x += len;
  }
}

// Scratch of one thread's modifier, sized for the largest key tile and row of the call.
struct ModScratch {
  Buffer dseg, rrow, xrow, yrow, zt;
  std::vector<int32_t> j2;
  std::vector<double> ctmp;
  int64_t guard = 0;
  void size_for(int64_t N, int64_t Wmax) {
    const int64_t tile = pad_lanes(attn::key_tile(N)) + attn::kLanes;
    dseg.grow(tile);
    yrow.grow(tile);
    zt.grow(tile);
    j2.resize(tile);
    // rrow is addressed up to Wg floats before its start by masked loads whose lanes there are
    // all masked off (see PolylineModifier::forward): keep that range inside the buffer.
    guard = pad_lanes(Wmax);
    rrow.grow(guard + pad_lanes(Wmax) + attn::kLanes);
    xrow.grow(pad_lanes(Wmax) + attn::kLanes);
    ctmp.resize(Wmax);
  }
};

// Adds logM (in the pass geometry: Wg tokens per row) to a score tile; the backward accumulates
// dLoss/dA and dLoss/dC into double arrays addressed by (row, column) strides, so that pass 1's
// gradients land transposed in the image-geometry accumulators.
struct PolylineModifier {
  static constexpr bool kNeedsRaw = false;
  int64_t Wg = 1;
  const double* A = nullptr;  // [Hg][Wg] row prefix sums
  const double* C = nullptr;  // [Hg][Wg] column prefix sums
  float* dseg = nullptr;
  float* rrow = nullptr;
  float* xrow = nullptr;
  float* yrow = nullptr;
  float* zt = nullptr;
  int32_t* j2col = nullptr;
  double* ctmp = nullptr;
  const int64_t* Ac = nullptr;  // codes of A and C's non-finite decays; null: all finite
  const int64_t* Cc = nullptr;
  double* dA = nullptr;  // null: no decay gradients
  int64_t dA_r = 0, dA_c = 0;
  double* dC = nullptr;
  int64_t dC_r = 0, dC_c = 0;

  void bind(ModScratch& s, int64_t Wg_, const Prefixes& pf) {
    Wg = Wg_;
    A = pf.Ag.data();
    C = pf.Cg.data();
    Ac = pf.special ? pf.Agc.data() : nullptr;
    Cc = pf.special ? pf.Cgc.data() : nullptr;
    dseg = s.dseg.data();
    rrow = s.rrow.data() + s.guard;
    xrow = s.xrow.data();
    yrow = s.yrow.data();
    zt = s.zt.data();
    j2col = s.j2.data();
    ctmp = s.ctmp.data();
  }

  // dseg[k - k0] = sgn(ig - i2) (C[ig][j2] - C[i2][j2]) for keys k = (i2, j2) in [k0, k0 + n).
  void fill_dseg(int64_t ig, int64_t k0, int64_t n) const {
    const double* Ci = C + ig * Wg;
    for_runs(Wg, k0, n, [&](int64_t i2, int64_t j0, int64_t x0, int64_t len) {
      float* d = dseg + x0;
      const double* c1 = Ci + j0;
      const double* c2 = C + i2 * Wg + j0;
      if (i2 < ig) {
        for (int64_t x = 0; x < len; ++x) d[x] = static_cast<float>(c1[x] - c2[x]);
      } else if (i2 > ig) {
        for (int64_t x = 0; x < len; ++x) d[x] = static_cast<float>(c2[x] - c1[x]);
      } else {
        std::fill(d, d + len, 0.f);
      }
    });
  }

  // rrow[j2] = sgn(j1 - j2) (A[ig][j1] - A[ig][j2]). A is zero-padded past its last row, so whole
  // vectors may read past the row's end (those lanes are never used).
  void fill_rrow(int64_t ig, int64_t j1) const {
    const double* a = A + ig * Wg;
#ifdef __AVX512F__
    const __m512d a1 = _mm512_set1_pd(a[j1]);
    for (int64_t x = 0; x < Wg; x += 8) {
      const int64_t t = j1 - x;  // lanes after the query's column take A[j2] - A[j1]
      const __mmask8 after = t < 0 ? 0xFF : (t >= 7 ? 0 : static_cast<__mmask8>(0xFFu << (t + 1)));
      __m512d d = _mm512_sub_pd(a1, _mm512_loadu_pd(a + x));
      d = _mm512_mask_sub_pd(d, after, _mm512_setzero_pd(), d);
      _mm256_storeu_ps(rrow + x, _mm512_cvtpd_ps(d));
    }
#else
    const double a1 = a[j1];
    for (int64_t j = 0; j < j1; ++j) rrow[j] = static_cast<float>(a1 - a[j]);
    rrow[j1] = 0.f;
    for (int64_t j = j1 + 1; j < Wg; ++j) rrow[j] = static_cast<float>(a[j] - a1);
#endif
  }

  // j2col[x] = column of key k0 + x, for every lane of the tile's whole vectors.
  void fill_j2(int64_t k0, int64_t n) const {
    int32_t j = static_cast<int32_t>(k0 % Wg);
    const int32_t w = static_cast<int32_t>(Wg);
    for (int64_t x = 0, e = pad_lanes(n); x < e; ++x) {
      j2col[x] = j;
      if (++j == w) j = 0;
    }
  }

  // Per query: row += D + R[column of the key]. With AVX-512 each 16-lane vector of the row is read
  // and written once (runs of W keys start mid-vector, and overlapping masked read-modify-writes
  // of one row would stall on store forwarding): R's values for the vector's lanes come from a
  // permute of one register (W <= 16) or two masked loads, the lanes before and after a row break.
  void forward(int64_t q0, int64_t m, int64_t k0, int64_t n, float* s, int64_t lds) const {
#ifdef __AVX512F__
    const bool narrow = Wg <= attn::kLanes;
    if (narrow) fill_j2(k0, n);
    const int64_t jx0 = k0 % Wg;
#endif
    for (int64_t i = 0; i < m;) {
      const int64_t ig = (q0 + i) / Wg, iend = std::min(m, (ig + 1) * Wg - q0);
      fill_dseg(ig, k0, n);
      for (; i < iend; ++i) {
        fill_rrow(ig, q0 + i - ig * Wg);
        float* row = s + i * lds;
#ifdef __AVX512F__
        using namespace attn::simd;
        if (narrow) {
          const __m512 r = _mm512_maskz_loadu_ps(tail_mask(Wg), rrow);
          for (int64_t x = 0; x < n; x += attn::kLanes) {
            const __m512i idx = _mm512_loadu_si512(j2col + x);
            const vf b = add(load(dseg + x), _mm512_permutexvar_ps(idx, r));
            store(row + x, add(load(row + x), b));
          }
        } else {
          int64_t jx = jx0;
          for (int64_t x = 0; x < n; x += attn::kLanes) {
            const __mmask16 first = tail_mask(Wg - jx);  // lanes before the next row break
            vf r = _mm512_maskz_loadu_ps(first, rrow + jx);
            r = _mm512_mask_loadu_ps(r, static_cast<__mmask16>(~first), rrow + jx - Wg);
            store(row + x, add(load(row + x), add(load(dseg + x), r)));
            jx += attn::kLanes;
            if (jx >= Wg) jx -= Wg;
          }
        }
#else
        for_runs(Wg, k0, n, [&](int64_t, int64_t j0, int64_t x, int64_t len) {
          decay::add2_run(row + x, dseg + x, rrow + j0, len);
        });
#endif
        if (Ac != nullptr) add_special(ig, q0 + i - ig * Wg, k0, n, row);
      }
    }
  }

  // row += the IEEE sum of the non-finite decays on each key's path (when there are any).
  void add_special(int64_t ig, int64_t j1, int64_t k0, int64_t n, float* row) const {
    const int64_t* ar = Ac + ig * Wg;
    const int64_t* cr = Cc + ig * Wg;
    for_runs(Wg, k0, n, [&](int64_t i2, int64_t j0, int64_t x0, int64_t len) {
      const int64_t* c2 = Cc + i2 * Wg;
      for (int64_t x = 0; x < len; ++x) {
        const int64_t j2 = j0 + x;
        row[x0 + x] += decay::path_special(std::abs(ar[j1] - ar[j2]) + std::abs(cr[j2] - c2[j2]));
      }
    });
  }

  // With Y[k] = sum of dS over the queries of image row ig and X[j2] = sum of one query's dS over the
  // key rows, dA and dC take O(W) and O(tile) updates per query and per row instead of one per logit.
  void backward(int64_t q0, int64_t m, int64_t k0, int64_t n, const float*, float* ds, int64_t lds,
                bool params) const {
    if (!params || dA == nullptr) return;
#ifdef __AVX512F__
    fill_j2(k0, n);
#endif
    for (int64_t i = 0; i < m;) {
      const int64_t ig = (q0 + i) / Wg, iend = std::min(m, (ig + 1) * Wg - q0);
      std::fill(yrow, yrow + pad_lanes(n), 0.f);
#ifdef __AVX512F__
      // e = sgn(j1 - j2) dS per lane: dA[ig][j1] += sum e now, dA[ig][j2] -= e summed over the row's
      // queries (in zt, folded onto the columns once per row). Whole vectors, each read once.
      std::fill(zt, zt + pad_lanes(n), 0.f);
      double* dAr = dA + ig * dA_r;
      for (; i < iend; ++i) {
        const int64_t j1 = q0 + i - ig * Wg;
        dAr[j1 * dA_c] += static_cast<double>(
            decay::signed_row_sums(ds + i * lds, j2col, static_cast<int32_t>(j1), n, yrow, zt));
      }
      for (int64_t x = 0; x < n; ++x) dAr[j2col[x] * dA_c] -= zt[x];
#else
      for (; i < iend; ++i) {
        const int64_t j1 = q0 + i - ig * Wg;
        const float* d = ds + i * lds;
        attn::simd::add_padded(yrow, d, n);
        std::fill(xrow, xrow + Wg, 0.f);
        for_runs(Wg, k0, n,
                 [&](int64_t, int64_t j0, int64_t x, int64_t len) { decay::add_run(xrow + j0, d + x, len); });
        // d logit / dA[ig][j1] = sgn(j1 - j2), d logit / dA[ig][j2] = -sgn(j1 - j2).
        double* dAr = dA + ig * dA_r;
        double tot = 0.0;
        for (int64_t j = 0; j < j1; ++j) {
          tot += xrow[j];
          dAr[j * dA_c] -= xrow[j];
        }
        for (int64_t j = j1 + 1; j < Wg; ++j) {
          tot -= xrow[j];
          dAr[j * dA_c] += xrow[j];
        }
        dAr[j1 * dA_c] += tot;
      }
#endif
      // d logit / dC[ig][j2] = sgn(ig - i2), d logit / dC[i2][j2] = -sgn(ig - i2).
      std::fill(ctmp, ctmp + Wg, 0.0);
      for_runs(Wg, k0, n, [&](int64_t i2, int64_t j0, int64_t x0, int64_t len) {
        if (i2 == ig) return;
        const double sg = i2 < ig ? 1.0 : -1.0;
        const float* y = yrow + x0;
        double* dCr = dC + i2 * dC_r + j0 * dC_c;
        for (int64_t x = 0; x < len; ++x) {
          const double v = sg * y[x];
          ctmp[j0 + x] += v;
          dCr[x * dC_c] -= v;
        }
      });
      double* dCi = dC + ig * dC_r;
      for (int64_t j = 0; j < Wg; ++j) dCi[j * dC_c] += ctmp[j];
    }
  }

  // Where pass p's dA / dC go in the image-geometry accumulators (dAimg, dCimg of W columns):
  // pass 1's row prefix sums are C^T and its column prefix sums A^T.
  void grads_to(int64_t p, int64_t W, double* dAimg, double* dCimg) {
    if (p == 0) {
      dA = dAimg;
      dA_r = W;
      dA_c = 1;
      dC = dCimg;
      dC_r = W;
      dC_c = 1;
    } else {
      dA = dCimg;
      dA_r = 1;
      dA_c = W;
      dC = dAimg;
      dC_r = 1;
      dC_c = W;
    }
  }
};

// Pass 1's mask over image-order tokens, for the fused symmetric kernels: the path goes down the
// query's column to the key's row, then along that row,
//   logM^T[(i1, j1), (i2, j2)] = sgn(i1-i2) (C[i1][j1] - C[i2][j1]) + sgn(j1-j2) (A[i2][j1] - A[i2][j2])
// (pass 0's formula on the transposed image, written back in image coordinates). Over the keys the
// second term G[k] depends on the query's column only and the first is one value F[i2] per key row,
// so the queries of a block are visited column by column: G is built once per column (O(tile)), F
// once per query (O(H)), and each score vector is read and written once, F's values for its lanes
// coming from a register permute (H <= 16) or a gather. One key tile holds every key (k0 = 0, n = N).
struct ColumnScratch {
  Buffer g, f, yt, ypt;
  std::vector<int32_t> i2col, j2col;
  void size_for(int64_t H, int64_t W) {
    const int64_t N = H * W, np = pad_lanes(N);
    float* gp = g.grow(np);
    std::fill(gp + N, gp + np, 0.f);
    f.grow(pad_lanes(H) + attn::kLanes);
    yt.grow(np);
    ypt.grow(np);
    // Padding lanes name the last key: a valid row for the permute / gather, and their scores are
    // ignored (forward) or exact zeros (backward).
    i2col.resize(np);
    j2col.resize(np);
    for (int64_t x = 0; x < np; ++x) {
      const int64_t t = std::min(x, N - 1);
      i2col[x] = static_cast<int32_t>(t / W);
      j2col[x] = static_cast<int32_t>(t % W);
    }
  }
};

struct ColumnPathMask {
  int64_t H = 1, W = 1, N = 1;
  const double* A = nullptr;  // [H][W] image row prefix sums
  const double* C = nullptr;  // [H][W] image column prefix sums
  float* g = nullptr;
  float* f = nullptr;
  float* yt = nullptr;   // backward: dS summed over the column's queries
  float* ypt = nullptr;  // backward: sgn(i1 - i2) dS summed over the column's queries
  const int32_t* i2col = nullptr;
  const int64_t* Ac = nullptr;  // codes of A and C's non-finite decays; null: all finite
  const int64_t* Cc = nullptr;
  double* dA = nullptr;  // [H][W] image geometry; null: no decay gradients
  double* dC = nullptr;

  void bind(ColumnScratch& s, int64_t H_, int64_t W_, const Prefixes& pf) {
    H = H_;
    W = W_;
    N = H_ * W_;
    A = pf.A.data();
    C = pf.C.data();
    Ac = pf.special ? pf.Ac.data() : nullptr;
    Cc = pf.special ? pf.Cc.data() : nullptr;
    g = s.g.data();
    f = s.f.data();
    yt = s.yt.data();
    ypt = s.ypt.data();
    i2col = s.i2col.data();
  }

  // First row of the block [q0, q0 + m) whose query lies in image column j1 (the next are W apart).
  int64_t first_row(int64_t q0, int64_t j1) const { return ((j1 - q0 % W) % W + W) % W; }

  // g[(i2, j2)] = sgn(j1 - j2) (A[i2][j1] - A[i2][j2]).
  void fill_g(int64_t j1) const {
    for (int64_t i2 = 0; i2 < H; ++i2) {
      const double* a = A + i2 * W;
      float* gr = g + i2 * W;
      const double a1 = a[j1];
      for (int64_t j = 0; j < j1; ++j) gr[j] = static_cast<float>(a1 - a[j]);
      gr[j1] = 0.f;
      for (int64_t j = j1 + 1; j < W; ++j) gr[j] = static_cast<float>(a[j] - a1);
    }
  }

  // f[i2] = sgn(i1 - i2) (C[i1][j1] - C[i2][j1]).
  void fill_f(int64_t i1, int64_t j1) const {
    const double c1 = C[i1 * W + j1];
    for (int64_t i2 = 0; i2 < H; ++i2) {
      const double c2 = C[i2 * W + j1];
      f[i2] = i2 < i1 ? static_cast<float>(c1 - c2) : (i2 > i1 ? static_cast<float>(c2 - c1) : 0.f);
    }
  }

  void forward(int64_t q0, int64_t m, float* s, int64_t lds) const {
    for (int64_t j1 = 0; j1 < W; ++j1) {
      int64_t i = first_row(q0, j1);
      if (i >= m) continue;
      fill_g(j1);
      for (; i < m; i += W) {
        fill_f((q0 + i) / W, j1);
        float* row = s + i * lds;
#ifdef __AVX512F__
        using namespace attn::simd;
        if (H <= attn::kLanes) {
          const __m512 fr = _mm512_maskz_loadu_ps(tail_mask(H), f);
          for (int64_t x = 0; x < N; x += attn::kLanes) {
            const __m512i idx = _mm512_loadu_si512(i2col + x);
            store(row + x, add(load(row + x), add(load(g + x), _mm512_permutexvar_ps(idx, fr))));
          }
        } else {
          for (int64_t x = 0; x < N; x += attn::kLanes) {
            const __m512i idx = _mm512_loadu_si512(i2col + x);
            store(row + x, add(load(row + x), add(load(g + x), _mm512_i32gather_ps(idx, f, 4))));
          }
        }
#else
        for (int64_t x = 0; x < N; ++x) row[x] += g[x] + f[i2col[x]];
#endif
        if (Ac != nullptr) add_special((q0 + i) / W, j1, row);
      }
    }
  }

  // row += the IEEE sum of the non-finite decays on each key's path (when there are any).
  void add_special(int64_t i1, int64_t j1, float* row) const {
    for (int64_t i2 = 0, x = 0; i2 < H; ++i2) {
      const int64_t* ar = Ac + i2 * W;
      const int64_t cpath = std::abs(Cc[i1 * W + j1] - Cc[i2 * W + j1]);
      for (int64_t j2 = 0; j2 < W; ++j2, ++x) row[x] += decay::path_special(cpath + std::abs(ar[j1] - ar[j2]));
    }
  }

  // Decay gradients of the block's dS (dLogits = dRaw: the mask is additive). Per column j1,
  // Y = sum of dS and Y' = sum of sgn(i1 - i2) dS over its queries, folded onto dA and dC once per
  // column; dC[i1][j1] takes each query's own sum of sgn(i1 - i2) dS.
  void backward(int64_t q0, int64_t m, const float* ds, int64_t lds) const {
    if (dA == nullptr) return;
    const int64_t np = pad_lanes(N);
    for (int64_t j1 = 0; j1 < W; ++j1) {
      int64_t i = first_row(q0, j1);
      if (i >= m) continue;
      std::fill(yt, yt + np, 0.f);
      std::fill(ypt, ypt + np, 0.f);
      for (; i < m; i += W) {
        const int64_t i1 = (q0 + i) / W;
        dC[i1 * W + j1] += static_cast<double>(
            decay::signed_row_sums(ds + i * lds, i2col, static_cast<int32_t>(i1), N, yt, ypt));
      }
      // d logit / dA[i2][j1] = sgn(j1 - j2), d logit / dA[i2][j2] = -sgn(j1 - j2),
      // d logit / dC[i2][j1] = -sgn(i1 - i2).
      for (int64_t i2 = 0; i2 < H; ++i2) {
        const float* y = yt + i2 * W;
        const float* yp = ypt + i2 * W;
        double* dAr = dA + i2 * W;
        double tot = 0.0, cs = 0.0;
        for (int64_t j = 0; j < W; ++j) {
          cs += yp[j];
          if (j < j1) {
            tot += y[j];
            dAr[j] -= y[j];
          } else if (j > j1) {
            tot -= y[j];
            dAr[j] += y[j];
          }
        }
        dAr[j1] += tot;
        dC[i2 * W + j1] -= cs;
      }
    }
  }
};

// dlog_alpha and dlog_beta of one (image, head) from the image-geometry prefix-sum gradients.
void write_decay_grads(const Geom& g, int64_t b, int64_t h, const double* dA, const double* dC, at::Tensor& dla,
                       at::Tensor& dlb, std::vector<double>& tmp) {
  const int64_t H = g.H, W = g.W;
  const decay::PlaneStrides sa(dla), sb(dlb);
  tmp.resize(2 * std::max(H, W));
  double* line = tmp.data();
  double* out = tmp.data() + std::max(H, W);
  for (int64_t i = 0; i < H; ++i) {
    decay::reverse_prefix(dA + i * W, W, out);
    decay::write_line(dla, sa.at(b, i, 0, h), sa.s2, W, out);
  }
  for (int64_t j = 0; j < W; ++j) {
    for (int64_t i = 0; i < H; ++i) line[i] = dC[i * W + j];
    decay::reverse_prefix(line, H, out);
    decay::write_line(dlb, sb.at(b, 0, j, h), sb.s1, H, out);
  }
}

// ------------------------------------------------------------------------------ tasks

// Queues every token row of (b, h) in `ins` (widths in elements) and in the contiguous outputs
// `outs`: a thread about to start a new (image, head) finds its rows in cache instead of waiting
// on each strided gather.
template <typename T, size_t NI, size_t NO>
void queue_problem(attn::PrefetchQueue& pq, const Geom& g, int64_t b, int64_t h, const TokenView<T>* const (&ins)[NI],
                   const int64_t (&inw)[NI], T* const (&outs)[NO], const int64_t (&outw)[NO]) {
  for (int64_t t = 0; t < g.N; ++t) {
    const int64_t y = t / g.W, x = t % g.W;
    for (size_t i = 0; i < NI; ++i) {
      ins[i]->queue(pq, ins[i]->row(b, y, x, h), inw[i]);
    }
    const int64_t row = (b * g.N + t) * g.nh + h;
    for (size_t o = 0; o < NO; ++o) pq.add(outs[o] + row * outw[o], outw[o] * static_cast<int64_t>(sizeof(T)));
  }
}

inline int64_t key_tiles(int64_t N) { return ceil_div(N, attn::key_tile(N)); }

// ------------------------------------------------------------------------------ symmetric, one key tile

// When every key fits the core's single key tile (N <= attn::kSingleKeyTile), the two passes of the
// symmetric form share everything but their masks: one task per (image, head) packs q, k, v once in
// image order, computes S = (scale q) k^T once per query block, and derives both passes' logits from
// it (S + logM with PolylineModifier, S + logM^T with ColumnPathMask). Each softmax is exact over
// its one tile, as in the core. Forward: 3 products instead of 4; backward: 5 instead of 10, since
// dP = (dO/2) V^T is the same for both passes and dV, dK, dQ are linear in the passes' P and dS.
struct SymState : Prefixes {
  Buffer q, k, kt, vt, v, dout, o0, o1, lse0, lse1, drow0, drow1, s, s1, ps, dp, dq, dk, dv;
  ModScratch ms;
  ColumnScratch cs;
  std::vector<double> dA, dC, tmp;
};

inline bool fused_symmetric(const Geom& g) { return g.P == 2 && g.N <= attn::kSingleKeyTile; }

// Both masks of one (image, head), bound to the thread's scratch: pass 0's in image geometry, pass
// 1's from the same (unpadded) prefix sums.
void bind_masks(SymState& st, const Geom& g, PolylineModifier& m0, ColumnPathMask& m1) {
  pass_prefix(g, 0, st);
  st.ms.size_for(g.N, std::max(g.H, g.W));
  st.cs.size_for(g.H, g.W);
  m0.bind(st.ms, g.W, st);
  m1.bind(st.cs, g.H, g.W, st);
}

// The start of a symmetric task (image b, head h): the next problem's rows queued, spread over this
// problem's N query rows, its prefix sums, and both passes' masks bound to them.
template <typename T, size_t NI, size_t NO>
void start_sym_task(SymState& st, attn::PrefetchQueue& pq, const Geom& g, const at::Tensor& la, const at::Tensor& lb,
                    const attn::Task& t, const attn::Task* next, const TokenView<T>* const (&ins)[NI],
                    const int64_t (&inw)[NI], T* const (&outs)[NO], const int64_t (&outw)[NO], PolylineModifier& m0,
                    ColumnPathMask& m1) {
  if (next != nullptr) queue_problem(pq, g, next->p, next->h, ins, inw, outs, outw);
  pq.plan(g.N);
  image_prefix(g, la, lb, t.p, t.h, st);
  bind_masks(st, g, m0, m1);
}

template <typename T>
void polyline_sym_fwd(const Geom& g, const TokenView<T>& qv, const TokenView<T>& kv, const TokenView<T>& vv,
                      const at::Tensor& la, const at::Tensor& lb, float scale, at::Tensor& out, at::Tensor& lse,
                      at::Tensor& parts) {
  const int64_t N = g.N, dqk = g.dqk, dv = g.dv, nh = g.nh, W = g.W;
  const int64_t ldq = dqk, ldkt = pad_lanes(N), ldv = pad_lanes(dv), lds = pad_lanes(N);
  const int64_t bm_max = attn::query_block(N);
  const int64_t rows_all = g.B * N * nh;
  // An empty parts: no gradient wanted, only out is stored.
  T* p0 = parts.numel() > 0 ? parts.data_ptr<T>() : nullptr;
  T* p1 = p0 != nullptr ? p0 + rows_all * dv : nullptr;
  T* op = out.data_ptr<T>();
  float* l0 = lse.data_ptr<float>();
  float* l1 = l0 + rows_all;
  std::vector<attn::Task> tasks;
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t h = 0; h < nh; ++h) tasks.push_back(attn::Task{b, h, 0, N});
  const TokenView<T>* const ins[3] = {&qv, &kv, &vv};
  const int64_t inw[3] = {dqk, dqk, dv};
  T* const outs[3] = {p0, p1, op};
  const int64_t outw[3] = {dv, dv, dv};
  attn::run_tasks(static_cast<int64_t>(tasks.size()), 1, [] { return SymState(); },
                  [&](SymState& st, attn::PrefetchQueue& pq, int64_t ti, int64_t ni) {
    const attn::Task& t = tasks[ti];
    PolylineModifier m0;
    ColumnPathMask m1;
    start_sym_task(st, pq, g, la, lb, t, ni >= 0 ? &tasks[ni] : nullptr, ins, inw, outs, outw, m0, m1);
    auto rows = [&](const TokenView<T>& tv) {
      return [&](int64_t i) -> const T* { return tv.row(t.p, i / W, i % W, t.h); };
    };
    float* q = st.q.grow(N * ldq);
    float* kt = st.kt.zeros(dqk * ldkt);
    float* v = st.v.zeros(N * ldv);
    attn::pack_rows<T>(N, dqk, qv.s[4], rows(qv), scale, q, ldq);
    attn::pack_cols<T>(N, dqk, kv.s[4], rows(kv), kt, ldkt);
    attn::pack_rows<T>(N, dv, vv.s[4], rows(vv), 1.f, v, ldv);
    float* s = st.s.grow(bm_max * lds);
    float* s1 = st.s1.grow(bm_max * lds);
    float* o0 = st.o0.grow(bm_max * ldv);
    float* o1 = st.o1.grow(bm_max * ldv);
    float* sum0 = st.lse0.grow(bm_max);
    float* sum1 = st.lse1.grow(bm_max);
    float* max0 = st.drow0.grow(bm_max);
    float* max1 = st.drow1.grow(bm_max);
    for (int64_t q0 = 0; q0 < N; q0 += bm_max) {
      const int64_t bm = std::min(bm_max, N - q0);
      attn::gemm<false, false>(bm, lds, dqk, q + q0 * ldq, ldq, kt, ldkt, s, lds);
      std::copy(s, s + bm * lds, s1);
      m0.forward(q0, bm, 0, N, s, lds);
      m1.forward(q0, bm, s1, lds);
      for (int64_t i = 0; i < bm; ++i) {
        pq.step();
        float* r0 = s + i * lds;
        float* r1 = s1 + i * lds;
        max0[i] = attn::simd::row_max(r0, N);
        max1[i] = attn::simd::row_max(r1, N);
        // A row of -inf logits keeps exp(-inf) = 0 instead of exp(nan), as in the core.
        sum0[i] = attn::simd::row_exp_sum(r0, N, max0[i] == attn::kNegInf ? 0.f : max0[i]);
        sum1[i] = attn::simd::row_exp_sum(r1, N, max1[i] == attn::kNegInf ? 0.f : max1[i]);
      }
      attn::gemm<false, false>(bm, ldv, N, s, lds, v, ldv, o0, ldv);
      attn::gemm<false, false>(bm, ldv, N, s1, lds, v, ldv, o1, ldv);
      for (int64_t i = 0; i < bm; ++i) {
        const int64_t row = (t.p * N + q0 + i) * nh + t.h;
        // A sum that is NaN or 0 makes a NaN row, as in the core (attention_forward).
        const float inv0 = sum0[i] > 0.f ? 1.f / sum0[i] : attn::kNaN;
        const float inv1 = sum1[i] > 0.f ? 1.f / sum1[i] : attn::kNaN;
        // Each half normalized in place first, so out is the same average of the same two rounded
        // rows whether or not the halves are stored.
        float* a0 = o0 + i * ldv;
        float* a1 = o1 + i * ldv;
        attn::simd::row_scale(a0, dv, inv0);
        attn::simd::row_scale(a1, dv, inv1);
        T* dout = op + row * dv;
        for (int64_t d = 0; d < dv; ++d) dout[d] = static_cast<T>(0.5f * (a0[d] + a1[d]));
        if (p0 != nullptr) {
          T* d0 = p0 + row * dv;
          T* d1 = p1 + row * dv;
          for (int64_t d = 0; d < dv; ++d) {
            d0[d] = static_cast<T>(a0[d]);
            d1[d] = static_cast<T>(a1[d]);
          }
        }
        l0[row] = sum0[i] > 0.f ? max0[i] + std::log(sum0[i]) : attn::kNaN;
        l1[row] = sum1[i] > 0.f ? max1[i] + std::log(sum1[i]) : attn::kNaN;
      }
    }
    pq.drain();
  });
}

// ------------------------------------------------------------------------------ forward

struct FwdState : Prefixes {
  Buffer q, kt, v, o, lse;
  ModScratch ms;
  attn::Scratch ws;
  int64_t b = -1, h = -1, p = -1;
};

template <typename T>
void polyline_fwd_impl(const Geom& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& la, const at::Tensor& lb, float scale, at::Tensor& out, at::Tensor& lse,
                       at::Tensor& parts) {
  const TokenView<T> qv(q), kv(k), vv(v);
  if (fused_symmetric(g)) {
    polyline_sym_fwd<T>(g, qv, kv, vv, la, lb, scale, out, lse, parts);
    return;
  }
  const int64_t N = g.N, dqk = g.dqk, dv = g.dv, nh = g.nh, W = g.W;
  const int64_t ldq = dqk, ldkt = pad_lanes(N), ldv = pad_lanes(dv);
  const int64_t rows_all = g.B * N * nh;
  T* dst0 = g.P == 2 ? parts.data_ptr<T>() : out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  std::vector<attn::Task> tasks;
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t p = 0; p < g.P; ++p) attn::add_chunks(tasks, b, h, N, kQueryChunk, 1, p);

  const TokenView<T>* const ins[3] = {&qv, &kv, &vv};
  const int64_t inw[3] = {dqk, dqk, dv};
  T* const outs[1] = {dst0};
  const int64_t outw[1] = {dv};
  attn::run_tasks(static_cast<int64_t>(tasks.size()), 1, [] { return FwdState(); },
                  [&](FwdState& st, attn::PrefetchQueue& pq, int64_t ti, int64_t ni) {
    const attn::Task& t = tasks[ti];
    const attn::Task* next = ni >= 0 ? &tasks[ni] : nullptr;
    if (next != nullptr && (next->p != t.p || next->h != t.h))
      queue_problem(pq, g, next->p, next->h, ins, inw, outs, outw);
    pq.plan((t.end - t.begin) * key_tiles(N));
    if (t.p != st.b || t.h != st.h) {
      image_prefix(g, la, lb, t.p, t.h, st);
      st.p = -1;
    }
    if (t.p != st.b || t.h != st.h || t.part != st.p) {
      st.b = t.p;
      st.h = t.h;
      st.p = t.part;
      pass_prefix(g, t.part, st);
      const int64_t* ord = g.order[t.part].data();
      auto rows = [&](const TokenView<T>& tv) {
        return [&, ord](int64_t i) -> const T* { return tv.row(t.p, ord[i] / W, ord[i] % W, t.h); };
      };
      attn::pack_rows<T>(N, dqk, qv.s[4], rows(qv), scale, st.q.grow(N * ldq), ldq);
      attn::pack_cols<T>(N, dqk, kv.s[4], rows(kv), st.kt.zeros(dqk * ldkt), ldkt);
      attn::pack_rows<T>(N, dv, vv.s[4], rows(vv), 1.f, st.v.zeros(N * ldv), ldv);
      st.o.grow(N * ldv);
      st.lse.grow(N);
      st.ms.size_for(N, std::max(g.H, g.W));
    }
    attn::FwdProblem pr{.M = N, .N = N, .dqk = dqk, .dv = dv, .q = st.q.data(), .ldq = ldq, .kt = st.kt.data(),
                        .ldkt = ldkt, .v = st.v.data(), .ldv = ldv, .o = st.o.data(), .ldo = ldv,
                        .lse = st.lse.data(), .prefetch = &pq};
    PolylineModifier mod;
    mod.bind(st.ms, g.p_cols(t.part), st);
    attn::attention_forward(pr, mod, st.ws, Range{t.begin, t.end});
    pq.drain();

    const int64_t* ord = g.order[t.part].data();
    T* dst = dst0 + t.part * rows_all * dv;
    float* lsp = lp + t.part * rows_all;
    for (int64_t i = t.begin; i < t.end; ++i) {
      const int64_t row = (t.p * N + ord[i]) * nh + t.h;
      const float* src = st.o.data() + i * ldv;
      T* o = dst + row * dv;
      for (int64_t d = 0; d < dv; ++d) o[d] = static_cast<T>(src[d]);
      lsp[row] = st.lse.data()[i];
    }
  });

  if (g.P == 2) {
    const T* p0 = dst0;
    const T* p1 = dst0 + rows_all * dv;
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows_all * dv, 16384, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e)
        op[e] = static_cast<T>(0.5f * (static_cast<float>(p0[e]) + static_cast<float>(p1[e])));
    });
  }
}

// ------------------------------------------------------------------------------ backward

// One (image, head, pass) problem packed for the backward.
struct BwdState : Prefixes {
  Buffer q, k, kt, vt, dout, o, lse, drow, dq, dk, dv;
  Buffer adq, adk, adv;  // one-pass schedule: image-order accumulators over both passes
  ModScratch ms;
  attn::Scratch ws;
  std::vector<double> dA, dC, tmp;
  int64_t b = -1, h = -1, p = -1;
};

template <typename T>
struct BwdInputs {
  TokenView<T> q, k, v, go, o0, o1;  // o0 / o1: the output the pass's Drow is taken against
  const float* lse;
  int64_t ls[5];
  BwdInputs(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& go_,
            const at::Tensor& o0_, const at::Tensor& o1_, const at::Tensor& lse_)
      : q(q_), k(k_), v(v_), go(go_), o0(o0_), o1(o1_), lse(lse_.data_ptr<float>()) {
    for (int i = 0; i < 5; ++i) ls[i] = lse_.stride(i);
  }
};

template <typename T>
void pack_bwd(BwdState& st, const Geom& g, const BwdInputs<T>& in, const at::Tensor& la, const at::Tensor& lb,
              int64_t b, int64_t h, int64_t p, float scale) {
  if (b != st.b || h != st.h) image_prefix(g, la, lb, b, h, st);
  st.b = b;
  st.h = h;
  st.p = p;
  pass_prefix(g, p, st);
  const int64_t N = g.N, dqk = g.dqk, dv = g.dv, W = g.W;
  const int64_t ldq = pad_lanes(dqk), ldkt = pad_lanes(N), ldv = pad_lanes(dv);
  const int64_t* ord = g.order[p].data();
  auto rows = [&](const TokenView<T>& tv) {
    return [&, ord](int64_t i) -> const T* { return tv.row(b, ord[i] / W, ord[i] % W, h); };
  };
  attn::pack_rows<T>(N, dqk, in.q.s[4], rows(in.q), scale, st.q.zeros(N * ldq), ldq);
  attn::pack_rows<T>(N, dqk, in.k.s[4], rows(in.k), 1.f, st.k.zeros(N * ldq), ldq);
  attn::pack_cols<T>(N, dqk, in.k.s[4], rows(in.k), st.kt.zeros(dqk * ldkt), ldkt);
  attn::pack_cols<T>(N, dv, in.v.s[4], rows(in.v), st.vt.zeros(dv * ldkt), ldkt);
  // The symmetric output is the mean of the passes: each pass sees dO / 2 and its own half.
  const float half = g.P == 2 ? 0.5f : 1.f;
  float* dos = st.dout.zeros(N * ldv);
  attn::pack_rows<T>(N, dv, in.go.s[4], rows(in.go), half, dos, ldv);
  float* os = st.o.zeros(N * ldv);
  const TokenView<T>& ov = p == 0 ? in.o0 : in.o1;
  attn::pack_rows<T>(N, dv, ov.s[4], rows(ov), 1.f, os, ldv);
  float* ls = st.lse.grow(N);
  float* dr = st.drow.grow(N);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t y = ord[i] / W, x = ord[i] % W;
    ls[i] = in.lse[p * in.ls[0] + b * in.ls[1] + y * in.ls[2] + x * in.ls[3] + h * in.ls[4]];
    dr[i] = attn::simd::row_dot(dos + i * ldv, os + i * ldv, dv);
  }
  st.dq.grow(N * ldq);
  st.dk.grow(N * ldq);
  st.dv.grow(N * ldv);
  st.ms.size_for(N, std::max(g.H, g.W));
}

attn::BwdProblem problem_of(const Geom& g, BwdState& st) {
  attn::BwdProblem pr{.M = g.N, .N = g.N, .dqk = g.dqk, .dv = g.dv, .q = st.q.data(), .k = st.k.data(),
                      .ldq = pad_lanes(g.dqk), .kt = st.kt.data(), .vt = st.vt.data(), .ldkt = pad_lanes(g.N),
                      .dout = st.dout.data(), .ldv = pad_lanes(g.dv), .lse = st.lse.data(), .drow = st.drow.data(),
                      .dq = st.dq.data(), .dk = st.dk.data(), .dvv = st.dv.data()};
  return pr;
}

template <typename T>
void store_rows(T* dst, const Geom& g, int64_t b, int64_t h, const int64_t* ord, Range r, const float* src,
                int64_t ld, int64_t d, float mult) {
  for (int64_t i = r.begin; i < r.end; ++i) {
    T* o = dst + ((b * g.N + ord[i]) * g.nh + h) * d;
    attn::store_row(o, src + i * ld, d, mult);
  }
}

// fp32 rows of pass p's accumulator, [P][B*N*nh][d] flat.
void store_acc(float* acc, const Geom& g, int64_t b, int64_t h, int64_t p, Range r, const float* src, int64_t ld,
               int64_t d) {
  const int64_t* ord = g.order[p].data();
  float* base = acc + p * g.B * g.N * g.nh * d;
  for (int64_t i = r.begin; i < r.end; ++i)
    std::copy(src + i * ld, src + i * ld + d, base + ((b * g.N + ord[i]) * g.nh + h) * d);
}

// dS of both passes from their probabilities (in s0, s1) and the shared dP: s0 = P0 (dP - d0),
// s1 = P1 (dP - d1), over whole vectors (padding lanes: P = 0, so exact zeros). With `sum`, s0 takes
// their sum and s1 is left alone (no decay gradients need the passes apart).
inline void sym_ds(float* __restrict s0, float* __restrict s1, const float* __restrict dp, int64_t n, float d0,
                   float d1, bool sum) {
#ifdef __AVX512F__
  using namespace attn::simd;
  const vf v0 = set1(d0), v1 = set1(d1);
  for (int64_t j = 0; j < n; j += attn::kLanes) {
    const vf g = load(dp + j);
    const vf a = mul(load(s0 + j), sub(g, v0));
    const vf b = mul(load(s1 + j), sub(g, v1));
    if (sum) {
      store(s0 + j, add(a, b));
    } else {
      store(s0 + j, a);
      store(s1 + j, b);
    }
  }
#else
  const int64_t np = round_up(n, attn::kLanes);
  for (int64_t j = 0; j < np; ++j) {
    const float a = s0[j] * (dp[j] - d0), b = s1[j] * (dp[j] - d1);
    if (sum) {
      s0[j] = a + b;
    } else {
      s0[j] = a;
      s1[j] = b;
    }
  }
#endif
}

template <typename T>
void polyline_sym_bwd(const Geom& g, const BwdInputs<T>& in, const at::Tensor& la, const at::Tensor& lb,
                      bool want_decay, float scale, T* dqp, T* dkp, T* dvp, at::Tensor& dla, at::Tensor& dlb) {
  const int64_t N = g.N, dqk = g.dqk, dv = g.dv, nh = g.nh, W = g.W;
  const int64_t ldq = pad_lanes(dqk), ldkt = pad_lanes(N), ldv = pad_lanes(dv), lds = pad_lanes(N);
  const int64_t bm_max = attn::query_block(N);
  std::vector<attn::Task> tasks;
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t h = 0; h < nh; ++h) tasks.push_back(attn::Task{b, h, 0, N});
  const TokenView<T>* const ins[6] = {&in.q, &in.k, &in.v, &in.go, &in.o0, &in.o1};
  const int64_t inw[6] = {dqk, dqk, dv, dv, dv, dv};
  T* const outs[3] = {dqp, dkp, dvp};
  const int64_t outw[3] = {dqk, dqk, dv};
  attn::run_tasks(static_cast<int64_t>(tasks.size()), 1, [] { return SymState(); },
                  [&](SymState& st, attn::PrefetchQueue& pq, int64_t ti, int64_t ni) {
    const attn::Task& t = tasks[ti];
    PolylineModifier m0;
    ColumnPathMask m1;
    start_sym_task(st, pq, g, la, lb, t, ni >= 0 ? &tasks[ni] : nullptr, ins, inw, outs, outw, m0, m1);
    if (want_decay) {
      st.dA.assign(N, 0.0);
      st.dC.assign(N, 0.0);
      m0.grads_to(0, W, st.dA.data(), st.dC.data());
      m1.dA = st.dA.data();
      m1.dC = st.dC.data();
    }
    auto rows = [&](const TokenView<T>& tv) {
      return [&](int64_t i) -> const T* { return tv.row(t.p, i / W, i % W, t.h); };
    };
    float* q = st.q.zeros(N * ldq);
    float* k = st.k.zeros(N * ldq);
    float* kt = st.kt.zeros(dqk * ldkt);
    float* vt = st.vt.zeros(dv * ldkt);
    attn::pack_rows<T>(N, dqk, in.q.s[4], rows(in.q), scale, q, ldq);
    attn::pack_rows<T>(N, dqk, in.k.s[4], rows(in.k), 1.f, k, ldq);
    attn::pack_cols<T>(N, dqk, in.k.s[4], rows(in.k), kt, ldkt);
    attn::pack_cols<T>(N, dv, in.v.s[4], rows(in.v), vt, ldkt);
    // The output is the mean of the passes: both see dO / 2.
    float* dos = st.dout.zeros(N * ldv);
    attn::pack_rows<T>(N, dv, in.go.s[4], rows(in.go), 0.5f, dos, ldv);
    float* os0 = st.o0.zeros(N * ldv);
    float* os1 = st.o1.zeros(N * ldv);
    attn::pack_rows<T>(N, dv, in.o0.s[4], rows(in.o0), 1.f, os0, ldv);
    attn::pack_rows<T>(N, dv, in.o1.s[4], rows(in.o1), 1.f, os1, ldv);
    float* ls0 = st.lse0.grow(N);
    float* ls1 = st.lse1.grow(N);
    float* dr0 = st.drow0.grow(N);
    float* dr1 = st.drow1.grow(N);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t off = t.p * in.ls[1] + (i / W) * in.ls[2] + (i % W) * in.ls[3] + t.h * in.ls[4];
      // A row that saw no key has no gradient (P = exp(-inf) = 0), as in the core.
      ls0[i] = in.lse[off] == attn::kNegInf ? attn::kPosInf : in.lse[off];
      ls1[i] = in.lse[off + in.ls[0]] == attn::kNegInf ? attn::kPosInf : in.lse[off + in.ls[0]];
      dr0[i] = attn::simd::row_dot(dos + i * ldv, os0 + i * ldv, dv);
      dr1[i] = attn::simd::row_dot(dos + i * ldv, os1 + i * ldv, dv);
    }
    float* dq = st.dq.zeros(N * ldq);
    float* dk = st.dk.zeros(N * ldq);
    float* dva = st.dv.zeros(N * ldv);
    float* s = st.s.grow(bm_max * lds);
    float* s1 = st.s1.grow(bm_max * lds);
    float* ps = st.ps.grow(bm_max * lds);
    float* dp = st.dp.grow(bm_max * lds);
    for (int64_t q0 = 0; q0 < N; q0 += bm_max) {
      const int64_t bm = std::min(bm_max, N - q0);
      attn::gemm<false, false>(bm, lds, dqk, q + q0 * ldq, ldq, kt, ldkt, s, lds);
      std::copy(s, s + bm * lds, s1);
      m0.forward(q0, bm, 0, N, s, lds);
      m1.forward(q0, bm, s1, lds);
      for (int64_t i = 0; i < bm; ++i) {
        pq.step();
        attn::simd::row_exp(s + i * lds, N, ls0[q0 + i]);
        attn::simd::row_exp(s1 + i * lds, N, ls1[q0 + i]);
        std::copy(s + i * lds, s + (i + 1) * lds, ps + i * lds);
        attn::simd::add_padded(ps + i * lds, s1 + i * lds, N);
      }
      attn::gemm<false, false>(bm, lds, dv, dos + q0 * ldv, ldv, vt, ldkt, dp, lds);
      attn::gemm<true, true>(N, ldv, bm, ps, lds, dos + q0 * ldv, ldv, dva, ldv);
      for (int64_t i = 0; i < bm; ++i)
        sym_ds(s + i * lds, s1 + i * lds, dp + i * lds, N, dr0[q0 + i], dr1[q0 + i], !want_decay);
      if (want_decay) {
        m0.backward(q0, bm, 0, N, nullptr, s, lds, true);
        m1.backward(q0, bm, s1, lds);
        for (int64_t i = 0; i < bm; ++i) attn::simd::add_padded(s + i * lds, s1 + i * lds, N);
      }
      attn::gemm<true, true>(N, ldq, bm, s, lds, q + q0 * ldq, ldq, dk, ldq);
      attn::gemm<true, false>(bm, ldq, N, s, lds, k, ldq, dq + q0 * ldq, ldq);
    }
    pq.drain();
    const int64_t* id = g.order[0].data();
    store_rows(dqp, g, t.p, t.h, id, Range{0, N}, dq, ldq, dqk, scale);
    store_rows(dkp, g, t.p, t.h, id, Range{0, N}, dk, ldq, dqk, 1.f);
    store_rows(dvp, g, t.p, t.h, id, Range{0, N}, dva, ldv, dv, 1.f);
    if (want_decay) write_decay_grads(g, t.p, t.h, st.dA.data(), st.dC.data(), dla, dlb, st.tmp);
  });
}

template <typename T>
void polyline_bwd_impl(const Geom& g, const BwdInputs<T>& in, const at::Tensor& la, const at::Tensor& lb,
                       bool want_decay, float scale, at::Tensor& dq_t, at::Tensor& dk_t, at::Tensor& dv_t,
                       at::Tensor& dla, at::Tensor& dlb) {
  const int64_t N = g.N, dqk = g.dqk, dv = g.dv, nh = g.nh, W = g.W;
  const int64_t ldq = pad_lanes(dqk), ldv = pad_lanes(dv);
  T* dqp = dq_t.data_ptr<T>();
  T* dkp = dk_t.data_ptr<T>();
  T* dvp = dv_t.data_ptr<T>();
  if (fused_symmetric(g)) {
    polyline_sym_bwd<T>(g, in, la, lb, want_decay, scale, dqp, dkp, dvp, dla, dlb);
    return;
  }
  const bool two_pass = N >= kTwoPassMinLen && g.B * nh < kTwoPassMaxProblems;

  if (!two_pass) {
    // One task per (image, head): both passes, dq/dk/dv summed over them in image token order.
    std::vector<attn::Task> tasks;
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t h = 0; h < nh; ++h) tasks.push_back(attn::Task{b, h, 0, N});
    const TokenView<T>* const ins[6] = {&in.q, &in.k, &in.v, &in.go, &in.o0, &in.o1};
    const int64_t inw[6] = {dqk, dqk, dv, dv, dv, g.P == 2 ? dv : 0};
    T* const outs[3] = {dqp, dkp, dvp};
    const int64_t outw[3] = {dqk, dqk, dv};
    attn::run_tasks(static_cast<int64_t>(tasks.size()), 1, [] { return BwdState(); },
                    [&](BwdState& st, attn::PrefetchQueue& pq, int64_t ti, int64_t ni) {
      const attn::Task& t = tasks[ti];
      const attn::Task* next = ni >= 0 ? &tasks[ni] : nullptr;
      if (next != nullptr) queue_problem(pq, g, next->p, next->h, ins, inw, outs, outw);
      pq.plan(g.P * N * key_tiles(N));
      float* adq = st.adq.zeros(N * ldq);
      float* adk = st.adk.zeros(N * ldq);
      float* adv = st.adv.zeros(N * ldv);
      if (want_decay) {
        st.dA.assign(N, 0.0);
        st.dC.assign(N, 0.0);
      }
      for (int64_t p = 0; p < g.P; ++p) {
        pack_bwd(st, g, in, la, lb, t.p, t.h, p, scale);
        attn::BwdProblem pr = problem_of(g, st);
        pr.prefetch = &pq;
        if (p == 0) {
          // Pass 0's token order is the image's: accumulate in place.
          pr.dq = adq;
          pr.dk = adk;
          pr.dvv = adv;
        } else {
          std::fill(st.dq.data(), st.dq.data() + N * ldq, 0.f);
          std::fill(st.dk.data(), st.dk.data() + N * ldq, 0.f);
          std::fill(st.dv.data(), st.dv.data() + N * ldv, 0.f);
        }
        PolylineModifier mod;
        mod.bind(st.ms, g.p_cols(p), st);
        if (want_decay) mod.grads_to(p, W, st.dA.data(), st.dC.data());
        attn::attention_backward(pr, mod, st.ws, Range{0, N}, Range{0, N}, attn::kAll);
        if (p == 1) {
          const int64_t* ord = g.order[1].data();
          for (int64_t i = 0; i < N; ++i) {
            const int64_t im = ord[i];
            attn::simd::add_padded(adq + im * ldq, st.dq.data() + i * ldq, dqk);
            attn::simd::add_padded(adk + im * ldq, st.dk.data() + i * ldq, dqk);
            attn::simd::add_padded(adv + im * ldv, st.dv.data() + i * ldv, dv);
          }
        }
      }
      pq.drain();
      const int64_t* id = g.order[0].data();
      store_rows(dqp, g, t.p, t.h, id, Range{0, N}, adq, ldq, dqk, scale);
      store_rows(dkp, g, t.p, t.h, id, Range{0, N}, adk, ldq, dqk, 1.f);
      store_rows(dvp, g, t.p, t.h, id, Range{0, N}, adv, ldv, dv, 1.f);
      if (want_decay) write_decay_grads(g, t.p, t.h, st.dA.data(), st.dC.data(), dla, dlb, st.tmp);
    });
    return;
  }

  // Two sweeps for few long problems: key chunks (on the core's key-tile grid) -> dk, dv and the
  // decay gradients, one partial per chunk; then query chunks -> dq. Each pass writes its own fp32
  // accumulator, so the passes of one (image, head) never write the same rows. A decay partial is
  // two image planes (2N doubles), so with decay gradients a problem has at most kDecayChunks key
  // chunks, fixed by the shape: memory linear in N, and the same sums for any thread count.
  const int64_t key_chunk = want_decay ? std::max(kQueryChunk, ceil_div(N, kDecayChunks)) : kQueryChunk;
  std::vector<attn::Task> key_tasks, query_tasks;
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t p = 0; p < g.P; ++p) {
        attn::add_chunks(key_tasks, b, h, N, key_chunk, attn::key_tile(N), p);
        attn::add_chunks(query_tasks, b, h, N, kQueryChunk, 1, p);
      }
  const int64_t rows_all = g.B * N * nh;
  std::vector<float> accq(g.P * rows_all * dqk), acck(g.P * rows_all * dqk), accv(g.P * rows_all * dv);
  std::vector<double> partials(want_decay ? key_tasks.size() * 2 * N : 0, 0.0);

  attn::run_tasks(static_cast<int64_t>(key_tasks.size()), 1, [] { return BwdState(); },
                  [&](BwdState& st, attn::PrefetchQueue& pq, int64_t ti, int64_t ni) {
    const attn::Task& t = key_tasks[ti];
    if (t.p != st.b || t.h != st.h || t.part != st.p) pack_bwd(st, g, in, la, lb, t.p, t.h, t.part, scale);
    const Range kr{t.begin, t.end};
    std::fill(st.dk.data() + kr.begin * ldq, st.dk.data() + kr.end * ldq, 0.f);
    std::fill(st.dv.data() + kr.begin * ldv, st.dv.data() + kr.end * ldv, 0.f);
    attn::BwdProblem pr = problem_of(g, st);
    PolylineModifier mod;
    mod.bind(st.ms, g.p_cols(t.part), st);
    if (want_decay) {
      double* part = partials.data() + ti * 2 * N;
      mod.grads_to(t.part, W, part, part + N);
    }
    attn::attention_backward(pr, mod, st.ws, Range{0, N}, kr, attn::kKeyValue | attn::kParams);
    store_acc(acck.data(), g, t.p, t.h, t.part, kr, st.dk.data(), ldq, dqk);
    store_acc(accv.data(), g, t.p, t.h, t.part, kr, st.dv.data(), ldv, dv);
  });
  attn::run_tasks(static_cast<int64_t>(query_tasks.size()), 1, [] { return BwdState(); },
                  [&](BwdState& st, attn::PrefetchQueue& pq, int64_t ti, int64_t ni) {
    const attn::Task& t = query_tasks[ti];
    if (t.p != st.b || t.h != st.h || t.part != st.p) pack_bwd(st, g, in, la, lb, t.p, t.h, t.part, scale);
    const Range qr{t.begin, t.end};
    std::fill(st.dq.data() + qr.begin * ldq, st.dq.data() + qr.end * ldq, 0.f);
    attn::BwdProblem pr = problem_of(g, st);
    PolylineModifier mod;
    mod.bind(st.ms, g.p_cols(t.part), st);
    attn::attention_backward(pr, mod, st.ws, qr, Range{0, N}, attn::kQuery);
    store_acc(accq.data(), g, t.p, t.h, t.part, qr, st.dq.data(), ldq, dqk);
  });

  auto combine = [&](const std::vector<float>& acc, T* dst, int64_t d, float mult) {
    const int64_t n = rows_all * d;
    at::parallel_for(0, n, 16384, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) {
        float s = acc[e];
        if (g.P == 2) s += acc[n + e];
        dst[e] = static_cast<T>(s * mult);
      }
    });
  };
  combine(accq, dqp, dqk, scale);
  combine(acck, dkp, dqk, 1.f);
  combine(accv, dvp, dv, 1.f);

  if (want_decay) {
    // Key tasks are ordered (image, head, pass, chunk): problem bh owns tasks [first[bh], first[bh + 1]).
    const int64_t ntasks = static_cast<int64_t>(key_tasks.size());
    std::vector<int64_t> first(g.B * nh + 1, ntasks);
    for (int64_t i = ntasks - 1; i >= 0; --i) first[key_tasks[i].p * nh + key_tasks[i].h] = i;
    at::parallel_for(0, g.B * nh, 1, [&](int64_t lo, int64_t hi) {
      std::vector<double> dA(N), dC(N), tmp;
      for (int64_t bh = lo; bh < hi; ++bh) {
        std::fill(dA.begin(), dA.end(), 0.0);
        std::fill(dC.begin(), dC.end(), 0.0);
        for (int64_t ti = first[bh]; ti < first[bh + 1]; ++ti) {
          const double* part = partials.data() + ti * 2 * N;
          for (int64_t e = 0; e < N; ++e) {
            dA[e] += part[e];
            dC[e] += part[N + e];
          }
        }
        write_decay_grads(g, bh / nh, bh % nh, dA.data(), dC.data(), dla, dlb, tmp);
      }
    });
  }
}

void check_polyline_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& la,
                         const at::Tensor& lb) {
  check_image_qkv(q, k, v);
  decay::check_decay(la, "log_alpha", q);
  decay::check_decay(lb, "log_beta", q);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> polyline_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                                      const at::Tensor& v, const at::Tensor& log_alpha,
                                                                      const at::Tensor& log_beta, double scale,
                                                                      bool symmetric, bool save_for_backward) {
  check_polyline_args(q, k, v, log_alpha, log_beta);
  const int64_t P = symmetric ? 2 : 1;
  const std::vector<int64_t> oshape = attn::out_shape(q, v);
  at::Tensor out = at::empty(oshape, q.options());
  std::vector<int64_t> lshape{P};
  for (int64_t d = 0; d < 4; ++d) lshape.push_back(q.size(d));
  at::Tensor lse = at::empty(lshape, q.options().dtype(at::kFloat));
  std::vector<int64_t> pshape{2};
  pshape.insert(pshape.end(), oshape.begin(), oshape.end());
  const bool saved = symmetric && save_for_backward;
  const std::vector<int64_t> none{0};
  if (out.numel() == 0) return {out, lse, at::empty(saved ? pshape : none, q.options())};
  const Geom g = make_geom(q, v, symmetric);
  // The multi-tile symmetric path averages the two passes afterwards, so it needs parts anyway.
  const bool stored = saved || (symmetric && !fused_symmetric(g));
  at::Tensor parts = at::empty(stored ? pshape : none, q.options());
  attn::dispatch_float(q, "polyline_attention_fwd", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    polyline_fwd_impl<scalar_t>(g, q, k, v, log_alpha, log_beta, static_cast<float>(scale), out, lse, parts);
  });
  return {out, lse, saved ? parts : at::empty(none, q.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> polyline_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& log_alpha, const at::Tensor& log_beta, const at::Tensor& out, const at::Tensor& parts,
    const at::Tensor& lse, double scale, bool symmetric, bool decay_grad) {
  check_polyline_args(q, k, v, log_alpha, log_beta);
  decay::check_like_out(grad_out, "grad_out", q, v);
  decay::check_like_out(out, "out", q, v);
  if (symmetric) decay::check_like_out(parts, "parts", q, v, 2);
  decay::check_lse(lse, q, symmetric ? 2 : 1);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), q.options());
  at::Tensor dv = at::empty(v.sizes(), q.options());
  at::Tensor dla = decay_grad ? at::empty(log_alpha.sizes(), log_alpha.options()) : at::empty({0}, q.options());
  at::Tensor dlb = decay_grad ? at::empty(log_beta.sizes(), log_beta.options()) : at::empty({0}, q.options());
  if (q.numel() == 0) return {dq, dk, dv, dla, dlb};
  const Geom g = make_geom(q, v, symmetric);
  attn::dispatch_float(q, "polyline_attention_bwd", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const at::Tensor o0 = symmetric ? parts.select(0, 0) : out;
    const at::Tensor o1 = symmetric ? parts.select(0, 1) : out;
    const BwdInputs<scalar_t> in(q, k, v, grad_out, o0, o1, lse);
    polyline_bwd_impl<scalar_t>(g, in, log_alpha, log_beta, decay_grad, static_cast<float>(scale), dq, dk, dv, dla,
                                dlb);
  });
  if (decay_grad) {
    decay::zero_nonfinite_grads(dla, log_alpha);
    decay::zero_nonfinite_grads(dlb, log_beta);
  }
  return {dq, dk, dv, dla, dlb};
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "polyline_attention_fwd", vitk::Backend::kCpu, &vitk::cpu::polyline_attention_fwd);
  VITK_IMPL(m, "polyline_attention_bwd", vitk::Backend::kCpu, &vitk::cpu::polyline_attention_bwd);
}
