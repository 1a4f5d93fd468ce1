// CPU kernels of the codebook family: nearest-code search, code lookup and the lookup's backward.
//
// codebook_argmin is a GEMM whose epilogue, a running argmin, never leaves registers. The codebook
// is packed once per call into fp32 blocks of 16 codes stored [D][16] (one AVX-512 vector per d),
// with the codes' ||e||^2 in a side array and the packed values holding -2e, so the score
// ||e||^2 - 2 z.e of 16 codes against one query row is D fused multiply-adds starting from the
// norms (||z||^2 is the same for every code and is left out). A micro-kernel broadcasts the z
// values of R rows against one block of codes at a time and keeps, per row and lane, the best
// score and the block it came from. Strict < keeps the earlier block on equal scores, the lane
// fold prefers the lower code, and split-K pieces merge in code order, which together is
// torch.argmin's lowest-index rule. Rows are tiled and the codes chunked so a chunk of packed codes
// stays in L2 while every micro-group of a tile scans it. Nothing of size N x K is ever formed:
// memory is the packed codebook plus O(N) per-row results. The reported distance is that of the
// winner evaluated directly in double, ||z - e||^2 (cosine: 2 - 2 cos), not read off the expansion.
//
// Non-finite input never takes part in the ranking, where inf - inf would invent an order: a code
// holding a NaN or an infinity is packed as a zero vector with an infinite norm, so its score is
// +inf and the strict compare never picks it (a row whose every code is such gets code 0), and a
// row of z holding one is given code 0 when it is finished.
//
// Cosine: codes are normalized as F.normalize does, e / max(||e||, 1e-12); a row of z is ranked by
// its direction alone (its length is a positive factor of every cosine), so a row shorter than that
// eps keeps its precision. Both norms are computed after scaling by a power of two when the plain
// sum of squares would overflow or underflow fp32.
//
// exact=true scans data centred on the group's mean code (cosine: the normalized vectors) and keeps
// each row's second-best score too. A rigorous bound on the fp32 scores' rounding error (centring
// included) then says, per row, whether the best code is certainly the nearest under the double
// evaluation; where it is not (a tie, or a near-tie within the bound), the row's codes are scanned
// again and every code within the bound of the best is compared by its double distance.
//
// The micro-kernel is written once in GCC/Clang vector extensions at the target's native width, so
// -march=native and the portable x86-64-v2 build share one source.
#include "vitk/codebook.h"

#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "vitk/checks.h"
#include "vitk/tiling.h"
#include "vitk/registration.h"

namespace vitk {
namespace cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// F.normalize's default eps: x / max(||x||, eps).
constexpr float kNormEps = 1e-12f;
constexpr double kNormEps64 = 1e-12;
// A sum of squares at least this large lost nothing to underflow worth counting: terms below
// FLT_MIN add at most D * 2^-149 to it.
constexpr float kSafeSumSq = 0x1p-100f;

// Cache budgets (bytes). A chunk of packed codes is re-read by every micro-group of rows in a tile,
// so it should stay in L2 next to the tile's packed rows; a micro-group's rows stay in L1.
constexpr int64_t kChunkBytes = 256 * 1024;
constexpr int64_t kTileBytes = 128 * 1024;
constexpr int64_t kMaxTileRows = 512;

// ------------------------------------------------------------------------------ row helpers

template <typename scalar_t, typename out_t>
inline void load_row(const scalar_t* src, int64_t sd, int64_t D, out_t* out) {
  if (sd == 1) {
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<out_t>(static_cast<float>(src[d]));
  } else {
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<out_t>(static_cast<float>(src[d * sd]));
  }
}

inline bool all_finite(const float* x, int64_t D) {
  bool ok = true;
  for (int64_t d = 0; d < D; ++d) ok &= std::isfinite(x[d]);
  return ok;
}

// Reductions over D with 16 independent partial sums: a single running sum would serialize on the
// add latency (about 4 cycles per element), which at D = 256 costs more per row than the row's
// share of the search itself. The lane split is fixed, so results do not depend on the thread count.
constexpr int kSumLanes = 16;

inline float sum_sq(const float* x, int64_t D) {
  float part[kSumLanes] = {};
  int64_t d = 0;
  for (; d + kSumLanes <= D; d += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) part[l] += x[d + l] * x[d + l];
  for (int l = 0; d + l < D; ++l) part[l] += x[d + l] * x[d + l];
  float s = 0.f;
  for (int l = 0; l < kSumLanes; ++l) s += part[l];
  return s;
}

// The power of two (as an exponent) that brings x's largest |component| into [1, 2): scaling by it
// is exact, and the scaled vector's sum of squares can neither overflow nor underflow. 0 for a zero
// or non-finite vector.
inline int unit_exponent(const float* x, int64_t D) {
  float m = 0.f;
  for (int64_t d = 0; d < D; ++d) m = std::max(m, std::fabs(x[d]));
  if (m == 0.f || !std::isfinite(m)) return 0;
  return -std::ilogb(m);
}

// x / ||x||; a zero vector stays zero. For a row of z, which is ranked by its direction alone.
inline void unit_row(float* x, int64_t D) {
  float ss = sum_sq(x, D);
  if (!(ss >= kSafeSumSq && ss <= FLT_MAX)) {
    const int s = unit_exponent(x, D);
    for (int64_t d = 0; d < D; ++d) x[d] = std::ldexp(x[d], s);
    ss = sum_sq(x, D);
  }
  if (ss > 0.f) {
    const float n = std::sqrt(ss);
    for (int64_t d = 0; d < D; ++d) x[d] = x[d] / n;
  }
}

// F.normalize's x / max(||x||, eps) for a finite x. The plain arithmetic when the sum of squares is
// safely inside fp32's range, so that a code and a positive power-of-two multiple of it normalize to
// bit-identical vectors and tie exactly (unit_row does the same for z).
inline void normalize_code(float* x, int64_t D) {
  const float ss = sum_sq(x, D);
  if (ss >= kSafeSumSq && ss <= FLT_MAX) {
    const float denom = std::max(std::sqrt(ss), kNormEps);
    for (int64_t d = 0; d < D; ++d) x[d] = x[d] / denom;
    return;
  }
  const int s = unit_exponent(x, D);
  if (s == 0 && ss == 0.f) return;  // zero: x / eps is x
  for (int64_t d = 0; d < D; ++d) x[d] = std::ldexp(x[d], s);
  const float n = std::sqrt(sum_sq(x, D));
  if (std::ldexp(static_cast<double>(n), -s) >= kNormEps64) {
    for (int64_t d = 0; d < D; ++d) x[d] = x[d] / n;
  } else {
    // Shorter than eps: x / eps, from x itself (scaling back up-scaled values is exact).
    for (int64_t d = 0; d < D; ++d) x[d] = std::ldexp(x[d], -s) / kNormEps;
  }
}

// The double evaluations that define the exact path and every reported distance: sums over d in
// order, with fused multiply-adds (the Triton backend evaluates the same sums the same way).
inline double sq_dist64(const double* x, const double* y, int64_t D) {
  double acc = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double t = x[d] - y[d];
    acc = std::fma(t, t, acc);
  }
  return acc;
}

inline double dot64(const double* x, const double* y, int64_t D) {
  double acc = 0.0;
  for (int64_t d = 0; d < D; ++d) acc = std::fma(x[d], y[d], acc);
  return acc;
}

// What the exact path minimizes: ||z - e||^2, or for cosine -z.e / max(||e||, eps) (the cosine
// times ||z||, which is the same for every code of a row).
inline double rank64(const double* z, const double* e, int64_t D, bool cosine) {
  if (!cosine) return sq_dist64(z, e, D);
  return -dot64(z, e, D) / std::max(std::sqrt(dot64(e, e, D)), kNormEps64);
}

// The reported distance: ||z - e||^2, or 2 - 2 cos with both vectors normalized as F.normalize does
// (clamped at 0: rounding can put cos a hair above 1 for parallel vectors).
inline float distance64(const double* z, const double* e, int64_t D, bool cosine) {
  if (!cosine) return static_cast<float>(sq_dist64(z, e, D));
  const double nz = std::max(std::sqrt(dot64(z, z, D)), kNormEps64);
  const double ne = std::max(std::sqrt(dot64(e, e, D)), kNormEps64);
  const double d = 2.0 - 2.0 * (dot64(z, e, D) / (nz * ne));
  return static_cast<float>(d < 0.0 ? 0.0 : d);  // NaN stays NaN
}

// ------------------------------------------------------------------------------ micro-kernels
//
// Codes are packed in blocks of kW = 16 (one AVX-512 vector of fp32 lanes). A kernel scans blocks
// [b0, b1) of one group's packed codes for Rows query rows. zp holds the rows interleaved
// [D][Rows], so one pointer walks all rows and the broadcasts use immediate offsets. best/idx are
// the rows' running (score, code) in scan order: a kernel replaces them only on a strictly lower
// score, so an equal score found later (a higher code) never wins. With Top2 (the exact path) it
// also keeps second[r], the lowest score of any other code scanned so far.
constexpr int kW = 16;

using ScanFn = void (*)(const float* zp, int64_t D, const float* codes, const float* norms, int64_t b0, int64_t b1,
                        float* best, int64_t* idx, float* second);

// Folds one row's lane-wise state into its (best, idx) and, when sec is given, second. blk[l] < 0
// marks a lane that never beat the row's best; every other lane did, strictly, so the lowest of
// them wins and, among equal scores, the lowest code. A lane that lost keeps the row's previous
// best or its own best code in val: either is another code than the winner, so a candidate for
// the second-best, as is every lane's sec.
inline void fold_lanes(const float* val, const int32_t* blk, const float* sec, float& best, int64_t& idx,
                       float* second) {
  float b = best;
  int64_t bi = -1;
  int wl = -1;
  for (int l = 0; l < kW; ++l) {
    if (blk[l] < 0) continue;
    const int64_t code = int64_t(blk[l]) * kW + l;
    if (bi < 0 || val[l] < b || (val[l] == b && code < bi)) {
      b = val[l];
      bi = code;
      wl = l;
    }
  }
  if (sec != nullptr) {
    float s = *second;
    for (int l = 0; l < kW; ++l) {
      s = std::min(s, sec[l]);
      if (bi >= 0 && l != wl) s = std::min(s, val[l]);
    }
    *second = s;
  }
  if (bi >= 0) {
    best = b;
    idx = bi;
  }
}

// Native-width vectors (16, 32 or 64 bytes): with AVX-512 a block of 16 codes is one register and
// the kernel compiles to the same instructions, and speed, as hand-written intrinsics; with SSE it
// is four. Left to the auto-vectorizer, loops over 16 scalar lanes came out 3-10x slower, and a
// single 64-byte generic vector was kept in memory on AVX2.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
constexpr int kVL = kVecBytes / 4;  // fp32 lanes per native vector
constexpr int kNV = kW / kVL;       // native vectors per block of codes
typedef float vecf __attribute__((vector_size(kVecBytes)));
typedef int32_t veci __attribute__((vector_size(kVecBytes)));

inline vecf load_vecf(const float* p) {
  vecf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Every block, each row's lanes keep (score, block) with a compare and two selects: three vector
// ops per row and block next to D FMAs (Top2 adds a compare and two selects more). (A "lazy"
// variant keeping only a lane-wise min, and rescanning a sub-chunk for a row when it beat the row's
// best, gained ~5% at D = 8 and lost at D >= 32: not worth a second kernel.)
template <int Rows, bool Top2>
void scan_rows(const float* zp, int64_t D, const float* codes, const float* norms, int64_t b0, int64_t b1,
               float* best, int64_t* idx, float* second) {
  vecf bv[Rows][kNV];
  vecf sv[Top2 ? Rows : 1][kNV];
  veci blk[Rows][kNV];
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < kNV; ++v) {
      bv[r][v] = vecf{} + best[r];
      blk[r][v] = veci{} - 1;
      if constexpr (Top2) sv[r][v] = vecf{} + second[r];
    }
  veci bid = veci{} + static_cast<int32_t>(b0);
  const float* c = codes + b0 * D * kW;
  for (int64_t b = b0; b < b1; ++b) {
    vecf acc[Rows][kNV];
    for (int v = 0; v < kNV; ++v) {
      const vecf n = load_vecf(norms + b * kW + v * kVL);
      for (int r = 0; r < Rows; ++r) acc[r][v] = n;
    }
    const float* zd = zp;
    for (int64_t d = 0; d < D; ++d, c += kW, zd += Rows) {
      vecf cv[kNV];
      for (int v = 0; v < kNV; ++v) cv[v] = load_vecf(c + v * kVL);
      for (int r = 0; r < Rows; ++r) {
        const float zr = zd[r];
        for (int v = 0; v < kNV; ++v) acc[r][v] += zr * cv[v];
      }
    }
    for (int r = 0; r < Rows; ++r)
      for (int v = 0; v < kNV; ++v) {
        // Ordered less-than: a NaN score never displaces anything, and an equal one found later
        // (a higher code) never wins.
        const veci lt = acc[r][v] < bv[r][v];
        if constexpr (Top2) {
          const vecf m = acc[r][v] < sv[r][v] ? acc[r][v] : sv[r][v];
          sv[r][v] = lt ? bv[r][v] : m;
        }
        bv[r][v] = lt ? acc[r][v] : bv[r][v];
        blk[r][v] = lt ? bid : blk[r][v];
      }
    bid += 1;
  }
  for (int r = 0; r < Rows; ++r) {
    alignas(64) float val[kW];
    alignas(64) int32_t bl[kW];
    alignas(64) float sc[kW];
    std::memcpy(val, bv[r], sizeof(val));
    std::memcpy(bl, blk[r], sizeof(bl));
    if constexpr (Top2) std::memcpy(sc, sv[r], sizeof(sc));
    fold_lanes(val, bl, Top2 ? sc : nullptr, best[r], idx[r], Top2 ? second + r : nullptr);
  }
}

// The kernels of one configuration: table[rows] scans a group of `rows` rows (1..R); the last
// group of a tile is usually short and gets an exact-size kernel instead of padding.
constexpr int kMaxRows = 16;
struct KernelSet {
  int R = 0;  // rows per full micro-group
  ScanFn table[kMaxRows + 1] = {};
};

template <int Rows, bool Top2>
void fill_table(KernelSet& ks) {
  if constexpr (Rows > 0) {
    ks.table[Rows] = &scan_rows<Rows, Top2>;
    fill_table<Rows - 1, Top2>(ks);
  }
}

template <bool Top2>
KernelSet kernel_set(int R) {
  KernelSet ks;
  ks.R = R;
  switch (R) {
    case 2: fill_table<2, Top2>(ks); break;
    case 3: fill_table<3, Top2>(ks); break;
    case 4: fill_table<4, Top2>(ks); break;
    case 6: fill_table<6, Top2>(ks); break;
    case 8: fill_table<8, Top2>(ks); break;
    default: fill_table<12, Top2>(ks); break;
  }
  return ks;
}

KernelSet kernels_for(int64_t D, bool top2) {
  // As many rows as keep the accumulators, the (score, block) state and a block of codes in
  // registers: 3 x kNV vectors per row out of 32 (AVX-512) or 16, 4 x kNV with the second-best. At
  // large D the state may spill, once per D x Rows FMAs, and more rows amortize each code load
  // over more FMAs. (Top2 with 8 rows at D = 8 spilled and ran 40% slower than with 6.)
  if (kVecBytes == 64) return top2 ? kernel_set<true>(D <= 64 ? 6 : 8) : kernel_set<false>(D <= 64 ? 8 : 12);
  if (kVecBytes == 32) return top2 ? kernel_set<true>(3) : kernel_set<false>(4);
  return top2 ? kernel_set<true>(D <= 64 ? 2 : 3) : kernel_set<false>(D <= 64 ? 2 : 4);
}

// Calls fn(k), in ascending k, for each of one group's codes whose score against the packed row z
// (a plain [D] vector) is at most thr: the exact path's rescan of a row.
template <typename Fn>
void for_codes_scoring_at_most(const float* z, int64_t D, const float* codes, const float* norms, int64_t nblk,
                               int64_t K, float thr, Fn&& fn) {
  for (int64_t b = 0; b < nblk; ++b) {
    vecf acc[kNV];
    for (int v = 0; v < kNV; ++v) acc[v] = load_vecf(norms + b * kW + v * kVL);
    const float* c = codes + b * D * kW;
    for (int64_t d = 0; d < D; ++d, c += kW)
      for (int v = 0; v < kNV; ++v) acc[v] += z[d] * load_vecf(c + v * kVL);
    alignas(64) float s[kW];
    std::memcpy(s, acc, sizeof(s));
    for (int l = 0; l < kW; ++l)
      if (s[l] <= thr && b * kW + l < K) fn(b * kW + l);
  }
}

// ------------------------------------------------------------------------------ packing

// How a call ranks: its flags and, for exact L2, the point its data are centred on.
struct Mode {
  bool cosine = false, exact = false;
  std::vector<float> center;  // [G][D], exact L2 only: each group's mean finite code
  bool centred() const { return exact && !cosine; }
};

// Squared norms of centred rows and codes beyond this send the exact path to its direct scan, so
// that no fp32 score it relies on can overflow (|score| <= 3 * 2^100).
constexpr float kExactMaxSq = 0x1p100f;

struct PackedCodebook {
  int64_t G = 0, K = 0, D = 0, nblk = 0;
  at::Tensor storage_codes, storage_norms;  // own the memory below
  float* codes = nullptr;                   // [G][nblk][D][kW], -2e (cosine: -2 e/||e||)
  float* norms = nullptr;                   // [G][nblk*kW], ||e||^2 (cosine: 0); +inf for padding
  // Exact L2: a group holding a finite code whose centred squared norm exceeds kExactMaxSq.
  std::unique_ptr<std::atomic<bool>[]> far;
  const float* group_codes(int64_t g) const { return codes + g * nblk * D * kW; }
  const float* group_norms(int64_t g) const { return norms + g * nblk * kW; }
};

// Each group's mean finite code, summed in double (any centre is correct; the mean makes the
// centred values, and so the scores' rounding errors, small).
template <typename scalar_t>
std::vector<float> group_centers(const at::Tensor& cb3, int64_t G, int64_t K, int64_t D) {
  const scalar_t* base = cb3.data_ptr<scalar_t>();
  const int64_t sg = cb3.stride(0), sk = cb3.stride(1), sd = cb3.stride(2);
  std::vector<float> center(G * D, 0.f);
  std::vector<double> sum(D), row(D);
  std::vector<float> rowf(D);
  for (int64_t g = 0; g < G; ++g) {
    std::fill(sum.begin(), sum.end(), 0.0);
    int64_t n = 0;
    for (int64_t k = 0; k < K; ++k) {
      load_row(base + g * sg + k * sk, sd, D, rowf.data());
      if (!all_finite(rowf.data(), D)) continue;
      for (int64_t d = 0; d < D; ++d) sum[d] += rowf[d];
      ++n;
    }
    if (n > 0)
      for (int64_t d = 0; d < D; ++d) center[g * D + d] = static_cast<float>(sum[d] / static_cast<double>(n));
  }
  return center;
}

// A row or code as the scan sees it: centred (exact L2), unit-length (cosine rows) or as is.
inline void prepare_row(float* x, int64_t D, const Mode& mode, int64_t g) {
  if (mode.cosine) {
    unit_row(x, D);
  } else if (mode.centred()) {
    const float* c = mode.center.data() + g * D;
    for (int64_t d = 0; d < D; ++d) x[d] = x[d] - c[d];
  }
}

template <typename scalar_t>
void pack_codebook(const at::Tensor& cb3, const Mode& mode, PackedCodebook& pk) {
  const int64_t G = pk.G, K = pk.K, D = pk.D, W = kW, nblk = pk.nblk;
  const int64_t sg = cb3.stride(0), sk = cb3.stride(1), sd = cb3.stride(2);
  const scalar_t* base = cb3.data_ptr<scalar_t>();
  float* codes = pk.codes;
  float* norms = pk.norms;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, D * W));
  at::parallel_for(0, G * nblk, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> e(std::max<int64_t>(1, D));
    for (int64_t gb = begin; gb < end; ++gb) {
      const int64_t g = gb / nblk, b = gb % nblk;
      float* out = codes + gb * D * W;
      float* nout = norms + gb * W;
      for (int64_t lane = 0; lane < W; ++lane) {
        const int64_t k = b * W + lane;
        bool usable = k < K;
        if (usable) {
          load_row(base + g * sg + k * sk, sd, D, e.data());
          usable = all_finite(e.data(), D);
        }
        if (!usable) {
          // Padding or a non-finite code: a zero vector with an infinite norm scores +inf against
          // any finite row, and the strict compare never picks it.
          for (int64_t d = 0; d < D; ++d) out[d * W + lane] = 0.f;
          nout[lane] = kInf;
          continue;
        }
        float s;
        if (mode.cosine) {
          normalize_code(e.data(), D);
          // The score is then -2 cos: a constant 0 keeps ties exact, and, unlike 1, keeps the
          // digits of cosines that are all tiny (every code shorter than eps).
          s = 0.f;
        } else {
          if (mode.centred()) {
            const float* c = mode.center.data() + g * D;
            for (int64_t d = 0; d < D; ++d) e[d] = e[d] - c[d];
          }
          s = sum_sq(e.data(), D);
          if (mode.centred() && !(s <= kExactMaxSq)) pk.far[g].store(true, std::memory_order_relaxed);
        }
        for (int64_t d = 0; d < D; ++d) out[d * W + lane] = -2.f * e[d];
        nout[lane] = s;
      }
    }
  });
}

// ------------------------------------------------------------------------------ argmin driver

struct ArgminPlan {
  int64_t N = 0, G = 1, K = 0, D = 0;
  KernelSet ks;
  int64_t MC = 0;   // rows per tile
  int64_t T = 0;    // row tiles
  int64_t P = 1;    // pieces the code blocks are split into (split-K)
  int64_t KCb = 0;  // blocks per cache chunk
};

// Needs N, G, K, D >= 1.
ArgminPlan make_plan(int64_t N, int64_t G, int64_t K, int64_t D, bool exact, int64_t threads) {
  ArgminPlan p;
  p.N = N;
  p.G = G;
  p.K = K;
  p.D = D;
  p.ks = kernels_for(D, exact);
  const int64_t R = p.ks.R, W = kW;
  const int64_t nblk = ceil_div(K, W);
  p.KCb = std::max<int64_t>(1, kChunkBytes / (D * W * 4));

  int64_t mc_max = std::min<int64_t>(kMaxTileRows, kTileBytes / (D * 4));
  mc_max = std::max<int64_t>(R, mc_max / R * R);
  int64_t T = ceil_div(N, mc_max);
  // Tasks are handed out dynamically, so several per thread even out a short last tile and a
  // thread that the OS takes away for a while. Below that count, cut smaller row tiles (down to
  // four micro-groups: each tile re-streams the codebook from L3), then split K.
  const int64_t want = threads > 1 ? 8 * threads : 1;
  if (G * T < want) T = std::max(T, std::min(ceil_div(N, 4 * R), ceil_div(want, G)));
  int64_t MC = ceil_div(N, T);
  if (MC > R) MC = round_up(MC, R);
  p.MC = std::max<int64_t>(1, MC);
  p.T = ceil_div(N, p.MC);
  // Pieces of at least 8 blocks, so per-task row packing and the merge stay small next to the scan.
  if (G * p.T < want) p.P = std::max<int64_t>(1, std::min(ceil_div(want, G * p.T), nblk / 8));
  return p;
}

struct ZView {
  StridedRows rows;   // leading dims of z (all but the last one, or two when grouped)
  int64_t sg = 0;     // stride of the group dim (grouped only)
  int64_t sd = 1;     // stride of D
};

// Each task's per-row results, [G][N][P]: best score, its code (-1: none finite), and (exact) the
// second-best score.
struct ScanResults {
  std::vector<float> val, second;
  std::vector<int64_t> idx;
};

template <typename scalar_t>
void argmin_scan(const ArgminPlan& pl, const Mode& mode, const ZView& zv, const scalar_t* z,
                 const PackedCodebook& pk, ScanResults& res) {
  const int64_t N = pl.N, D = pl.D, R = pl.ks.R, P = pl.P, T = pl.T;
  const int64_t ntasks = pl.G * T * P;
  const ScanFn* table = pl.ks.table;
  // One worker per thread pulls tasks from a shared counter. Each task writes only its own result
  // slots, so which thread ran it never affects the output.
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> panel(pl.MC * D), rows(R * D), best(pl.MC), second(pl.MC);
    std::vector<int64_t> idx(pl.MC);
    for (int64_t task = next.fetch_add(1); task < ntasks; task = next.fetch_add(1)) {
      const int64_t p = task % P, t = (task / P) % T, g = task / (P * T);
      const Range rr = tile_range(N, pl.MC, t);
      const int64_t nrows = rr.size();
      if (nrows <= 0) continue;
      // Pack the tile's rows, micro-group by micro-group, as [D][rows in group].
      for (int64_t i0 = 0; i0 < nrows; i0 += R) {
        const int64_t rg = std::min(R, nrows - i0);
        for (int64_t j = 0; j < rg; ++j) {
          float* x = rows.data() + j * D;
          load_row(z + zv.rows.offset(rr.begin + i0 + j) + g * zv.sg, zv.sd, D, x);
          prepare_row(x, D, mode, g);
        }
        float* dst = panel.data() + i0 * D;
        for (int64_t d = 0; d < D; ++d)
          for (int64_t j = 0; j < rg; ++j) dst[d * rg + j] = rows[j * D + d];
      }
      // -1: nothing found yet (every score +inf or NaN so far).
      std::fill(best.begin(), best.begin() + nrows, kInf);
      std::fill(second.begin(), second.begin() + nrows, kInf);
      std::fill(idx.begin(), idx.begin() + nrows, int64_t(-1));
      const Range br = split_range(pk.nblk, P, p);
      const float* codes = pk.group_codes(g);
      const float* norms = pk.group_norms(g);
      for (int64_t c0 = br.begin; c0 < br.end; c0 += pl.KCb) {
        const int64_t c1 = std::min(br.end, c0 + pl.KCb);
        for (int64_t i0 = 0; i0 < nrows; i0 += R) {
          const int64_t rg = std::min(R, nrows - i0);
          table[rg](panel.data() + i0 * D, D, codes, norms, c0, c1, best.data() + i0, idx.data() + i0,
                    second.data() + i0);
        }
      }
      for (int64_t i = 0; i < nrows; ++i) {
        const int64_t slot = (g * N + rr.begin + i) * P + p;
        res.val[slot] = best[i];
        res.idx[slot] = idx[i];
        if (mode.exact) res.second[slot] = second[i];
      }
    }
  });
}

// The exact path's bounds (see the file comment), in units of the scores. u is fp32's unit
// roundoff; kTiny covers the absolute error of results that underflow (per operation, at most half
// fp32's smallest subnormal, times the operations one score takes).
constexpr double kU = 0x1p-24;
inline double underflow_slack(int64_t D) { return static_cast<double>(4 * D + 8) * 0x1p-149; }

// The fp32 value nearest above x (x itself when exact), so a float compare against it keeps every
// score a double compare against x would.
inline float float_at_least(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) < x) f = std::nextafter(f, kInf);
  return f;
}

// Exact path, one row: the code of lowest rank64 given the row's scan result (best score, its code,
// second-best score). `code` when the bound separates it from every other code; otherwise the
// candidates within the bound (or, when the fp32 scores cannot be trusted, every code) compared in
// double, in ascending order with strict <, so ties go to the lowest index.
template <typename scalar_t>
int64_t exact_pick(const Mode& mode, const PackedCodebook& pk, const at::Tensor& cb3, int64_t g, const float* zraw,
                   const double* z64, float best, int64_t code, float second, float* zc, double* e64) {
  const int64_t D = pk.D, K = pk.K;
  std::memcpy(zc, zraw, D * sizeof(float));
  prepare_row(zc, D, mode, g);
  bool full = mode.centred() && pk.far[g].load(std::memory_order_relaxed);
  float thr = kInf;
  if (!full) {
    if (code < 0) return 0;  // no finite code in the group
    const double slack = underflow_slack(D);
    if (mode.cosine) {
      // A zero row ties with every code (score 0); the scan kept the lowest.
      bool zero = true;
      for (int64_t d = 0; d < D; ++d) zero &= zc[d] == 0.f;
      if (zero) return code;
      // The score is -2 cos. Unit z and normalized e each carry at most (D/2 + 2)u of relative
      // error, moving the cosine by (D + 4)u, and the dot's D fused multiply-adds add Du: doubled,
      // (4D + 8)u, with room.
      const double E = static_cast<double>(5 * D + 16) * kU + slack;
      if (static_cast<double>(second) - E > static_cast<double>(best) + E) return code;
      thr = float_at_least(static_cast<double>(best) + 2 * E);
    } else {
      // With z' and e' the centred vectors, Z = ||z'||^2 and d = s + Z, the fp32 score s is within
      // c (9 Z + 5 max(d, 0)) of ||z - e||^2 - Z: c = (2D + 2)u for the fp32 norms and dot, the
      // centring's 2u(Z + 2 ||z' - e'||^2), the double evaluation's (D + 1) 2^-53, all with room.
      // The bound grows with the score, so checking the second-best covers every other code.
      const double Z = static_cast<double>(sum_sq(zc, D));
      const double c = static_cast<double>(2 * D + 8) * kU;
      if (!(Z <= kExactMaxSq) || c > 1.0 / 64) {
        full = true;
      } else {
        const auto err = [&](double s) { return c * (9 * Z + 5 * std::max(s + Z, 0.0)) + slack; };
        const double hi = static_cast<double>(best) + err(best);
        if (second == kInf || static_cast<double>(second) - err(second) > hi) return code;
        // Candidates: codes whose lowest possible distance is within reach, s - err(s) <= hi,
        // solved for s on either side of s + Z = 0.
        thr = float_at_least(std::max((hi + 14 * c * Z + slack) / (1 - 5 * c), hi + 9 * c * Z + slack));
      }
    }
  }
  const scalar_t* cb = cb3.data_ptr<scalar_t>();
  const int64_t cg = cb3.stride(0), ck = cb3.stride(1), cd = cb3.stride(2);
  int64_t pick = -1;
  double pick_rank = 0.0;
  const auto consider = [&](int64_t k) {
    load_row(cb + g * cg + k * ck, cd, D, e64);
    const double r = rank64(z64, e64, D, mode.cosine);
    // Finite codes always rank finite in double; a non-finite one ranks inf or NaN.
    if (std::isfinite(r) && (pick < 0 || r < pick_rank)) {
      pick = k;
      pick_rank = r;
    }
  };
  if (full) {
    for (int64_t k = 0; k < K; ++k) consider(k);
  } else {
    for_codes_scoring_at_most(zc, D, pk.group_codes(g), pk.group_norms(g), pk.nblk, K, thr, consider);
  }
  return pick < 0 ? 0 : pick;
}

template <typename scalar_t>
void argmin_finish(const ArgminPlan& pl, const Mode& mode, const ZView& zv, const scalar_t* z, const at::Tensor& cb3,
                   const PackedCodebook& pk, const ScanResults& res, int64_t* out_idx, float* out_dist) {
  const int64_t N = pl.N, G = pl.G, D = pl.D, P = pl.P;
  const scalar_t* cb = cb3.data_ptr<scalar_t>();
  const int64_t cg = cb3.stride(0), ck = cb3.stride(1), cd = cb3.stride(2);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, G * (D + P)));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> zr(D), zc(D);
    std::vector<double> z64(D), e64(D);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        // Pieces are in ascending code order, so strict < keeps the lowest index on ties. The
        // second-best is the lowest of every piece's second and every other piece's best.
        const int64_t slot = (g * N + n) * P;
        int64_t w = 0;
        for (int64_t p = 1; p < P; ++p)
          if (res.idx[slot + p] >= 0 && (res.idx[slot + w] < 0 || res.val[slot + p] < res.val[slot + w])) w = p;
        const float best = res.val[slot + w];
        const int64_t code = res.idx[slot + w];
        float second = kInf;
        if (mode.exact)
          for (int64_t p = 0; p < P; ++p) {
            second = std::min(second, res.second[slot + p]);
            if (p != w) second = std::min(second, res.val[slot + p]);
          }
        load_row(z + zv.rows.offset(n) + g * zv.sg, zv.sd, D, zr.data());
        for (int64_t d = 0; d < D; ++d) z64[d] = zr[d];
        int64_t k;
        if (!all_finite(zr.data(), D)) {
          k = 0;  // no code is nearer than another to a row with a NaN or an infinity
        } else if (!mode.exact) {
          k = code < 0 ? 0 : code;  // -1: no finite code in the group
        } else {
          k = exact_pick<scalar_t>(mode, pk, cb3, g, zr.data(), z64.data(), best, code, second, zc.data(),
                                   e64.data());
        }
        load_row(cb + g * cg + k * ck, cd, D, e64.data());
        out_idx[n * G + g] = k;
        out_dist[n * G + g] = distance64(z64.data(), e64.data(), D, mode.cosine);
      }
    }
  });
}

}  // namespace

std::string codebook_argmin_limits(const at::Tensor&, const at::Tensor& codebook, bool, bool) {
  if (codebook.dim() >= 2 && codebook.size(-2) > kMaxCodes)
    return c10::str("codebook of ", codebook.size(-2), " codes exceeds the cpu backend's limit of ", kMaxCodes,
                    " codes");
  return {};
}

std::tuple<at::Tensor, at::Tensor> codebook_argmin(const at::Tensor& z, const at::Tensor& codebook, bool cosine,
                                                   bool exact) {
  check_dtype_in(z, "z", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dtype_in(codebook, "codebook", {at::kFloat, at::kHalf, at::kBFloat16});
  check_device_type(z, "z", c10::DeviceType::CPU);
  check_same_device(z, "z", codebook, "codebook");
  check_same_dtype(z, "z", codebook, "codebook");
  check_dim_in(codebook, "codebook", 2, 3);
  check_nonempty_dim(codebook, "codebook", -2, "codes (K)");
  TORCH_CHECK_VALUE(codebook.size(-1) > 0, "codebook: expected a non-empty code dimension D, got shape ",
                    codebook.sizes());
  const bool grouped = codebook.dim() == 3;
  const int64_t G = grouped ? codebook.size(0) : 1;
  const int64_t K = codebook.size(-2), D = codebook.size(-1);
  TORCH_CHECK_VALUE(z.dim() >= (grouped ? 2 : 1), "z: expected at least ", grouped ? 2 : 1,
                    " dimensions ([..., G, D] for a [G, K, D] codebook)", grouped ? "" : " ([..., D])", ", got shape ",
                    z.sizes());
  TORCH_CHECK_VALUE(z.size(-1) == D, "z: expected last dimension D=", D, " matching codebook of shape ",
                    codebook.sizes(), ", got shape ", z.sizes());
  if (grouped)
    TORCH_CHECK_VALUE(z.size(-2) == G, "z: expected z.size(-2) == G=", G, " matching codebook of shape ",
                      codebook.sizes(), ", got shape ", z.sizes());

  const int64_t lead = z.dim() - (grouped ? 2 : 1);
  int64_t N = 1;
  for (int64_t i = 0; i < lead; ++i) N *= z.size(i);
  std::vector<int64_t> out_shape(z.sizes().begin(), z.sizes().end() - 1);
  at::Tensor out_idx = at::empty(out_shape, z.options().dtype(at::kLong));
  at::Tensor out_dist = at::empty(out_shape, z.options().dtype(at::kFloat));
  // Nothing to search: no rows, or no groups (a [G=0, K, D] codebook). The plan divides by both.
  if (N == 0 || G == 0) return {out_idx, out_dist};

  const at::Tensor cb3 = grouped ? codebook : codebook.unsqueeze(0);
  const ArgminPlan pl = make_plan(N, G, K, D, exact, at::get_num_threads());

  PackedCodebook pk;
  pk.G = G;
  pk.K = K;
  pk.D = D;
  pk.nblk = ceil_div(K, kW);
  pk.storage_codes = at::empty({G * pk.nblk * D * kW}, z.options().dtype(at::kFloat));
  pk.storage_norms = at::empty({G * pk.nblk * kW}, z.options().dtype(at::kFloat));
  pk.codes = pk.storage_codes.data_ptr<float>();
  pk.norms = pk.storage_norms.data_ptr<float>();
  pk.far.reset(new std::atomic<bool>[G]);
  for (int64_t g = 0; g < G; ++g) pk.far[g].store(false);

  ZView zv;
  zv.rows = StridedRows(z.sizes().data(), z.strides().data(), lead);
  zv.sg = grouped ? z.stride(-2) : 0;
  zv.sd = z.stride(-1);

  Mode mode;
  mode.cosine = cosine;
  mode.exact = exact;
  ScanResults res;
  res.val.resize(G * N * pl.P);
  res.idx.resize(G * N * pl.P);
  if (exact) res.second.resize(G * N * pl.P);

  AT_DISPATCH_V2(z.scalar_type(), "codebook_argmin", AT_WRAP([&] {
    if (mode.centred()) mode.center = group_centers<scalar_t>(cb3, G, K, D);
    pack_codebook<scalar_t>(cb3, mode, pk);
    const scalar_t* zp = z.data_ptr<scalar_t>();
    argmin_scan<scalar_t>(pl, mode, zv, zp, pk, res);
    argmin_finish<scalar_t>(pl, mode, zv, zp, cb3, pk, res, out_idx.data_ptr<int64_t>(),
                            out_dist.data_ptr<float>());
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {out_idx, out_dist};
}

// ------------------------------------------------------------------------------ lookup

namespace {

// Reads index i (int32 or int64) as int64.
inline int64_t index_at(const void* data, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(data)[i] : static_cast<const int32_t*>(data)[i];
}

// The lowest flat position holding an index outside [0, K), or -1; position i addresses group
// i % G when grouped (G == 1 otherwise), each group having K codes.
int64_t first_bad_index(const void* data, bool is64, int64_t n, int64_t K) {
  std::atomic<int64_t> first{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k = index_at(data, is64, i);
      if (k < 0 || k >= K) {
        int64_t cur = first.load();
        while (i < cur && !first.compare_exchange_weak(cur, i)) {
        }
        return;
      }
    }
  });
  const int64_t f = first.load();
  return f == std::numeric_limits<int64_t>::max() ? -1 : f;
}

void raise_bad_index(const void* data, bool is64, int64_t pos, int64_t K) {
  TORCH_CHECK_INDEX(false, "indices: index ", index_at(data, is64, pos), " at flat position ", pos,
                    " is out of range for a codebook of ", K, " codes (valid range [0, ", K - 1, "])");
}

}  // namespace

at::Tensor codebook_lookup(const at::Tensor& indices, const at::Tensor& codebook) {
  check_dtype_in(indices, "indices", {at::kLong, at::kInt});
  check_dtype_in(codebook, "codebook", {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
  check_device_type(codebook, "codebook", c10::DeviceType::CPU);
  check_same_device(codebook, "codebook", indices, "indices");
  check_dim_in(codebook, "codebook", 2, 3);
  check_nonempty_dim(codebook, "codebook", -2, "codes (K)");
  const bool grouped = codebook.dim() == 3;
  const int64_t G = grouped ? codebook.size(0) : 1;
  const int64_t K = codebook.size(-2), D = codebook.size(-1);
  if (grouped)
    TORCH_CHECK_VALUE(indices.dim() >= 1 && indices.size(-1) == G, "indices: expected last dimension G=", G,
                      " matching codebook of shape ", codebook.sizes(), ", got shape ", indices.sizes());

  std::vector<int64_t> out_shape(indices.sizes().begin(), indices.sizes().end());
  out_shape.push_back(D);
  at::Tensor out = at::empty(out_shape, codebook.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = indices.numel();
  if (n == 0) return out;

  const at::Tensor idx = indices.contiguous();
  const at::Tensor cb = codebook.contiguous();
  const bool is64 = idx.scalar_type() == at::kLong;
  const void* idata = idx.data_ptr();
  const int64_t bad = first_bad_index(idata, is64, n, K);
  if (bad >= 0) raise_bad_index(idata, is64, bad, K);

  const int64_t row_bytes = D * static_cast<int64_t>(cb.element_size());
  const char* src = static_cast<const char*>(cb.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  if (row_bytes == 0) return out;
  const int64_t grain = std::max<int64_t>(1, 65536 / row_bytes);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = grouped ? i % G : 0;
      const int64_t k = index_at(idata, is64, i);
      std::memcpy(dst + i * row_bytes, src + (g * K + k) * row_bytes, row_bytes);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------ lookup backward

namespace {

template <typename scalar_t>
void lookup_backward_impl(const at::Tensor& grad, const StridedRows& rows, int64_t sd, int64_t D,
                          const std::vector<int64_t>& start, const std::vector<int64_t>& order, int64_t nkeys,
                          at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = grad.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  // Small problems stay on one thread: a chunk should carry ~16k additions on average.
  const int64_t work = static_cast<int64_t>(order.size()) * std::max<int64_t>(1, D);
  const int64_t grain = std::max<int64_t>(1, nkeys * 16384 / std::max<int64_t>(1, work));
  at::parallel_for(0, nkeys, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(std::max<int64_t>(1, D));
    for (int64_t key = begin; key < end; ++key) {
      const int64_t s = start[key], e = start[key + 1];
      if (s == e) continue;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      // Rows in ascending order, whatever the thread count: the sum is deterministic.
      for (int64_t j = s; j < e; ++j) {
        const scalar_t* src = g + rows.offset(order[j]);
        if (sd == 1) {
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(src[d]);
        } else {
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(src[d * sd]);
        }
      }
      scalar_t* dst = o + key * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
    }
  });
}

}  // namespace

at::Tensor codebook_lookup_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                    c10::SymIntArrayRef codebook_sym_shape) {
  const at::IntArrayRef codebook_shape = C10_AS_INTARRAYREF_SLOW(codebook_sym_shape);
  check_dtype_in(grad_output, "grad_output", {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
  check_dtype_in(indices, "indices", {at::kLong, at::kInt});
  check_device_type(grad_output, "grad_output", c10::DeviceType::CPU);
  check_same_device(grad_output, "grad_output", indices, "indices");
  TORCH_CHECK_VALUE(codebook_shape.size() == 2 || codebook_shape.size() == 3,
                    "codebook_shape: expected [K, D] or [G, K, D], got ", codebook_shape);
  for (auto s : codebook_shape)
    TORCH_CHECK_VALUE(s >= 0, "codebook_shape: expected non-negative sizes, got ", codebook_shape);
  const bool grouped = codebook_shape.size() == 3;
  const int64_t G = grouped ? codebook_shape[0] : 1;
  const int64_t K = codebook_shape[codebook_shape.size() - 2], D = codebook_shape.back();
  if (grouped)
    TORCH_CHECK_VALUE(indices.dim() >= 1 && indices.size(-1) == G, "indices: expected last dimension G=", G,
                      " matching codebook_shape ", codebook_shape, ", got shape ", indices.sizes());
  std::vector<int64_t> expect(indices.sizes().begin(), indices.sizes().end());
  expect.push_back(D);
  TORCH_CHECK_VALUE(grad_output.sizes().equals(expect), "grad_output: expected shape ", at::IntArrayRef(expect),
                    " (indices' shape + [D]), got ", grad_output.sizes());

  at::Tensor out = at::zeros(codebook_shape, grad_output.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = indices.numel();
  if (n == 0) return out;
  const at::Tensor idx = indices.contiguous();
  const bool is64 = idx.scalar_type() == at::kLong;
  const void* idata = idx.data_ptr();
  const int64_t bad = first_bad_index(idata, is64, n, K);
  if (bad >= 0) raise_bad_index(idata, is64, bad, K);
  if (D == 0) return out;

  // Stable counting sort of rows by (group, code): each code's rows end up contiguous and in
  // ascending row order.
  const int64_t nkeys = G * K;
  std::vector<int64_t> start(nkeys + 1, 0), order(n);
  for (int64_t i = 0; i < n; ++i) ++start[(grouped ? (i % G) * K : 0) + index_at(idata, is64, i) + 1];
  for (int64_t key = 0; key < nkeys; ++key) start[key + 1] += start[key];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[fill[(grouped ? (i % G) * K : 0) + index_at(idata, is64, i)]++] = i;
  }

  const StridedRows rows(grad_output.sizes().data(), grad_output.strides().data(), grad_output.dim() - 1);
  const int64_t sd = grad_output.stride(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "codebook_lookup_backward",
                                  [&] { lookup_backward_impl<scalar_t>(grad_output, rows, sd, D, start, order, nkeys, out); });
  return out;
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL_LIMITED(m, "codebook_argmin", vitk::Backend::kCpu, &vitk::cpu::codebook_argmin,
                    &vitk::cpu::codebook_argmin_limits);
  VITK_IMPL(m, "codebook_lookup", vitk::Backend::kCpu, &vitk::cpu::codebook_lookup);
  VITK_IMPL(m, "codebook_lookup_backward", vitk::Backend::kCpu, &vitk::cpu::codebook_lookup_backward);
}
