// CPU kernels of packed varlen attention (block-diagonal attention over segments, as in the
// Qwen2.5-VL vision encoder): forward and backward on the attention core, with no modifier.
//
// A problem is one (segment, head). Its queries are cut into chunks of at most kQueryChunk rows,
// one task each, so a single long segment still spreads over every thread; a thread packs a
// problem's keys and values (and queries) once and keeps them while its consecutive tasks belong to
// the same problem. Keys longer than one core tile are handled by the core's online softmax.
//
// Backward: a problem is normally one task (dq, dk and dv accumulated together, each key tile
// streaming every query block). When there are few, long problems -- a rule on shapes only, so the
// result never depends on the thread count -- it runs in two passes instead: key chunks accumulate
// dk and dv, then query chunks accumulate dq, each pass recomputing the probabilities. That costs
// two extra tile products but lets threads split one problem with no shared accumulator.
#include "vitk/window_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vitk/attention_core.h"
#include "vitk/checks.h"
#include "vitk/tiling.h"
#include "vitk/registration.h"

namespace vitk {
namespace cpu {
namespace {

using attn::Buffer;
using attn::kNegInf;
using attn::pad_lanes;

constexpr int64_t kQueryChunk = 256;
constexpr int64_t kTwoPassMinLen = 512;
constexpr int64_t kTwoPassMaxProblems = 16;

struct Task {
  int64_t seg, h, begin, end;
};

// Element strides of a [total, heads, d] tensor.
template <typename T>
struct View3 {
  const T* base = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
  explicit View3(const at::Tensor& t) : base(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  const T* row(int64_t t, int64_t h) const { return base + t * s0 + h * s1; }
  // Queues the cache lines of head h of rows [t0, t0 + n).
  void queue(attn::PrefetchQueue& pq, int64_t t0, int64_t n, int64_t h, int64_t d) const {
    for (int64_t t = t0; t < t0 + n; ++t) {
      if (s2 == 1) {
        pq.add(row(t, h), d * static_cast<int64_t>(sizeof(T)));
      } else {
        for (int64_t e = 0; e < d; ++e) pq.add(row(t, h) + e * s2, sizeof(T));
      }
    }
  }
};

// Queues the rows of head h of rows [t0, t0 + n) of a contiguous [total, heads, d] output.
template <typename T>
void queue_out(attn::PrefetchQueue& pq, T* base, int64_t nh, int64_t d, int64_t t0, int64_t n, int64_t h) {
  for (int64_t t = t0; t < t0 + n; ++t)
    pq.add(base + (t * nh + h) * d, d * static_cast<int64_t>(sizeof(T)));
}

void check_varlen_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu,
                       int64_t max_seqlen) {
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}}) {
    check_dtype_in(t, name, {at::kFloat, at::kHalf, at::kBFloat16});
    check_device_type(t, name, c10::DeviceType::CPU);
    check_dim_in(t, name, 3, 3);
  }
  check_same_dtype(q, "q", k, "k");
  check_same_dtype(q, "q", v, "v");
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "k: expected the shape of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.size(0) == q.size(0) && v.size(1) == q.size(1), "v: expected shape ", q.sizes().slice(0, 2),
                    " + [head_dim_v], got ", v.sizes());
  check_nonempty_dim(q, "q", 2, "head_dim");
  check_nonempty_dim(v, "v", 2, "head_dim");
  check_dtype_in(cu, "cu_seqlens", {at::kInt});
  check_device_type(cu, "cu_seqlens", c10::DeviceType::CPU);
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, "cu_seqlens: expected a 1-D tensor [segments + 1], got shape ",
                    cu.sizes());
  TORCH_CHECK_VALUE(max_seqlen >= 0, "max_seqlen: expected a non-negative integer, got ", max_seqlen);
}

// Reads and validates the segment offsets.
std::vector<int64_t> read_offsets(const at::Tensor& cu, int64_t total, int64_t max_seqlen) {
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.size(0), st = cu.stride(0);
  std::vector<int64_t> off(n);
  for (int64_t i = 0; i < n; ++i) off[i] = c[i * st];
  TORCH_CHECK_VALUE(off[0] == 0 && off[n - 1] == total, "cu_seqlens: expected to start at 0 and end at total=", total,
                    ", got ", off[0], "..", off[n - 1]);
  for (int64_t i = 0; i + 1 < n; ++i) {
    const int64_t len = off[i + 1] - off[i];
    TORCH_CHECK_VALUE(len >= 0, "cu_seqlens: expected non-decreasing offsets, got cu_seqlens[", i, "]=", off[i],
                      " > cu_seqlens[", i + 1, "]=", off[i + 1]);
    TORCH_CHECK_VALUE(len <= max_seqlen, "max_seqlen: expected at least the longest segment (", len,
                      " tokens, segment ", i, "), got ", max_seqlen);
  }
  return off;
}

// Nearly equal chunks of at most `chunk` rows, each starting on a multiple of `align`.
void add_chunks(std::vector<Task>& tasks, int64_t seg, int64_t h, int64_t len, int64_t chunk, int64_t align) {
  const int64_t pieces = ceil_div(len, chunk);
  for (int64_t p = 0; p < pieces; ++p) {
    const Range r = split_range(len, pieces, p, align);
    if (r.size() > 0) tasks.push_back(Task{seg, h, r.begin, r.end});
  }
}

// ------------------------------------------------------------------------------ forward

template <typename T>
void varlen_fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<int64_t>& off,
                     float scale, at::Tensor& out, at::Tensor& lse) {
  const View3<T> qv(q), kv(k), vv(v);
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const int64_t nh = q.size(1), dqk = q.size(2), dv = v.size(2);
  const int64_t ldq = dqk, ldv = pad_lanes(dv);
  std::vector<Task> tasks;
  for (int64_t s = 0; s + 1 < static_cast<int64_t>(off.size()); ++s)
    for (int64_t h = 0; h < nh; ++h) add_chunks(tasks, s, h, off[s + 1] - off[s], kQueryChunk, 1);
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  attn::run_workers(ntasks, [&](attn::TaskSource& source) {
    Buffer qb, ktb, vb, ob, lb;
    attn::Scratch ws;
    attn::PrefetchQueue pq;
    int64_t cur_seg = -1, cur_h = -1, L = 0, ldkt = 0;
    Range batch;
    while (source.next(batch)) {
      const int64_t begin = batch.begin, end = batch.end;
      for (int64_t ti = begin; ti < end; ++ti) {
        const Task& t = tasks[ti];
        const int64_t t0 = off[t.seg];
        pq.clear();
        if (ti + 1 < end) {
          const Task& nt = tasks[ti + 1];
          const int64_t n0 = off[nt.seg], nl = off[nt.seg + 1] - n0;
          if (nt.seg != t.seg || nt.h != t.h) {
            qv.queue(pq, n0, nl, nt.h, dqk);
            kv.queue(pq, n0, nl, nt.h, dqk);
            vv.queue(pq, n0, nl, nt.h, dv);
          }
          queue_out(pq, op, nh, dv, n0 + nt.begin, nt.end - nt.begin, nt.h);
        }
        pq.plan(t.end - t.begin);
        if (t.seg != cur_seg || t.h != cur_h) {
          cur_seg = t.seg;
          cur_h = t.h;
          L = off[t.seg + 1] - t0;
          ldkt = pad_lanes(L);
          auto rows = [&](const View3<T>& vw) {
            return [&, vw](int64_t i) -> const T* { return vw.row(t0 + i, t.h); };
          };
          attn::pack_rows<T>(L, dqk, qv.s2, rows(qv), scale, qb.grow(L * ldq), ldq);
          // Padding columns of kt and lanes of v must be zero: zero the whole buffer.
          attn::pack_cols<T>(L, dqk, kv.s2, rows(kv), ktb.zeros(dqk * ldkt), ldkt);
          attn::pack_rows<T>(L, dv, vv.s2, rows(vv), 1.f, vb.zeros(L * ldv), ldv);
          ob.grow(L * ldv);
          lb.grow(L);
        }
        attn::FwdProblem p{.M = L, .N = L, .dqk = dqk, .dv = dv, .q = qb.data(), .ldq = ldq, .kt = ktb.data(),
                           .ldkt = ldkt, .v = vb.data(), .ldv = ldv, .o = ob.data(), .ldo = ldv, .lse = lb.data(),
                           .prefetch = &pq};
        attn::NoModifier mod;
        attn::attention_forward(p, mod, ws, Range{t.begin, t.end});
        pq.drain();
        for (int64_t i = t.begin; i < t.end; ++i) {
          const int64_t row = (t0 + i) * nh + t.h;
          T* dst = op + row * dv;
          const float* src = ob.data() + i * ldv;
          for (int64_t d = 0; d < dv; ++d) dst[d] = static_cast<T>(src[d]);
          lp[row] = lb.data()[i];
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------ backward

// One (segment, head) problem packed for the backward, with its accumulators.
struct BwdPack {
  Buffer q, k, kt, vt, dout, lse, drow, dq, dk, dv;
  int64_t seg = -1, h = -1, L = 0, ldq = 0, ldkt = 0, ldv = 0;
};

template <typename T>
void pack_problem(BwdPack& pk, int64_t seg, int64_t h, int64_t t0, int64_t L, const View3<T>& qv,
                  const View3<T>& kv, const View3<T>& vv, const View3<T>& gv, const View3<T>& ov, const float* lp,
                  int64_t ls0, int64_t ls1, int64_t dqk, int64_t dv, float scale) {
  pk.seg = seg;
  pk.h = h;
  pk.L = L;
  pk.ldq = pad_lanes(dqk);
  pk.ldkt = pad_lanes(L);
  pk.ldv = pad_lanes(dv);
  auto rows = [&](const View3<T>& vw) { return [&, vw](int64_t i) -> const T* { return vw.row(t0 + i, h); }; };
  attn::pack_rows<T>(L, dqk, qv.s2, rows(qv), scale, pk.q.zeros(L * pk.ldq), pk.ldq);
  attn::pack_rows<T>(L, dqk, kv.s2, rows(kv), 1.f, pk.k.zeros(L * pk.ldq), pk.ldq);
  attn::pack_cols<T>(L, dqk, kv.s2, rows(kv), pk.kt.zeros(dqk * pk.ldkt), pk.ldkt);
  attn::pack_cols<T>(L, dv, vv.s2, rows(vv), pk.vt.zeros(dv * pk.ldkt), pk.ldkt);
  float* dos = pk.dout.zeros(L * pk.ldv);
  attn::pack_rows<T>(L, dv, gv.s2, rows(gv), 1.f, dos, pk.ldv);
  // O goes through the dq buffer (unused until the backward starts) to get Drow by vector dots.
  float* os = pk.dq.zeros(L * pk.ldq > L * pk.ldv ? L * pk.ldq : L * pk.ldv);
  attn::pack_rows<T>(L, dv, ov.s2, rows(ov), 1.f, os, pk.ldv);
  float* ls = pk.lse.grow(L);
  float* dr = pk.drow.grow(L);
  for (int64_t i = 0; i < L; ++i) {
    ls[i] = lp[(t0 + i) * ls0 + h * ls1];
    dr[i] = attn::simd::row_dot(dos + i * pk.ldv, os + i * pk.ldv, dv);
  }
  pk.dk.grow(L * pk.ldq);
  pk.dv.grow(L * pk.ldv);
}

inline attn::BwdProblem problem_of(const BwdPack& pk, int64_t dqk, int64_t dv) {
  attn::BwdProblem p{.M = pk.L, .N = pk.L, .dqk = dqk, .dv = dv, .q = pk.q.data(), .k = pk.k.data(), .ldq = pk.ldq,
                     .kt = pk.kt.data(), .vt = pk.vt.data(), .ldkt = pk.ldkt, .dout = pk.dout.data(), .ldv = pk.ldv,
                     .lse = pk.lse.data(), .drow = pk.drow.data(), .dq = pk.dq.data(), .dk = pk.dk.data(),
                     .dvv = pk.dv.data()};
  return p;
}

template <typename T>
void store_rows(T* dst, int64_t nh, int64_t h, int64_t t0, Range r, const float* src, int64_t ld, int64_t d,
                float mult) {
  for (int64_t i = r.begin; i < r.end; ++i) {
    T* o = dst + ((t0 + i) * nh + h) * d;
    const float* s = src + i * ld;
    for (int64_t e = 0; e < d; ++e) o[e] = static_cast<T>(s[e] * mult);
  }
}

template <typename T>
void varlen_bwd_impl(const at::Tensor& go, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const std::vector<int64_t>& off, float scale,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv_t) {
  const View3<T> qv(q), kv(k), vv(v), gv(go), ov(out);
  const float* lp = lse.data_ptr<float>();
  const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1);
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv_t.data_ptr<T>();
  const int64_t nh = q.size(1), dqk = q.size(2), dv = v.size(2);
  const int64_t S = static_cast<int64_t>(off.size()) - 1;

  int64_t problems = 0, longest = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t len = off[s + 1] - off[s];
    if (len > 0) problems += nh;
    longest = std::max(longest, len);
  }
  const bool two_pass = longest >= kTwoPassMinLen && problems < kTwoPassMaxProblems;

  // Runs `tasks` with a per-thread pack cache; body(pack, task) does the work.
  auto run = [&](const std::vector<Task>& tasks, auto&& body) {
    const int64_t ntasks = static_cast<int64_t>(tasks.size());
    attn::run_workers(ntasks, [&](attn::TaskSource& source) {
      BwdPack pk;
      attn::Scratch ws;
      attn::PrefetchQueue pq;
      Range batch;
      while (source.next(batch)) {
        const int64_t begin = batch.begin, end = batch.end;
        for (int64_t ti = begin; ti < end; ++ti) {
          const Task& t = tasks[ti];
          if (t.seg != pk.seg || t.h != pk.h)
            pack_problem<T>(pk, t.seg, t.h, off[t.seg], off[t.seg + 1] - off[t.seg], qv, kv, vv, gv, ov, lp, ls0, ls1,
                            dqk, dv, scale);
          pq.clear();
          if (ti + 1 < end && (tasks[ti + 1].seg != t.seg || tasks[ti + 1].h != t.h)) {
            const Task& nt = tasks[ti + 1];
            const int64_t n0 = off[nt.seg], nl = off[nt.seg + 1] - n0;
            qv.queue(pq, n0, nl, nt.h, dqk);
            kv.queue(pq, n0, nl, nt.h, dqk);
            vv.queue(pq, n0, nl, nt.h, dv);
            gv.queue(pq, n0, nl, nt.h, dv);
            ov.queue(pq, n0, nl, nt.h, dv);
          }
          pq.plan(t.end - t.begin);
          body(pk, ws, t, pq);
          pq.drain();
        }
      }
    });
  };

  if (!two_pass) {
    std::vector<Task> tasks;
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < nh; ++h)
        if (off[s + 1] > off[s]) tasks.push_back(Task{s, h, 0, off[s + 1] - off[s]});
    run(tasks, [&](BwdPack& pk, attn::Scratch& ws, const Task& t, attn::PrefetchQueue& pq) {
      const int64_t L = pk.L;
      std::fill(pk.dq.data(), pk.dq.data() + L * pk.ldq, 0.f);
      std::fill(pk.dk.data(), pk.dk.data() + L * pk.ldq, 0.f);
      std::fill(pk.dv.data(), pk.dv.data() + L * pk.ldv, 0.f);
      attn::BwdProblem p = problem_of(pk, dqk, dv);
      p.prefetch = &pq;
      attn::NoModifier mod;
      attn::attention_backward(p, mod, ws, Range{0, L}, Range{0, L}, attn::kAll);
      const int64_t t0 = off[t.seg];
      store_rows(dqp, nh, t.h, t0, Range{0, L}, pk.dq.data(), pk.ldq, dqk, scale);
      store_rows(dkp, nh, t.h, t0, Range{0, L}, pk.dk.data(), pk.ldq, dqk, 1.f);
      store_rows(dvp, nh, t.h, t0, Range{0, L}, pk.dv.data(), pk.ldv, dv, 1.f);
    });
    return;
  }

  // Pass A: key chunks (aligned to the core's key tiles) -> dk, dv. Pass B: query chunks -> dq.
  std::vector<Task> key_tasks, query_tasks;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t len = off[s + 1] - off[s];
    if (len == 0) continue;
    for (int64_t h = 0; h < nh; ++h) {
      add_chunks(key_tasks, s, h, len, kQueryChunk, attn::key_tile(len));
      add_chunks(query_tasks, s, h, len, kQueryChunk, 1);
    }
  }
  run(key_tasks, [&](BwdPack& pk, attn::Scratch& ws, const Task& t, attn::PrefetchQueue& pq) {
    const Range kr{t.begin, t.end};
    std::fill(pk.dk.data() + kr.begin * pk.ldq, pk.dk.data() + kr.end * pk.ldq, 0.f);
    std::fill(pk.dv.data() + kr.begin * pk.ldv, pk.dv.data() + kr.end * pk.ldv, 0.f);
    attn::BwdProblem p = problem_of(pk, dqk, dv);
    p.prefetch = &pq;
    attn::NoModifier mod;
    attn::attention_backward(p, mod, ws, Range{0, pk.L}, kr, attn::kKeyValue | attn::kParams);
    const int64_t t0 = off[t.seg];
    store_rows(dkp, nh, t.h, t0, kr, pk.dk.data(), pk.ldq, dqk, 1.f);
    store_rows(dvp, nh, t.h, t0, kr, pk.dv.data(), pk.ldv, dv, 1.f);
  });
  run(query_tasks, [&](BwdPack& pk, attn::Scratch& ws, const Task& t, attn::PrefetchQueue& pq) {
    const Range qr{t.begin, t.end};
    std::fill(pk.dq.data() + qr.begin * pk.ldq, pk.dq.data() + qr.end * pk.ldq, 0.f);
    attn::BwdProblem p = problem_of(pk, dqk, dv);
    p.prefetch = &pq;
    attn::NoModifier mod;
    attn::attention_backward(p, mod, ws, qr, Range{0, pk.L}, attn::kQuery);
    store_rows(dqp, nh, t.h, off[t.seg], qr, pk.dq.data(), pk.ldq, dqk, scale);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                                        double scale) {
  check_varlen_args(q, k, v, cu_seqlens, max_seqlen);
  const std::vector<int64_t> off = read_offsets(cu_seqlens, q.size(0), max_seqlen);
  at::Tensor out = at::empty({q.size(0), q.size(1), v.size(2)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_fwd", [&] {
    varlen_fwd_impl<scalar_t>(q, k, v, off, static_cast<float>(scale), out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                                    const at::Tensor& k, const at::Tensor& v,
                                                                    const at::Tensor& out, const at::Tensor& lse,
                                                                    const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                                                    double scale) {
  check_varlen_args(q, k, v, cu_seqlens, max_seqlen);
  const std::vector<int64_t> oshape{q.size(0), q.size(1), v.size(2)};
  check_like(grad_out, "grad_out", q, oshape);
  check_like(out, "out", q, oshape);
  check_lse_like(lse, q, q.sizes().slice(0, 2));
  const std::vector<int64_t> off = read_offsets(cu_seqlens, q.size(0), max_seqlen);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), q.options());
  at::Tensor dv = at::empty(oshape, q.options());
  if (q.numel() == 0) return {dq, dk, dv};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_bwd", [&] {
    varlen_bwd_impl<scalar_t>(grad_out, q, k, v, out, lse, off, static_cast<float>(scale), dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "varlen_attention_fwd", vitk::Backend::kCpu, &vitk::cpu::varlen_attention_fwd);
  VITK_IMPL(m, "varlen_attention_bwd", vitk::Backend::kCpu, &vitk::cpu::varlen_attention_bwd);
}
