// CPU kernels of reduced attention: many queries against a short k/v (PVTv2's spatial-reduction
// attention, 3136 queries against 49 keys; S2AFormer's strip attention, with q/k channels
// compressed to dqk as small as 1 and dv independent). Forward and backward on the attention core,
// with no modifier.
//
// A problem is one (image, head). Its queries are cut into fixed chunks, one task each, so a few
// images still spread over every thread; a thread packs a problem's keys and values once and keeps
// them while its consecutive tasks belong to the same problem, and packs only its chunk's queries.
// With few keys (PVT's 49, up to kShortKeys) both passes compute transposed tiles: S^T = (scale K) Q^T
// with the chunk's queries along the vector lanes, so no lane is wasted on padding the key count to
// 16 (49 keys would fill 64 lanes), and the softmax and its gradient are lane-wise operations down
// the Nk rows, with no horizontal reduction per query; O = P V, dV = P^T dO, dK = dS^T Q and
// dQ = dS K are the core's micro-kernels reading those tiles as stored or transposed. Longer key
// sets go through the core's row-wise online softmax and backward.
//
// Backward: dq of a chunk depends on its own queries only, but dk and dv sum over every query. Each
// chunk task accumulates its own dk/dv partial (it streams the chunk's queries past all keys), and
// the partials of a problem are summed afterwards in chunk order: deterministic, independent of the
// thread count, and without a second pass over the queries. A chunk has at least as many queries as
// there are keys, so the partials take no more memory than q, k and v themselves.
#include "vitk/masked_attention.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "vitk/attention_driver.h"
#include "vitk/checks.h"
#include "vitk/tiling.h"
#include "vitk/registration.h"

namespace vitk {
namespace cpu {
namespace {

using attn::Buffer;
using attn::pad_lanes;

constexpr int64_t kFwdChunk = 256;
constexpr int64_t kBwdChunk = 512;
constexpr int64_t kShortKeys = 128;

// Column-wise (lane-wise) operations on transposed score tiles st [nk][ld]: column c is one query,
// so every reduction over keys runs down the rows with the queries in the lanes. Rows are the outer
// loop (a stream through the tile); the per-column state (ncols floats) stays in L1.

// The softmax of each column c < ncols (ncols a multiple of 16), unnormalized: st becomes
// exp(s - max), lse[c] = max + log(sum) for c < len, and inv[c] = 1 / sum, which the caller applies
// to the output rows as it stores them (one pass over the tile fewer). m: scratch of ncols floats.
inline void column_softmax(float* st, int64_t nk, int64_t ld, int64_t ncols, int64_t len, float* lse, float* m,
                           float* inv, attn::PrefetchQueue& pq) {
  float* l = inv;
  std::copy(st, st + ncols, m);
  for (int64_t r = 1; r < nk; ++r) {
    const float* row = st + r * ld;
    for (int64_t c = 0; c < ncols; ++c) m[c] = std::max(m[c], row[c]);
  }
  std::fill(l, l + ncols, 0.f);
  for (int64_t r = 0; r < nk; ++r) {
    pq.step();
    float* row = st + r * ld;
#ifdef __AVX512F__
    using namespace attn::simd;
    for (int64_t c = 0; c < ncols; c += attn::kLanes) {
      const vf e = exp(sub(load(row + c), load(m + c)));
      store(row + c, e);
      store(l + c, add(load(l + c), e));
    }
#else
    for (int64_t c = 0; c < ncols; ++c) {
      const float e = attn::simd::exp1(row[c] - m[c]);
      row[c] = e;
      l[c] += e;
    }
#endif
  }
  for (int64_t c = 0; c < len; ++c) lse[c] = m[c] + std::log(l[c]);
  for (int64_t c = 0; c < ncols; ++c) l[c] = 1.f / l[c];
}

// st = exp(st - lse[c]): the probabilities again, from the saved log-sum-exp (+inf in a column
// gives 0).
inline void column_probs(float* st, int64_t nk, int64_t ld, int64_t ncols, const float* lse,
                         attn::PrefetchQueue& pq) {
  for (int64_t r = 0; r < nk; ++r) {
    pq.step();
    float* row = st + r * ld;
#ifdef __AVX512F__
    using namespace attn::simd;
    for (int64_t c = 0; c < ncols; c += attn::kLanes) store(row + c, exp(sub(load(row + c), load(lse + c))));
#else
    for (int64_t c = 0; c < ncols; ++c) row[c] = attn::simd::exp1(row[c] - lse[c]);
#endif
  }
}

// dp = p * (dp - drow[c]): dLoss/dScores of the softmax.
inline void column_ds(const float* p, float* dp, int64_t nk, int64_t ld, int64_t ncols, const float* drow,
                      attn::PrefetchQueue& pq) {
  for (int64_t r = 0; r < nk; ++r) {
    pq.step();
    const float* pr = p + r * ld;
    float* dr = dp + r * ld;
    for (int64_t c = 0; c < ncols; ++c) dr[c] = pr[c] * (dr[c] - drow[c]);
  }
}

// A [B, N, heads, d] tensor read in place.
template <typename T>
using View4 = attn::Rows<T, 4>;

// Queues rows [t0, t0 + n) of head h of image b.
template <typename T>
void queue_rows(attn::PrefetchQueue& pq, const View4<T>& v, int64_t b, int64_t t0, int64_t n, int64_t h, int64_t d) {
  for (int64_t t = t0; t < t0 + n; ++t) v.queue(pq, v.row(b, t, h), d);
}

struct Shape {
  int64_t B = 0, Nq = 0, Nk = 0, nh = 0, dqk = 0, dv = 0;
};

Shape shape_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return Shape{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3), v.size(3)};
}

// Problem-major tasks (p = image): every problem's queries cut into the same nearly equal chunks of
// at most `chunk` rows, so task index = problem * pieces + piece.
std::vector<attn::Task> make_tasks(const Shape& sh, int64_t chunk, int64_t& pieces) {
  pieces = ceil_div(sh.Nq, chunk);
  std::vector<attn::Task> tasks;
  tasks.reserve(sh.B * sh.nh * pieces);
  for (int64_t b = 0; b < sh.B; ++b)
    for (int64_t h = 0; h < sh.nh; ++h) attn::add_chunks(tasks, b, h, sh.Nq, chunk);
  return tasks;
}

// Queues what task nt reads: its problem's keys and values when it starts a new problem, then its
// chunk's rows of `rows` (widths w): q in the forward; q, grad_out and out in the backward.
template <typename T, size_t NR>
void queue_next(attn::PrefetchQueue& pq, const Shape& sh, const attn::Task& t, const attn::Task& nt,
                const View4<T>& kv, const View4<T>& vv, const View4<T>* const (&rows)[NR], const int64_t (&w)[NR]) {
  if (nt.p != t.p || nt.h != t.h) {
    queue_rows(pq, kv, nt.p, 0, sh.Nk, nt.h, sh.dqk);
    queue_rows(pq, vv, nt.p, 0, sh.Nk, nt.h, sh.dv);
  }
  for (size_t r = 0; r < NR; ++r) queue_rows(pq, *rows[r], nt.p, nt.begin, nt.end - nt.begin, nt.h, w[r]);
}

// Rows [r) of a contiguous [B, N, heads, d] output (streamed: fp32 outputs are large and read by the
// next layer), from packed rows starting at local row 0.
template <typename T>
void store_rows(T* dst, int64_t N, int64_t nh, int64_t b, int64_t h, Range r, const float* src, int64_t ld,
                int64_t d, float mult, const float* row_mult = nullptr) {
  for (int64_t i = r.begin; i < r.end; ++i) {
    const float m = row_mult != nullptr ? mult * row_mult[i - r.begin] : mult;
    attn::stream_store_row(dst + ((b * N + i) * nh + h) * d, src + (i - r.begin) * ld, d, m);
  }
}

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}}) {
    check_dtype_in(t, name, {at::kFloat, at::kHalf, at::kBFloat16});
    check_device_type(t, name, c10::DeviceType::CPU);
    check_dim_in(t, name, 4, 4);
  }
  check_same_dtype(q, "q", k, "k");
  check_same_dtype(q, "q", v, "v");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3), "k: expected shape [",
                    q.size(0), ", Nk, ", q.size(2), ", ", q.size(3), "] (q's batch, heads and head_dim), got ",
                    k.sizes());
  TORCH_CHECK_VALUE(k.size(1) >= 1, "k: expected at least one key, got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes().slice(0, 3) == k.sizes().slice(0, 3), "v: expected shape ", k.sizes().slice(0, 3),
                    " + [head_dim_v], got ", v.sizes());
  check_nonempty_dim(q, "q", 3, "head_dim");
  check_nonempty_dim(v, "v", 3, "head_dim");
}

// ------------------------------------------------------------------------------ forward

template <typename T>
void reduced_fwd_impl(const Shape& sh, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, float scale,
                      at::Tensor& out, at::Tensor& lse) {
  const View4<T> qv(q), kv(k), vv(v);
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const int64_t Nk = sh.Nk, nh = sh.nh, dqk = sh.dqk, dv = sh.dv;
  const int64_t ldq = dqk, ldv = pad_lanes(dv), ldkt = pad_lanes(Nk);
  int64_t pieces = 0;
  const std::vector<attn::Task> tasks = make_tasks(sh, kFwdChunk, pieces);
  const bool short_keys = Nk <= kShortKeys;
  const View4<T>* const chunk_ins[1] = {&qv};
  const int64_t chunk_w[1] = {dqk};
  struct State {
    Buffer qb, ktb, vb, ob, lb, ksb, stb, cmb, clb;
    attn::Scratch ws;
    float *qs, *kss, *sts, *colm, *coll, *kts, *vs, *os, *ls;
    int64_t cb = -1, ch = -1;
    State(bool short_keys, int64_t Nk, int64_t dqk, int64_t ldkt, int64_t ldv) {
      // Queries as rows [len][dqk], or transposed [dqk][pad(len)] for the short-key path; its
      // padding columns only feed score columns that are never stored.
      qs = qb.zeros(kFwdChunk * dqk);
      kss = short_keys ? ksb.grow(Nk * dqk) : nullptr;
      sts = short_keys ? stb.grow(Nk * kFwdChunk) : nullptr;
      colm = short_keys ? cmb.grow(kFwdChunk) : nullptr;
      coll = short_keys ? clb.grow(kFwdChunk) : nullptr;
      // Padding columns of kt and lanes of v are never written by the packing: zero them once.
      kts = short_keys ? nullptr : ktb.zeros(dqk * ldkt);
      vs = vb.zeros(Nk * ldv);
      os = ob.grow(kFwdChunk * ldv);
      ls = lb.grow(kFwdChunk);
    }
  };
  attn::run_tasks(
      static_cast<int64_t>(tasks.size()), 1, [&] { return State(short_keys, Nk, dqk, ldkt, ldv); },
      [&](State& st, attn::PrefetchQueue& pq, int64_t ti, int64_t next) {
        const attn::Task& t = tasks[ti];
        const int64_t len = t.end - t.begin;
        if (next >= 0) queue_next(pq, sh, t, tasks[next], kv, vv, chunk_ins, chunk_w);
        // The core steps the queue once per query row; the transposed path once per key row of its
        // column passes (a burst of the whole next chunk at once would stall on the miss buffers).
        pq.plan(short_keys ? Nk : len);
        if (t.p != st.cb || t.h != st.ch) {
          st.cb = t.p;
          st.ch = t.h;
          auto rows = [&](const View4<T>& vw) {
            return [&, vw](int64_t i) -> const T* { return vw.row(t.p, i, t.h); };
          };
          if (short_keys)
            attn::pack_rows<T>(Nk, dqk, kv.sd(), rows(kv), scale, st.kss, dqk);
          else
            attn::pack_cols<T>(Nk, dqk, kv.sd(), rows(kv), st.kts, ldkt);
          attn::pack_rows<T>(Nk, dv, vv.sd(), rows(vv), 1.f, st.vs, ldv);
        }
        auto chunk_row = [&](int64_t i) -> const T* { return qv.row(t.p, t.begin + i, t.h); };
        if (short_keys) {
          const int64_t ldc = pad_lanes(len);
          attn::pack_cols<T>(len, dqk, qv.sd(), chunk_row, st.qs, ldc);
          attn::gemm<false, false>(Nk, ldc, dqk, st.kss, dqk, st.qs, ldc, st.sts, ldc);
          column_softmax(st.sts, Nk, ldc, ldc, len, st.ls, st.colm, st.coll, pq);  // coll: 1 / sum
          attn::gemm<false, true>(len, ldv, Nk, st.sts, ldc, st.vs, ldv, st.os, ldv);
        } else {
          attn::pack_rows<T>(len, dqk, qv.sd(), chunk_row, scale, st.qs, ldq);
          attn::FwdProblem p{.M = len, .N = Nk, .dqk = dqk, .dv = dv, .q = st.qs, .ldq = ldq, .kt = st.kts,
                             .ldkt = ldkt, .v = st.vs, .ldv = ldv, .o = st.os, .ldo = ldv, .lse = st.ls,
                             .prefetch = &pq};
          attn::NoModifier mod;
          attn::attention_forward(p, mod, st.ws, Range{0, len});
        }
        pq.drain();
        store_rows(op, sh.Nq, nh, t.p, t.h, Range{t.begin, t.end}, st.os, ldv, dv, 1.f,
                   short_keys ? st.coll : nullptr);
        for (int64_t i = 0; i < len; ++i) lp[(t.p * sh.Nq + t.begin + i) * nh + t.h] = st.ls[i];
      });
}

// ------------------------------------------------------------------------------ backward

template <typename T>
void reduced_bwd_impl(const Shape& sh, const at::Tensor& go, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, float scale, at::Tensor& dq,
                      at::Tensor& dk, at::Tensor& dv_t) {
  const View4<T> qv(q), kv(k), vv(v), gv(go), ov(out);
  const float* lp = lse.data_ptr<float>();
  const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1), ls2 = lse.stride(2);
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv_t.data_ptr<T>();
  const int64_t Nk = sh.Nk, nh = sh.nh, dqk = sh.dqk, dv = sh.dv;
  const int64_t ldq = pad_lanes(dqk), ldv = pad_lanes(dv), ldkt = pad_lanes(Nk);
  const bool short_keys = Nk <= kShortKeys;
  // At least as many queries per chunk as keys: the partials never outgrow the inputs. The
  // transposed tiles of the short-key path are [Nk][chunk]: a shorter chunk keeps them in L2.
  const int64_t chunk = short_keys ? kFwdChunk : std::max(kBwdChunk, round_up(Nk, attn::kLanes));
  int64_t pieces = 0;
  const std::vector<attn::Task> tasks = make_tasks(sh, chunk, pieces);
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  const int64_t slot = Nk * (dqk + dv);  // one chunk's dk rows, then its dv rows, compact
  std::vector<float> partials(ntasks * slot);
  const int64_t maxlen = ceil_div(sh.Nq, pieces);
  const View4<T>* const chunk_ins[3] = {&qv, &gv, &ov};
  const int64_t chunk_w[3] = {dqk, dv, dv};
  struct State {
    Buffer kb, ktb, vtb, qb, dob, oub, lb, drb, dqb, dkb, dvb, kssb, vrb, qtb, dotb, stb, dpb;
    attn::Scratch ws;
    float *ks, *kts, *vts, *kss, *vrs, *qts, *dots, *sts, *dps, *qs, *dos, *os, *ls, *drow, *dqs, *dks, *dvs;
    int64_t cb = -1, ch = -1;
    State(bool short_keys, int64_t Nk, int64_t dqk, int64_t dv, int64_t ldq, int64_t ldv, int64_t ldkt,
          int64_t maxlen) {
      // Padding lanes and columns must be zero and are never written: zero every buffer once.
      ks = kb.zeros(Nk * ldq);
      kts = short_keys ? nullptr : ktb.zeros(dqk * ldkt);
      vts = short_keys ? nullptr : vtb.zeros(dv * ldkt);
      // Short keys: scaled K rows and V rows (the A operands of S^T and dP^T), the chunk's Q^T and
      // dO^T, and the transposed tiles P^T and dP^T / dS^T.
      const int64_t ldcmax = pad_lanes(maxlen);
      kss = short_keys ? kssb.grow(Nk * dqk) : nullptr;
      vrs = short_keys ? vrb.grow(Nk * dv) : nullptr;
      qts = short_keys ? qtb.zeros(dqk * ldcmax) : nullptr;
      dots = short_keys ? dotb.zeros(dv * ldcmax) : nullptr;
      sts = short_keys ? stb.grow(Nk * ldcmax) : nullptr;
      dps = short_keys ? dpb.grow(Nk * ldcmax) : nullptr;
      qs = qb.zeros(maxlen * ldq);
      dos = dob.zeros(maxlen * ldv);
      os = oub.zeros(maxlen * ldv);
      ls = lb.grow(ldcmax);
      drow = drb.grow(ldcmax);
      dqs = dqb.grow(maxlen * ldq);
      dks = dkb.grow(Nk * ldq);
      dvs = dvb.grow(Nk * ldv);
    }
  };
  attn::run_tasks(
      ntasks, 1, [&] { return State(short_keys, Nk, dqk, dv, ldq, ldv, ldkt, maxlen); },
      [&](State& st, attn::PrefetchQueue& pq, int64_t ti, int64_t next) {
        const attn::Task& t = tasks[ti];
        const int64_t len = t.end - t.begin;
        if (next >= 0) queue_next(pq, sh, t, tasks[next], kv, vv, chunk_ins, chunk_w);
        // The core steps the queue once per query row; the transposed path once per key row of its
        // column passes (a burst of the whole next chunk at once would stall on the miss buffers).
        pq.plan(short_keys ? 2 * Nk : len);
        if (t.p != st.cb || t.h != st.ch) {
          st.cb = t.p;
          st.ch = t.h;
          auto rows = [&](const View4<T>& vw) {
            return [&, vw](int64_t i) -> const T* { return vw.row(t.p, i, t.h); };
          };
          attn::pack_rows<T>(Nk, dqk, kv.sd(), rows(kv), 1.f, st.ks, ldq);
          if (short_keys) {
            attn::pack_rows<T>(Nk, dqk, kv.sd(), rows(kv), scale, st.kss, dqk);
            attn::pack_rows<T>(Nk, dv, vv.sd(), rows(vv), 1.f, st.vrs, dv);
          } else {
            attn::pack_cols<T>(Nk, dqk, kv.sd(), rows(kv), st.kts, ldkt);
            attn::pack_cols<T>(Nk, dv, vv.sd(), rows(vv), st.vts, ldkt);
          }
        }
        auto chunk_rows = [&](const View4<T>& vw) {
          return [&, vw](int64_t i) -> const T* { return vw.row(t.p, t.begin + i, t.h); };
        };
        // The short-key path scales K instead of Q (dq and dk take the scale when stored).
        attn::pack_rows<T>(len, dqk, qv.sd(), chunk_rows(qv), short_keys ? 1.f : scale, st.qs, ldq);
        attn::pack_rows<T>(len, dv, gv.sd(), chunk_rows(gv), 1.f, st.dos, ldv);
        attn::pack_rows<T>(len, dv, ov.sd(), chunk_rows(ov), 1.f, st.os, ldv);
        for (int64_t i = 0; i < len; ++i) {
          st.ls[i] = lp[t.p * ls0 + (t.begin + i) * ls1 + t.h * ls2];
          st.drow[i] = attn::simd::row_dot(st.dos + i * ldv, st.os + i * ldv, dv);
        }
        float dk_mult = 1.f;
        if (short_keys) {
          // Transposed: queries along the lanes, every product a core micro-kernel, no lane spent on
          // padding the key count, and the softmax gradient lane-wise down the key rows.
          const int64_t ldc = pad_lanes(len);
          attn::pack_cols<T>(len, dqk, qv.sd(), chunk_rows(qv), st.qts, ldc);
          attn::pack_cols<T>(len, dv, gv.sd(), chunk_rows(gv), st.dots, ldc);
          for (int64_t i = len; i < ldc; ++i) {
            st.ls[i] = attn::kPosInf;  // P = 0 in the padding columns
            st.drow[i] = 0.f;
          }
          attn::gemm<false, false>(Nk, ldc, dqk, st.kss, dqk, st.qts, ldc, st.sts, ldc);    // S^T
          column_probs(st.sts, Nk, ldc, ldc, st.ls, pq);                                     // P^T
          attn::gemm<false, false>(Nk, ldc, dv, st.vrs, dv, st.dots, ldc, st.dps, ldc);     // dP^T = V dO^T
          attn::gemm<false, false>(Nk, ldv, len, st.sts, ldc, st.dos, ldv, st.dvs, ldv);    // dV = P^T dO
          column_ds(st.sts, st.dps, Nk, ldc, ldc, st.drow, pq);                              // dS^T
          attn::gemm<false, false>(Nk, ldq, len, st.dps, ldc, st.qs, ldq, st.dks, ldq);     // dK = dS^T Q
          attn::gemm<false, true>(len, ldq, Nk, st.dps, ldc, st.ks, ldq, st.dqs, ldq);      // dQ = dS K
          dk_mult = scale;
        } else {
          std::fill(st.dqs, st.dqs + len * ldq, 0.f);
          std::fill(st.dks, st.dks + Nk * ldq, 0.f);
          std::fill(st.dvs, st.dvs + Nk * ldv, 0.f);
          attn::BwdProblem p{.M = len, .N = Nk, .dqk = dqk, .dv = dv, .q = st.qs, .k = st.ks, .ldq = ldq,
                             .kt = st.kts, .vt = st.vts, .ldkt = ldkt, .dout = st.dos, .ldv = ldv, .lse = st.ls,
                             .drow = st.drow, .dq = st.dqs, .dk = st.dks, .dvv = st.dvs, .prefetch = &pq};
          attn::NoModifier mod;
          attn::attention_backward(p, mod, st.ws, Range{0, len}, Range{0, Nk}, attn::kAll);
        }
        pq.drain();

        store_rows(dqp, sh.Nq, nh, t.p, t.h, Range{t.begin, t.end}, st.dqs, ldq, dqk, scale);
        float* part = partials.data() + ti * slot;
        for (int64_t r = 0; r < Nk; ++r) {
          for (int64_t e = 0; e < dqk; ++e) part[r * dqk + e] = st.dks[r * ldq + e] * dk_mult;
          std::copy(st.dvs + r * ldv, st.dvs + r * ldv + dv, part + Nk * dqk + r * dv);
        }
      });

  // dk, dv: each problem's chunk partials summed in chunk order.
  const int64_t problems = sh.B * nh;
  at::parallel_for(0, problems, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> acc(slot);
    for (int64_t pr = p0; pr < p1; ++pr) {
      const float* first = partials.data() + pr * pieces * slot;
      std::copy(first, first + slot, acc.begin());
      for (int64_t c = 1; c < pieces; ++c) {
        const float* part = first + c * slot;
        for (int64_t i = 0; i < slot; ++i) acc[i] += part[i];
      }
      const int64_t b = pr / nh, h = pr % nh;
      store_rows(dkp, Nk, nh, b, h, Range{0, Nk}, acc.data(), dqk, dqk, 1.f);
      store_rows(dvp, Nk, nh, b, h, Range{0, Nk}, acc.data() + Nk * dqk, dv, dv, 1.f);
    }
    attn::simd::stream_fence();
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> reduced_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, double scale) {
  check_args(q, k, v);
  at::Tensor out = attn::empty_out(q, v);
  at::Tensor lse = attn::empty_lse(q);
  if (out.numel() == 0) return {out, lse};
  const Shape sh = shape_of(q, k, v);
  attn::dispatch_float(q, "reduced_attention_fwd", [&](auto t) {
    reduced_fwd_impl<typename decltype(t)::type>(sh, q, k, v, static_cast<float>(scale), out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reduced_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                                     const at::Tensor& k, const at::Tensor& v,
                                                                     const at::Tensor& out, const at::Tensor& lse,
                                                                     double scale) {
  check_args(q, k, v);
  const std::vector<int64_t> oshape = attn::out_shape(q, v);
  check_like(grad_out, "grad_out", q, oshape);
  check_like(out, "out", q, oshape);
  check_lse_like(lse, q, q.sizes().slice(0, 3));
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), q.options());
  at::Tensor dv = at::empty(v.sizes(), q.options());
  const Shape sh = shape_of(q, k, v);
  if (sh.B == 0 || sh.nh == 0) return {dq, dk, dv};
  if (sh.Nq == 0) {
    // No query: nothing flows back to the keys and values.
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  attn::dispatch_float(q, "reduced_attention_bwd", [&](auto t) {
    reduced_bwd_impl<typename decltype(t)::type>(sh, grad_out, q, k, v, out, lse, static_cast<float>(scale), dq, dk,
                                                 dv);
  });
  return {dq, dk, dv};
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "reduced_attention_fwd", vitk::Backend::kCpu, &vitk::cpu::reduced_attention_fwd);
  VITK_IMPL(m, "reduced_attention_bwd", vitk::Backend::kCpu, &vitk::cpu::reduced_attention_bwd);
}
