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
#include "vitk/reduced_attention.h"

#include <ATen/Dispatch.h>
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

#include "vitk/attention_core.h"
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

// Element strides of a [B, N, heads, d] tensor.
template <typename T>
struct View4 {
  const T* base = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
  explicit View4(const at::Tensor& t) : base(t.data_ptr<T>()) {
    for (int i = 0; i < 4; ++i) s[i] = t.stride(i);
  }
  const T* row(int64_t b, int64_t t, int64_t h) const { return base + b * s[0] + t * s[1] + h * s[2]; }
  void queue(attn::PrefetchQueue& pq, int64_t b, int64_t t0, int64_t n, int64_t h, int64_t d) const {
    for (int64_t t = t0; t < t0 + n; ++t) {
      if (s[3] == 1) {
        pq.add(row(b, t, h), d * static_cast<int64_t>(sizeof(T)));
      } else {
        for (int64_t e = 0; e < d; ++e) pq.add(row(b, t, h) + e * s[3], sizeof(T));
      }
    }
  }
};

struct Shape {
  int64_t B = 0, Nq = 0, Nk = 0, nh = 0, dqk = 0, dv = 0;
};

Shape shape_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return Shape{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3), v.size(3)};
}

struct Task {
  int64_t b, h, begin, end;
};

// Problem-major tasks: every problem's queries cut into the same nearly equal chunks of at most
// `chunk` rows, so task index = problem * pieces + piece.
std::vector<Task> make_tasks(const Shape& sh, int64_t chunk, int64_t& pieces) {
  pieces = ceil_div(sh.Nq, chunk);
  std::vector<Task> tasks;
  tasks.reserve(sh.B * sh.nh * pieces);
  for (int64_t b = 0; b < sh.B; ++b)
    for (int64_t h = 0; h < sh.nh; ++h)
      for (int64_t p = 0; p < pieces; ++p) {
        const Range r = split_range(sh.Nq, pieces, p);
        tasks.push_back(Task{b, h, r.begin, r.end});
      }
  return tasks;
}

// Rows [r) of a contiguous [B, N, heads, d] output, from packed rows starting at local row 0.
template <typename T>
void store_rows(T* dst, int64_t N, int64_t nh, int64_t b, int64_t h, Range r, const float* src, int64_t ld,
                int64_t d, float mult, const float* row_mult = nullptr) {
  for (int64_t i = r.begin; i < r.end; ++i) {
    T* o = dst + ((b * N + i) * nh + h) * d;
    const float* sr = src + (i - r.begin) * ld;
    const float m = row_mult != nullptr ? mult * row_mult[i - r.begin] : mult;
    if constexpr (std::is_same_v<T, float>) {
      attn::simd::stream_row(o, sr, d, m);
    } else {
      for (int64_t e = 0; e < d; ++e) o[e] = static_cast<T>(sr[e] * m);
    }
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
  const std::vector<Task> tasks = make_tasks(sh, kFwdChunk, pieces);
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  const bool short_keys = Nk <= kShortKeys;
  attn::run_workers(ntasks, [&](attn::TaskSource& source) {
    Buffer qb, ktb, vb, ob, lb, ksb, stb, cmb, clb;
    attn::Scratch ws;
    attn::PrefetchQueue pq;
    // Queries as rows [len][dqk], or transposed [dqk][pad(len)] for the short-key path; its
    // padding columns only feed score columns that are never stored.
    float* qs = qb.zeros(kFwdChunk * dqk);
    float* kss = short_keys ? ksb.grow(Nk * dqk) : nullptr;
    float* sts = short_keys ? stb.grow(Nk * kFwdChunk) : nullptr;
    float* colm = short_keys ? cmb.grow(kFwdChunk) : nullptr;
    float* coll = short_keys ? clb.grow(kFwdChunk) : nullptr;
    // Padding columns of kt and lanes of v are never written by the packing: zero them once.
    float* kts = short_keys ? nullptr : ktb.zeros(dqk * ldkt);
    float* vs = vb.zeros(Nk * ldv);
    float* os = ob.grow(kFwdChunk * ldv);
    float* ls = lb.grow(kFwdChunk);
    int64_t cb = -1, ch = -1;
    Range batch;
    while (source.next(batch)) {
      for (int64_t ti = batch.begin; ti < batch.end; ++ti) {
        const Task& t = tasks[ti];
        const int64_t len = t.end - t.begin;
        pq.clear();
        if (ti + 1 < batch.end) {
          const Task& nt = tasks[ti + 1];
          if (nt.b != t.b || nt.h != t.h) {
            kv.queue(pq, nt.b, 0, Nk, nt.h, dqk);
            vv.queue(pq, nt.b, 0, Nk, nt.h, dv);
          }
          qv.queue(pq, nt.b, nt.begin, nt.end - nt.begin, nt.h, dqk);
        }
        // The core steps the queue once per query row; the transposed path once per key row of its
        // column passes (a burst of the whole next chunk at once would stall on the miss buffers).
        pq.plan(short_keys ? Nk : len);
        if (t.b != cb || t.h != ch) {
          cb = t.b;
          ch = t.h;
          auto rows = [&](const View4<T>& vw) {
            return [&, vw](int64_t i) -> const T* { return vw.row(t.b, i, t.h); };
          };
          if (short_keys)
            attn::pack_rows<T>(Nk, dqk, kv.s[3], rows(kv), scale, kss, dqk);
          else
            attn::pack_cols<T>(Nk, dqk, kv.s[3], rows(kv), kts, ldkt);
          attn::pack_rows<T>(Nk, dv, vv.s[3], rows(vv), 1.f, vs, ldv);
        }
        auto chunk_row = [&](int64_t i) -> const T* { return qv.row(t.b, t.begin + i, t.h); };
        if (short_keys) {
          const int64_t ldc = pad_lanes(len);
          attn::pack_cols<T>(len, dqk, qv.s[3], chunk_row, qs, ldc);
          attn::gemm<false, false>(Nk, ldc, dqk, kss, dqk, qs, ldc, sts, ldc);
          column_softmax(sts, Nk, ldc, ldc, len, ls, colm, coll, pq);  // coll: 1 / sum
          attn::gemm<false, true>(len, ldv, Nk, sts, ldc, vs, ldv, os, ldv);
          pq.drain();
          store_rows(op, sh.Nq, nh, t.b, t.h, Range{t.begin, t.end}, os, ldv, dv, 1.f, coll);
          for (int64_t i = 0; i < len; ++i) lp[(t.b * sh.Nq + t.begin + i) * nh + t.h] = ls[i];
          continue;
        }
        attn::pack_rows<T>(len, dqk, qv.s[3], chunk_row, scale, qs, ldq);
        attn::FwdProblem p{.M = len, .N = Nk, .dqk = dqk, .dv = dv, .q = qs, .ldq = ldq, .kt = kts, .ldkt = ldkt,
                           .v = vs, .ldv = ldv, .o = os, .ldo = ldv, .lse = ls, .prefetch = &pq};
        attn::NoModifier mod;
        attn::attention_forward(p, mod, ws, Range{0, len});
        pq.drain();
        store_rows(op, sh.Nq, nh, t.b, t.h, Range{t.begin, t.end}, os, ldv, dv, 1.f);
        for (int64_t i = 0; i < len; ++i) lp[(t.b * sh.Nq + t.begin + i) * nh + t.h] = ls[i];
      }
    }
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
  const std::vector<Task> tasks = make_tasks(sh, chunk, pieces);
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  const int64_t slot = Nk * (dqk + dv);  // one chunk's dk rows, then its dv rows, compact
  std::vector<float> partials(ntasks * slot);
  const int64_t maxlen = ceil_div(sh.Nq, pieces);
  attn::run_workers(ntasks, [&](attn::TaskSource& source) {
    Buffer kb, ktb, vtb, qb, dob, oub, lb, drb, dqb, dkb, dvb, kssb, vrb, qtb, dotb, stb, dpb;
    attn::Scratch ws;
    attn::PrefetchQueue pq;
    // Padding lanes and columns must be zero and are never written: zero every buffer once.
    float* ks = kb.zeros(Nk * ldq);
    float* kts = short_keys ? nullptr : ktb.zeros(dqk * ldkt);
    float* vts = short_keys ? nullptr : vtb.zeros(dv * ldkt);
    // Short keys: scaled K rows and V rows (the A operands of S^T and dP^T), the chunk's Q^T and
    // dO^T, and the transposed tiles P^T and dP^T / dS^T.
    const int64_t ldcmax = pad_lanes(maxlen);
    float* kss = short_keys ? kssb.grow(Nk * dqk) : nullptr;
    float* vrs = short_keys ? vrb.grow(Nk * dv) : nullptr;
    float* qts = short_keys ? qtb.zeros(dqk * ldcmax) : nullptr;
    float* dots = short_keys ? dotb.zeros(dv * ldcmax) : nullptr;
    float* sts = short_keys ? stb.grow(Nk * ldcmax) : nullptr;
    float* dps = short_keys ? dpb.grow(Nk * ldcmax) : nullptr;
    float* qs = qb.zeros(maxlen * ldq);
    float* dos = dob.zeros(maxlen * ldv);
    float* os = oub.zeros(maxlen * ldv);
    float* ls = lb.grow(ldcmax);
    float* drow = drb.grow(ldcmax);
    float* dqs = dqb.grow(maxlen * ldq);
    float* dks = dkb.grow(Nk * ldq);
    float* dvs = dvb.grow(Nk * ldv);
    int64_t cb = -1, ch = -1;
    Range batch;
    while (source.next(batch)) {
      for (int64_t ti = batch.begin; ti < batch.end; ++ti) {
        const Task& t = tasks[ti];
        const int64_t len = t.end - t.begin;
        pq.clear();
        if (ti + 1 < batch.end) {
          const Task& nt = tasks[ti + 1];
          if (nt.b != t.b || nt.h != t.h) {
            kv.queue(pq, nt.b, 0, Nk, nt.h, dqk);
            vv.queue(pq, nt.b, 0, Nk, nt.h, dv);
          }
          const int64_t nl = nt.end - nt.begin;
          qv.queue(pq, nt.b, nt.begin, nl, nt.h, dqk);
          gv.queue(pq, nt.b, nt.begin, nl, nt.h, dv);
          ov.queue(pq, nt.b, nt.begin, nl, nt.h, dv);
        }
        // The core steps the queue once per query row; the transposed path once per key row of its
        // column passes (a burst of the whole next chunk at once would stall on the miss buffers).
        pq.plan(short_keys ? 2 * Nk : len);
        if (t.b != cb || t.h != ch) {
          cb = t.b;
          ch = t.h;
          auto rows = [&](const View4<T>& vw) {
            return [&, vw](int64_t i) -> const T* { return vw.row(t.b, i, t.h); };
          };
          attn::pack_rows<T>(Nk, dqk, kv.s[3], rows(kv), 1.f, ks, ldq);
          if (short_keys) {
            attn::pack_rows<T>(Nk, dqk, kv.s[3], rows(kv), scale, kss, dqk);
            attn::pack_rows<T>(Nk, dv, vv.s[3], rows(vv), 1.f, vrs, dv);
          } else {
            attn::pack_cols<T>(Nk, dqk, kv.s[3], rows(kv), kts, ldkt);
            attn::pack_cols<T>(Nk, dv, vv.s[3], rows(vv), vts, ldkt);
          }
        }
        auto chunk_rows = [&](const View4<T>& vw) {
          return [&, vw](int64_t i) -> const T* { return vw.row(t.b, t.begin + i, t.h); };
        };
        // The short-key path scales K instead of Q (dq and dk take the scale when stored).
        attn::pack_rows<T>(len, dqk, qv.s[3], chunk_rows(qv), short_keys ? 1.f : scale, qs, ldq);
        attn::pack_rows<T>(len, dv, gv.s[3], chunk_rows(gv), 1.f, dos, ldv);
        attn::pack_rows<T>(len, dv, ov.s[3], chunk_rows(ov), 1.f, os, ldv);
        for (int64_t i = 0; i < len; ++i) {
          ls[i] = lp[t.b * ls0 + (t.begin + i) * ls1 + t.h * ls2];
          drow[i] = attn::simd::row_dot(dos + i * ldv, os + i * ldv, dv);
        }
        float dk_mult = 1.f;
        if (short_keys) {
          // Transposed: queries along the lanes, every product a core micro-kernel, no lane spent on
          // padding the key count, and the softmax gradient lane-wise down the key rows.
          const int64_t ldc = pad_lanes(len);
          attn::pack_cols<T>(len, dqk, qv.s[3], chunk_rows(qv), qts, ldc);
          attn::pack_cols<T>(len, dv, gv.s[3], chunk_rows(gv), dots, ldc);
          for (int64_t i = len; i < ldc; ++i) {
            ls[i] = attn::kPosInf;  // P = 0 in the padding columns
            drow[i] = 0.f;
          }
          attn::gemm<false, false>(Nk, ldc, dqk, kss, dqk, qts, ldc, sts, ldc);         // S^T
          column_probs(sts, Nk, ldc, ldc, ls, pq);                                        // P^T
          attn::gemm<false, false>(Nk, ldc, dv, vrs, dv, dots, ldc, dps, ldc);          // dP^T = V dO^T
          attn::gemm<false, false>(Nk, ldv, len, sts, ldc, dos, ldv, dvs, ldv);         // dV = P^T dO
          column_ds(sts, dps, Nk, ldc, ldc, drow, pq);                                    // dS^T
          attn::gemm<false, false>(Nk, ldq, len, dps, ldc, qs, ldq, dks, ldq);          // dK = dS^T Q
          attn::gemm<false, true>(len, ldq, Nk, dps, ldc, ks, ldq, dqs, ldq);           // dQ = dS K
          dk_mult = scale;
          pq.drain();
        } else {
          std::fill(dqs, dqs + len * ldq, 0.f);
          std::fill(dks, dks + Nk * ldq, 0.f);
          std::fill(dvs, dvs + Nk * ldv, 0.f);

          attn::BwdProblem p{.M = len, .N = Nk, .dqk = dqk, .dv = dv, .q = qs, .k = ks, .ldq = ldq, .kt = kts,
                             .vt = vts, .ldkt = ldkt, .dout = dos, .ldv = ldv, .lse = ls, .drow = drow, .dq = dqs,
                             .dk = dks, .dvv = dvs, .prefetch = &pq};
          attn::NoModifier mod;
          attn::attention_backward(p, mod, ws, Range{0, len}, Range{0, Nk}, attn::kAll);
          pq.drain();
        }

        store_rows(dqp, sh.Nq, nh, t.b, t.h, Range{t.begin, t.end}, dqs, ldq, dqk, scale);
        float* part = partials.data() + ti * slot;
        for (int64_t r = 0; r < Nk; ++r) {
          for (int64_t e = 0; e < dqk; ++e) part[r * dqk + e] = dks[r * ldq + e] * dk_mult;
          std::copy(dvs + r * ldv, dvs + r * ldv + dv, part + Nk * dqk + r * dv);
        }
      }
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
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty(q.sizes().slice(0, 3), q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const Shape sh = shape_of(q, k, v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "reduced_attention_fwd", [&] {
    reduced_fwd_impl<scalar_t>(sh, q, k, v, static_cast<float>(scale), out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> reduced_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                                     const at::Tensor& k, const at::Tensor& v,
                                                                     const at::Tensor& out, const at::Tensor& lse,
                                                                     double scale) {
  check_args(q, k, v);
  const std::vector<int64_t> oshape{q.size(0), q.size(1), q.size(2), v.size(3)};
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "reduced_attention_bwd", [&] {
    reduced_bwd_impl<scalar_t>(sh, grad_out, q, k, v, out, lse, static_cast<float>(scale), dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "reduced_attention_fwd", vitk::Backend::kCpu, &vitk::cpu::reduced_attention_fwd);
  VITK_IMPL(m, "reduced_attention_bwd", vitk::Backend::kCpu, &vitk::cpu::reduced_attention_bwd);
}
