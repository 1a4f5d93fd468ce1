// The attention core of the CPU kernels: one online-softmax loop over fp32 tiles, written once and
// specialised per family by a score modifier. The families pack their tensors into the fp32
// buffers described below and unpack the results, so every attention family -- shifted windows,
// varlen segments, polyline / decay / Gaussian-mixture masks, reduced attention -- runs the same
// micro-kernels and the same softmax arithmetic.
//
// Layers, one header each (this one includes them all):
//   vitk/attention_simd.h      constants, aligned buffers, 16-lane SIMD row operations
//   vitk/attention_gemm.h      the register-blocked micro-GEMM
//   vitk/attention_schedule.h  prefetch queue, dynamic task batches over the threads
//   vitk/attention_pack.h      gathers from strided tensors into the padded fp32 layouts
//   vitk/attention_core.h      (here) problems, tile sizes, the forward and backward loops
//   vitk/attention_driver.h    the per-op driver on top: views, tasks, output rows, dispatch
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
#include <cassert>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vitk/attention_gemm.h"
#include "vitk/attention_pack.h"
#include "vitk/attention_schedule.h"
#include "vitk/attention_simd.h"
#include "vitk/tiling.h"

namespace vitk {
namespace attn {

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
  float* lse = nullptr;       // [M] out: natural-log log-sum-exp (-inf when N = 0; NaN, with a NaN
                              // output row, for a NaN or +inf logit or a row of -inf logits)
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
        // A row whose logits are all -inf so far keeps m = -inf; subtracting 0 instead keeps
        // exp(-inf) = 0 rather than exp(nan). Non-finite logits need no test here: the max may drop
        // a NaN, but exp(NaN - m) is NaN, and a +inf logit makes m = +inf and exp(inf - inf) NaN,
        // so the row's sum l turns NaN either way and stays NaN through every later rescale.
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
        // l is NaN (a NaN or +inf logit) or 0 (every key of the row at -inf: eager's 0 / 0).
        std::fill(orow, orow + owidth, kNaN);
        p.lse[q0 + i] = kNaN;
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

}  // namespace attn
}  // namespace vitk
