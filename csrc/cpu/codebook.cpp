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
// memory is the packed codebook plus O(N) per-row results. The reported distance is recomputed
// exactly for the winner, ||z - e||^2 in fp32 (cosine: 2 - 2 cos), not read off the expansion.
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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

// Cache budgets (bytes). A chunk of packed codes is re-read by every micro-group of rows in a tile,
// so it should stay in L2 next to the tile's packed rows; a micro-group's rows stay in L1.
constexpr int64_t kChunkBytes = 256 * 1024;
constexpr int64_t kTileBytes = 128 * 1024;
constexpr int64_t kMaxTileRows = 512;

// ------------------------------------------------------------------------------ row helpers

template <typename scalar_t>
inline void load_row(const scalar_t* src, int64_t sd, int64_t D, float* out) {
  if (sd == 1) {
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(src[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(src[d * sd]);
  }
}

// Reductions over D with 16 independent partial sums: a single running sum would serialize on the
// add latency (about 4 cycles per element), which at D = 256 costs more per row than the row's
// share of the search itself. The lane split is fixed, so results do not depend on the thread count.
constexpr int kSumLanes = 16;

inline float sum_lanes(const float* part) {
  float s = 0.f;
  for (int l = 0; l < kSumLanes; ++l) s += part[l];
  return s;
}

inline float sum_sq(const float* x, int64_t D) {
  float part[kSumLanes] = {};
  int64_t d = 0;
  for (; d + kSumLanes <= D; d += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) part[l] += x[d + l] * x[d + l];
  for (int l = 0; d + l < D; ++l) part[l] += x[d + l] * x[d + l];
  return sum_lanes(part);
}

inline float dot(const float* x, const float* y, int64_t D) {
  float part[kSumLanes] = {};
  int64_t d = 0;
  for (; d + kSumLanes <= D; d += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) part[l] += x[d + l] * y[d + l];
  for (int l = 0; d + l < D; ++l) part[l] += x[d + l] * y[d + l];
  return sum_lanes(part);
}

inline float sq_dist(const float* x, const float* y, int64_t D) {
  float part[kSumLanes] = {};
  int64_t d = 0;
  for (; d + kSumLanes <= D; d += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) {
      const float t = x[d + l] - y[d + l];
      part[l] += t * t;
    }
  for (int l = 0; d + l < D; ++l) {
    const float t = x[d + l] - y[d + l];
    part[l] += t * t;
  }
  return sum_lanes(part);
}

// Same arithmetic for queries and codes, so that a code and a positive power-of-two multiple of it
// normalize to bit-identical vectors and tie exactly.
inline void normalize_row(float* x, int64_t D) {
  const float denom = std::max(std::sqrt(sum_sq(x, D)), kNormEps);
  for (int64_t d = 0; d < D; ++d) x[d] = x[d] / denom;
}

// ------------------------------------------------------------------------------ micro-kernels
//
// Codes are packed in blocks of kW = 16 (one AVX-512 vector of fp32 lanes). A kernel scans blocks
// [b0, b1) of one group's packed codes for Rows query rows. zp holds the rows interleaved
// [D][Rows], so one pointer walks all rows and the broadcasts use immediate offsets. best/idx are
// the rows' running (score, code) in scan order: a kernel replaces them only on a strictly lower
// score, so an equal score found later (a higher code) never wins.
constexpr int kW = 16;

using ScanFn = void (*)(const float* zp, int64_t D, const float* codes, const float* norms, int64_t b0, int64_t b1,
                        float* best, int64_t* idx);

// Folds one row's lane-wise state into its (best, idx). blk[l] < 0 marks a lane that never beat
// the row's best; every other lane did, strictly, so the lowest of them wins and, among equal
// scores, the lowest code.
inline void fold_lanes(const float* val, const int32_t* blk, float& best, int64_t& idx) {
  float b = best;
  int64_t bi = -1;
  for (int l = 0; l < kW; ++l) {
    if (blk[l] < 0) continue;
    const int64_t code = int64_t(blk[l]) * kW + l;
    if (bi < 0 || val[l] < b || (val[l] == b && code < bi)) {
      b = val[l];
      bi = code;
    }
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
// ops per row and block next to D FMAs. (A "lazy" variant keeping only a lane-wise min, and
// rescanning a sub-chunk for a row when it beat the row's best, gained ~5% at D = 8 and lost at
// D >= 32: not worth a second kernel.)
template <int Rows>
void scan_rows(const float* zp, int64_t D, const float* codes, const float* norms, int64_t b0, int64_t b1,
               float* best, int64_t* idx) {
  vecf bv[Rows][kNV];
  veci blk[Rows][kNV];
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < kNV; ++v) {
      bv[r][v] = vecf{} + best[r];
      blk[r][v] = veci{} - 1;
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
        bv[r][v] = lt ? acc[r][v] : bv[r][v];
        blk[r][v] = lt ? bid : blk[r][v];
      }
    bid += 1;
  }
  for (int r = 0; r < Rows; ++r) {
    alignas(64) float val[kW];
    alignas(64) int32_t bl[kW];
    std::memcpy(val, bv[r], sizeof(val));
    std::memcpy(bl, blk[r], sizeof(bl));
    fold_lanes(val, bl, best[r], idx[r]);
  }
}

// The kernels of one configuration: table[rows] scans a group of `rows` rows (1..R); the last
// group of a tile is usually short and gets an exact-size kernel instead of padding.
constexpr int kMaxRows = 16;
struct KernelSet {
  int R = 0;  // rows per full micro-group
  ScanFn table[kMaxRows + 1] = {};
};

template <template <int> class Make, int Rows>
void fill_table(KernelSet& ks) {
  if constexpr (Rows > 0) {
    ks.table[Rows] = Make<Rows>::fn;
    fill_table<Make, Rows - 1>(ks);
  }
}

template <int Rows>
struct MakeScan {
  static constexpr ScanFn fn = &scan_rows<Rows>;
};

KernelSet kernels_for(int64_t D) {
  // As many rows as keep the accumulators, the (score, block) state and a block of codes in
  // registers: 3 x kNV vectors per row out of 32 (AVX-512) or 16. At large D the state may spill,
  // once per D x Rows FMAs, and more rows amortize each code load over more FMAs.
  KernelSet ks;
  if (kVecBytes == 64) {
    ks.R = D <= 64 ? 8 : 12;
  } else if (kVecBytes == 32) {
    ks.R = 4;
  } else {
    ks.R = D <= 64 ? 2 : 4;
  }
  switch (ks.R) {
    case 2: fill_table<MakeScan, 2>(ks); break;
    case 4: fill_table<MakeScan, 4>(ks); break;
    case 8: fill_table<MakeScan, 8>(ks); break;
    default: fill_table<MakeScan, 12>(ks); break;
  }
  return ks;
}

// ------------------------------------------------------------------------------ packing

struct PackedCodebook {
  int64_t G = 0, K = 0, D = 0, nblk = 0;
  at::Tensor storage_codes, storage_norms;  // own the memory below
  float* codes = nullptr;                   // [G][nblk][D][kW], -2e (cosine: -2 e/||e||)
  float* norms = nullptr;                   // [G][nblk*kW], ||e||^2 (cosine: 1); +inf for padding
  const float* group_codes(int64_t g) const { return codes + g * nblk * D * kW; }
  const float* group_norms(int64_t g) const { return norms + g * nblk * kW; }
};

template <typename scalar_t>
void pack_codebook(const at::Tensor& cb3, bool cosine, PackedCodebook& pk) {
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
        if (k >= K) {
          // Padding: zero vector with an infinite norm, so its score is +inf (or NaN for a
          // non-finite query) and the strict compare never picks it.
          for (int64_t d = 0; d < D; ++d) out[d * W + lane] = 0.f;
          nout[lane] = kInf;
          continue;
        }
        load_row(base + g * sg + k * sk, sd, D, e.data());
        float s;
        if (cosine) {
          normalize_row(e.data(), D);
          s = 1.f;  // constant, so the compared score is exactly 1 - 2 cos and ties stay exact
        } else {
          s = sum_sq(e.data(), D);
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
  bool cosine = false;
  KernelSet ks;
  int64_t MC = 0;   // rows per tile
  int64_t T = 0;    // row tiles
  int64_t P = 1;    // pieces the code blocks are split into (split-K)
  int64_t KCb = 0;  // blocks per cache chunk
};

ArgminPlan make_plan(int64_t N, int64_t G, int64_t K, int64_t D, bool cosine, int64_t threads) {
  ArgminPlan p;
  p.N = N;
  p.G = G;
  p.K = K;
  p.D = D;
  p.cosine = cosine;
  p.ks = kernels_for(D);
  const int64_t R = p.ks.R, W = kW, Dm = std::max<int64_t>(1, D);
  const int64_t nblk = ceil_div(K, W);
  p.KCb = std::max<int64_t>(1, kChunkBytes / (Dm * W * 4));

  int64_t mc_max = std::min<int64_t>(kMaxTileRows, kTileBytes / (Dm * 4));
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

template <typename scalar_t>
void argmin_scan(const ArgminPlan& pl, const ZView& zv, const scalar_t* z, const PackedCodebook& pk,
                 float* res_val, int64_t* res_idx) {
  const int64_t N = pl.N, D = pl.D, R = pl.ks.R, P = pl.P, T = pl.T;
  const int64_t Dm = std::max<int64_t>(1, D);
  const int64_t ntasks = pl.G * T * P;
  // One worker per thread pulls tasks from a shared counter. Each task writes only its own result
  // slots, so which thread ran it never affects the output.
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> panel(pl.MC * Dm), rows(R * Dm), best(pl.MC);
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
          float* x = rows.data() + j * Dm;
          load_row(z + zv.rows.offset(rr.begin + i0 + j) + g * zv.sg, zv.sd, D, x);
          if (pl.cosine) normalize_row(x, D);
        }
        float* dst = panel.data() + i0 * D;
        for (int64_t d = 0; d < D; ++d)
          for (int64_t j = 0; j < rg; ++j) dst[d * rg + j] = rows[j * Dm + d];
      }
      // -1: nothing found yet (every score NaN so far).
      std::fill(best.begin(), best.begin() + nrows, kInf);
      std::fill(idx.begin(), idx.begin() + nrows, int64_t(-1));
      const Range br = split_range(pk.nblk, P, p);
      const float* codes = pk.group_codes(g);
      const float* norms = pk.group_norms(g);
      for (int64_t c0 = br.begin; c0 < br.end; c0 += pl.KCb) {
        const int64_t c1 = std::min(br.end, c0 + pl.KCb);
        for (int64_t i0 = 0; i0 < nrows; i0 += R) {
          const int64_t rg = std::min(R, nrows - i0);
          pl.ks.table[rg](panel.data() + i0 * D, D, codes, norms, c0, c1, best.data() + i0, idx.data() + i0);
        }
      }
      for (int64_t i = 0; i < nrows; ++i) {
        const int64_t slot = (g * N + rr.begin + i) * P + p;
        res_val[slot] = best[i];
        res_idx[slot] = idx[i];
      }
    }
  });
}

template <typename scalar_t>
void argmin_finish(const ArgminPlan& pl, const ZView& zv, const scalar_t* z, const at::Tensor& cb3,
                   const PackedCodebook& pk, const float* res_val, const int64_t* res_idx, int64_t* out_idx,
                   float* out_dist) {
  const int64_t N = pl.N, G = pl.G, K = pl.K, D = pl.D, P = pl.P, W = kW;
  const scalar_t* cb = cb3.data_ptr<scalar_t>();
  const int64_t cg = cb3.stride(0), ck = cb3.stride(1), cd = cb3.stride(2);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, G * (D + P)));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> zr(std::max<int64_t>(1, D)), er(std::max<int64_t>(1, D));
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        // Pieces are in ascending code order, so strict < keeps the lowest index on ties.
        const int64_t slot = (g * N + n) * P;
        float best = res_val[slot];
        int64_t code = res_idx[slot];
        for (int64_t p = 1; p < P; ++p)
          if (res_idx[slot + p] >= 0 && (code < 0 || res_val[slot + p] < best)) {
            best = res_val[slot + p];
            code = res_idx[slot + p];
          }
        // Only rows whose every score was NaN can land outside [0, K): report code 0.
        if (code < 0 || code >= K) code = 0;
        load_row(z + zv.rows.offset(n) + g * zv.sg, zv.sd, D, zr.data());
        float dist;
        if (pl.cosine) {
          normalize_row(zr.data(), D);
          // The packed code is exactly -2 * (normalized e): read it back rather than renormalize.
          const float* blk = pk.group_codes(g) + (code / W) * D * W + (code % W);
          for (int64_t d = 0; d < D; ++d) er[d] = blk[d * W] * -0.5f;
          dist = 2.f - 2.f * dot(zr.data(), er.data(), D);
        } else {
          load_row(cb + g * cg + code * ck, cd, D, er.data());
          dist = sq_dist(zr.data(), er.data(), D);
        }
        out_idx[n * G + g] = code;
        out_dist[n * G + g] = dist;
      }
    }
  });
}

}  // namespace

std::string codebook_argmin_limits(const at::Tensor&, const at::Tensor& codebook, bool) {
  if (codebook.dim() >= 2 && codebook.size(-2) > kMaxCodes)
    return c10::str("codebook of ", codebook.size(-2), " codes exceeds the cpu backend's limit of ", kMaxCodes,
                    " codes");
  return {};
}

std::tuple<at::Tensor, at::Tensor> codebook_argmin(const at::Tensor& z, const at::Tensor& codebook, bool cosine) {
  check_dtype_in(z, "z", {at::kFloat, at::kHalf, at::kBFloat16});
  check_dtype_in(codebook, "codebook", {at::kFloat, at::kHalf, at::kBFloat16});
  check_device_type(z, "z", c10::DeviceType::CPU);
  check_same_device(z, "z", codebook, "codebook");
  check_same_dtype(z, "z", codebook, "codebook");
  check_dim_in(codebook, "codebook", 2, 3);
  check_nonempty_dim(codebook, "codebook", -2, "codes (K)");
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
  if (N == 0) return {out_idx, out_dist};

  const at::Tensor cb3 = grouped ? codebook : codebook.unsqueeze(0);
  const ArgminPlan pl = make_plan(N, G, K, D, cosine, at::get_num_threads());

  PackedCodebook pk;
  pk.G = G;
  pk.K = K;
  pk.D = D;
  pk.nblk = ceil_div(K, kW);
  pk.storage_codes = at::empty({std::max<int64_t>(1, G * pk.nblk * D * kW)}, z.options().dtype(at::kFloat));
  pk.storage_norms = at::empty({G * pk.nblk * kW}, z.options().dtype(at::kFloat));
  pk.codes = pk.storage_codes.data_ptr<float>();
  pk.norms = pk.storage_norms.data_ptr<float>();

  ZView zv;
  zv.rows = StridedRows(z.sizes().data(), z.strides().data(), lead);
  zv.sg = grouped ? z.stride(-2) : 0;
  zv.sd = z.stride(-1);

  std::vector<float> res_val(G * N * pl.P);
  std::vector<int64_t> res_idx(G * N * pl.P);

  AT_DISPATCH_V2(z.scalar_type(), "codebook_argmin", AT_WRAP([&] {
    pack_codebook<scalar_t>(cb3, cosine, pk);
    const scalar_t* zp = z.data_ptr<scalar_t>();
    argmin_scan<scalar_t>(pl, zv, zp, pk, res_val.data(), res_idx.data());
    argmin_finish<scalar_t>(pl, zv, zp, cb3, pk, res_val.data(), res_idx.data(), out_idx.data_ptr<int64_t>(),
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
