// The per-op driver of the CPU attention kernels, on top of the core (vitk/attention_core.h): what
// every attention op needs around the core loop, written once.
//
//   dispatch_float / empty_out / empty_lse   dtype dispatch and the output tensors of an entry point
//   Rows<T, D>                                a strided [tokens..., heads, d] tensor read in place
//   queue_rows, store_row, stream_store_row   prefetching a row, writing a packed fp32 row back as T
//   Task, add_chunks                          a (problem, head, row range) task list
//   run_tasks                                 the worker loop: dynamic batches of tasks (or of fixed
//                                             chunks of tasks) with the next task's prefetch
//   ChunkPartials                             per-chunk partials of a parameter gradient, summed in
//                                             chunk order (deterministic whatever the thread count)
//   dense_forward / dense_backward            the whole forward and backward of an op whose problems
//                                             are dense: every token of a (problem, head) attends to
//                                             every token of it (Gaussian-mask images, varlen
//                                             segments); the op supplies only a geometry and its
//                                             score modifier (see DenseGeometry below)
//
// The ops with their own schedule (shifted windows with head groups and absent tokens, reduced
// attention's transposed short-key tiles, polyline's fused symmetric passes, axial lines) use the
// pieces above it directly.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "vitk/attention_core.h"
#include "vitk/tiling.h"

namespace vitk {
namespace attn {

// ------------------------------------------------------------------------------ entry points

template <typename T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<T>{}) for t's dtype T: float, Half or BFloat16, the dtypes every attention op's checks
// accept (fp32 compute throughout); anything else is refused with the op's name.
template <class F>
void dispatch_float(const at::Tensor& t, const char* name, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(TypeTag<float>{}); break;
    case at::kHalf: f(TypeTag<c10::Half>{}); break;
    case at::kBFloat16: f(TypeTag<c10::BFloat16>{}); break;
    default: TORCH_CHECK_VALUE(false, name, ": expected a float, float16 or bfloat16 tensor, got ", t.scalar_type());
  }
}

// The output of q's layout with v's head dim: contiguous, q's dtype.
inline at::Tensor empty_out(const at::Tensor& q, const at::Tensor& v) {
  std::vector<int64_t> shape(q.sizes().begin(), q.sizes().end());
  shape.back() = v.sizes().back();
  return at::empty(shape, q.options());
}
inline std::vector<int64_t> out_shape(const at::Tensor& q, const at::Tensor& v) {
  std::vector<int64_t> shape(q.sizes().begin(), q.sizes().end());
  shape.back() = v.sizes().back();
  return shape;
}
// The float32 log-sum-exp per (token, head): q's sizes without the head dim.
inline at::Tensor empty_lse(const at::Tensor& q) {
  return at::empty(q.sizes().slice(0, q.dim() - 1), q.options().dtype(at::kFloat));
}

// ------------------------------------------------------------------------------ rows

// A strided tensor of D dimensions [leading..., heads, d] read in place (a packed qkv projection is
// never copied): the first element of a row is base + sum(index_i * s_i) over the D - 1 leading
// indices (the head's included); elements step by s[D-1].
template <typename T, int D>
struct Rows {
  const T* base = nullptr;
  int64_t s[D] = {};
  Rows() = default;
  explicit Rows(const at::Tensor& t) : base(t.data_ptr<T>()) {
    for (int i = 0; i < D; ++i) s[i] = t.stride(i);
  }
  template <class... I>
  const T* row(I... idx) const {
    static_assert(sizeof...(I) == D - 1, "one index per leading dimension");
    const int64_t ix[] = {static_cast<int64_t>(idx)...};
    int64_t o = 0;
    for (int i = 0; i < D - 1; ++i) o += ix[i] * s[i];
    return base + o;
  }
  // The row of head h of the token at element offset `token` (a geometry's offset over s).
  const T* at(int64_t token, int64_t h) const { return base + token + h * s[D - 2]; }
  int64_t sd() const { return s[D - 1]; }
  // Queues the cache lines of one row of d elements.
  void queue(PrefetchQueue& pq, const T* r, int64_t d) const {
    if (s[D - 1] == 1) {
      pq.add(r, d * static_cast<int64_t>(sizeof(T)));
    } else {
      for (int64_t e = 0; e < d; ++e) pq.add(r + e * s[D - 1], sizeof(T));
    }
  }
};

// dst[j] = src[j] * mult rounded to T, j < n. Restrict-qualified rows, so the loop vectorizes.
template <typename T>
inline void store_row(T* __restrict dst, const float* __restrict src, int64_t n, float mult = 1.f) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j] * mult);
}
// The same, fp32 rows streamed around the caches (simd::stream_row): for outputs of megabytes that
// the next layer reads, not this kernel. A worker that streamed fences before it ends (run_tasks
// does).
template <typename T>
inline void stream_store_row(T* __restrict dst, const float* __restrict src, int64_t n, float mult = 1.f) {
  if constexpr (std::is_same_v<T, float>) {
    simd::stream_row(dst, src, n, mult);
  } else {
    store_row(dst, src, n, mult);
  }
}

// ------------------------------------------------------------------------------ tasks

// Rows [begin, end) of head h of problem p (an image, a segment...), in part `part` of the problem
// where an op splits one (the mask direction of the symmetric polyline form).
struct Task {
  int64_t p = 0, h = 0, begin = 0, end = 0, part = 0;
};

// Nearly equal chunks of at most `chunk` rows of [0, len), each starting on a multiple of `align`.
inline void add_chunks(std::vector<Task>& tasks, int64_t p, int64_t h, int64_t len, int64_t chunk,
                       int64_t align = 1, int64_t part = 0) {
  const int64_t pieces = ceil_div(len, chunk);
  for (int64_t c = 0; c < pieces; ++c) {
    const Range r = split_range(len, pieces, c, align);
    if (r.size() > 0) tasks.push_back(Task{p, h, r.begin, r.end, part});
  }
}

// Runs tasks [0, ntasks) on every thread. The threads take batches of `chunk`-task chunks on demand
// (TaskSource); a chunk always runs whole, in order, on one thread, so whatever a chunk accumulates
// is independent of the thread count. Per worker, state = make_state() (its buffers) and one
// PrefetchQueue; per task, body(state, pq, task, next) with next the following task of the same
// batch (-1 at a batch's end: no prefetch across batches). The queue is cleared before the body,
// which queues next's lines and plans them, and drained after it.
// Whether a pass may flush underflowing results to zero (FlushUnderflow) without changing what it returns
// beyond rounding: every value of t is finite and below `bound` in magnitude. For a forward, v below 2^64:
// a key whose weight underflowed (below 2^-126 of the row's largest) then moved an output by less than
// 2^-62, and no 0 * inf NaN can appear where gradual underflow gave inf. A backward multiplies such a
// weight by products of up to three inputs (dS = P (dO v^T - D), then dS k), so it asks 2^20 of each.
inline bool flush_is_negligible(const at::Tensor& t, double bound = 0x1p64) {
  if (t.numel() == 0) return true;
  const auto [lo, hi] = at::aminmax(t);
  const double mn = lo.item<double>(), mx = hi.item<double>();  // NaN fails both comparisons
  return mn > -bound && mx < bound;
}

template <class MakeState, class Body>
void run_tasks(int64_t ntasks, int64_t chunk, MakeState&& make_state, Body&& body) {
  const int64_t nchunks = ceil_div(ntasks, std::max<int64_t>(1, chunk));
  run_workers(nchunks, [&](TaskSource& source) {
    auto state = make_state();
    PrefetchQueue pq;
    Range batch;
    while (source.next(batch)) {
      const int64_t tb = batch.begin * chunk, te = std::min(ntasks, batch.end * chunk);
      for (int64_t ti = tb; ti < te; ++ti) {
        pq.clear();
        body(state, pq, ti, ti + 1 < te ? ti + 1 : int64_t{-1});
        pq.drain();
      }
    }
  });
}

// Partials of a parameter gradient, one per chunk of consecutive tasks: chunk and count depend on
// the task count alone, so the order in which they are summed never depends on the thread count.
// Enough chunks for every thread of a large machine, at most 1024 partials.
struct ChunkPartials {
  int64_t chunk = 1, count = 0, size = 0;
  std::vector<float> data;
  ChunkPartials() = default;
  ChunkPartials(int64_t ntasks, int64_t chunk_, int64_t size_)
      : chunk(chunk_), count(ceil_div(ntasks, chunk_)), size(size_), data(count * size_, 0.f) {}
  // At most kMaxCount partials, whatever the problem size: each is a whole parameter-gradient
  // table (O(tokens) for the Gaussian mask), so a count that grew with the task count would make the
  // backward's memory grow faster than its input. 32 equal chunks still keep 16 threads busy.
  static constexpr int64_t kMaxCount = 32;
  static int64_t default_chunk(int64_t ntasks) { return std::max<int64_t>(1, ceil_div(ntasks, kMaxCount)); }
  bool starts(int64_t ti) const { return ti % chunk == 0; }
  bool ends(int64_t ti, int64_t ntasks) const { return ti % chunk == chunk - 1 || ti + 1 == ntasks; }
  float* of(int64_t ti) { return data.data() + (ti / chunk) * size; }
  const float* part(int64_t c) const { return data.data() + c * size; }
};

// ------------------------------------------------------------------------------ dense problems

// DenseGeometry: what an op whose problems are dense supplies (see the Gaussian-mask and varlen
// kernels):
//   static constexpr int kDims;            q, k, v, grad_out and out have kDims dims [..., heads, d]
//   int64_t problems() const;              P problems (images, segments), each with nh heads
//   int64_t nh, dqk, dv;
//   int64_t len(int64_t p) const;          its tokens
//   int64_t token(int64_t p, int64_t i) const;   token i's row in the contiguous outputs [tokens, nh, d]
//   int64_t offset(const int64_t* s, int64_t p, int64_t i) const;
//                                          token i's element offset in a tensor of strides s (the
//                                          leading dims only; the same function serves lse's strides)
//   using Modifier = ...;                  the score modifier (attention_core.h), one per worker:
//   Modifier modifier() const;             made once per worker,
//   void bind(Modifier&, int64_t h, float* dacc) const;   pointed at head h (and at the worker's
//                                          parameter-gradient accumulator, or null) per task
//   int64_t param_size() const;            floats of that accumulator (0: no parameters)
//   int64_t partial_size() const;          floats of one chunk's partial
//   void fold_params(const float* dacc, float* partial) const;   partial += the accumulator
constexpr int64_t kDenseQueryChunk = 256;   // rows per forward task, and per two-pass backward task
constexpr int64_t kTwoPassMinLen = 512;     // the two-pass backward: problems this long...
constexpr int64_t kTwoPassMaxProblems = 16; // ...and fewer than this many (so threads split them)

// The parameter-free part of a DenseGeometry, for an op without a modifier.
struct DenseNoModifier {
  using Modifier = NoModifier;
  Modifier modifier() const { return {}; }
  void bind(Modifier&, int64_t, float*) const {}
  int64_t param_size() const { return 0; }
  int64_t partial_size() const { return 0; }
  void fold_params(const float*, float*) const {}
};

// Forward: out [tokens, nh, dv] (contiguous, T), lse [tokens, nh] float32 (contiguous).
template <typename T, class Geo>
void dense_forward(const Geo& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, float scale,
                   at::Tensor& out, at::Tensor& lse) {
  constexpr int D = Geo::kDims;
  const Rows<T, D> qv(q), kv(k), vv(v);
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const int64_t nh = g.nh, dqk = g.dqk, dv = g.dv;
  const int64_t ldq = dqk, ldv = pad_lanes(dv);
  std::vector<Task> tasks;
  for (int64_t p = 0; p < g.problems(); ++p)
    for (int64_t h = 0; h < nh; ++h) add_chunks(tasks, p, h, g.len(p), kDenseQueryChunk);
  struct State {
    Buffer q, kt, v, o, l;
    Scratch ws;
    typename Geo::Modifier mod;
    int64_t p = -1, h = -1, L = 0, ldkt = 0;
  };
  run_tasks(
      static_cast<int64_t>(tasks.size()), 1, [&] { return State{.mod = g.modifier()}; },
      [&](State& st, PrefetchQueue& pq, int64_t ti, int64_t next) {
        const Task& t = tasks[ti];
        if (next >= 0) {
          const Task& nt = tasks[next];
          const int64_t nl = g.len(nt.p);
          if (nt.p != t.p || nt.h != t.h) {
            for (int64_t i = 0; i < nl; ++i) {
              qv.queue(pq, qv.at(g.offset(qv.s, nt.p, i), nt.h), dqk);
              kv.queue(pq, kv.at(g.offset(kv.s, nt.p, i), nt.h), dqk);
              vv.queue(pq, vv.at(g.offset(vv.s, nt.p, i), nt.h), dv);
            }
          }
          for (int64_t i = nt.begin; i < nt.end; ++i)
            pq.add(op + (g.token(nt.p, i) * nh + nt.h) * dv, dv * static_cast<int64_t>(sizeof(T)));
        }
        pq.plan(t.end - t.begin);
        if (t.p != st.p || t.h != st.h) {
          st.p = t.p;
          st.h = t.h;
          st.L = g.len(t.p);
          st.ldkt = pad_lanes(st.L);
          const int64_t L = st.L;
          auto rows = [&](const Rows<T, D>& vw) {
            return [&, vw](int64_t i) -> const T* { return vw.at(g.offset(vw.s, t.p, i), t.h); };
          };
          pack_rows<T>(L, dqk, qv.sd(), rows(qv), scale, st.q.grow(L * ldq), ldq);
          // Padding columns of kt and lanes of v must be zero: zero the whole buffers.
          pack_cols<T>(L, dqk, kv.sd(), rows(kv), st.kt.zeros(dqk * st.ldkt), st.ldkt);
          pack_rows<T>(L, dv, vv.sd(), rows(vv), 1.f, st.v.zeros(L * ldv), ldv);
          st.o.grow(L * ldv);
          st.l.grow(L);
        }
        FwdProblem p{.M = st.L, .N = st.L, .dqk = dqk, .dv = dv, .q = st.q.data(), .ldq = ldq, .kt = st.kt.data(),
                     .ldkt = st.ldkt, .v = st.v.data(), .ldv = ldv, .o = st.o.data(), .ldo = ldv,
                     .lse = st.l.data(), .prefetch = &pq};
        g.bind(st.mod, t.h, nullptr);
        attention_forward(p, st.mod, st.ws, Range{t.begin, t.end});
        pq.drain();
        for (int64_t i = t.begin; i < t.end; ++i) {
          const int64_t row = g.token(t.p, i) * nh + t.h;
          store_row(op + row * dv, st.o.data() + i * ldv, dv);
          lp[row] = st.l.data()[i];
        }
      });
}

// One (problem, head) packed for the backward, with its accumulators.
struct DenseBwdPack {
  Buffer q, k, kt, vt, dout, lse, drow, dq, dk, dv;
  int64_t p = -1, h = -1, L = 0, ldq = 0, ldkt = 0, ldv = 0;
  BwdProblem problem(int64_t dqk, int64_t dv_) const {
    return BwdProblem{.M = L, .N = L, .dqk = dqk, .dv = dv_, .q = q.data(), .k = k.data(), .ldq = ldq,
                      .kt = kt.data(), .vt = vt.data(), .ldkt = ldkt, .dout = dout.data(), .ldv = ldv,
                      .lse = lse.data(), .drow = drow.data(), .dq = dq.data(), .dk = dk.data(), .dvv = dv.data()};
  }
};

// Backward: dq, dk, dv [tokens, nh, d] (contiguous, T) from grad_out and out (any strides, like q)
// and lse (any strides, q's dims but d). With want_params (and a geometry with parameters) the
// modifier's parameter gradients come back as per-chunk partials, to be summed in chunk order.
// Few long problems (two_pass) run in two passes so that threads can split a problem without write
// conflicts: key chunks (on the core's key-tile grid) for dk, dv and the parameters, then query
// chunks for dq; otherwise one task per (problem, head) does everything.
template <typename T, class Geo>
ChunkPartials dense_backward(const Geo& g, const at::Tensor& go, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, float scale,
                             bool want_params, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv_t) {
  constexpr int D = Geo::kDims;
  const Rows<T, D> qv(q), kv(k), vv(v), gv(go), ov(out);
  const float* lp = lse.data_ptr<float>();
  int64_t lst[D - 1];  // lse [..., heads]: the tokens' leading dims, then the head
  for (int i = 0; i < D - 1; ++i) lst[i] = lse.stride(i);
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv_t.data_ptr<T>();
  const int64_t nh = g.nh, dqk = g.dqk, dv = g.dv, P = g.problems();
  want_params = want_params && g.param_size() > 0;

  int64_t problems = 0, longest = 0;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t len = g.len(p);
    if (len > 0) problems += nh;
    longest = std::max(longest, len);
  }
  const bool two_pass = longest >= kTwoPassMinLen && problems < kTwoPassMaxProblems;

  auto pack = [&](DenseBwdPack& pk, int64_t p, int64_t h) {
    const int64_t L = g.len(p);
    pk.p = p;
    pk.h = h;
    pk.L = L;
    pk.ldq = pad_lanes(dqk);
    pk.ldkt = pad_lanes(L);
    pk.ldv = pad_lanes(dv);
    auto rows = [&](const Rows<T, D>& vw) {
      return [&, vw](int64_t i) -> const T* { return vw.at(g.offset(vw.s, p, i), h); };
    };
    pack_rows<T>(L, dqk, qv.sd(), rows(qv), scale, pk.q.zeros(L * pk.ldq), pk.ldq);
    pack_rows<T>(L, dqk, kv.sd(), rows(kv), 1.f, pk.k.zeros(L * pk.ldq), pk.ldq);
    pack_cols<T>(L, dqk, kv.sd(), rows(kv), pk.kt.zeros(dqk * pk.ldkt), pk.ldkt);
    pack_cols<T>(L, dv, vv.sd(), rows(vv), pk.vt.zeros(dv * pk.ldkt), pk.ldkt);
    float* dos = pk.dout.zeros(L * pk.ldv);
    pack_rows<T>(L, dv, gv.sd(), rows(gv), 1.f, dos, pk.ldv);
    // O goes through the dq buffer (unused until the backward starts) to get Drow by vector dots.
    float* os = pk.dq.zeros(L * std::max(pk.ldq, pk.ldv));
    pack_rows<T>(L, dv, ov.sd(), rows(ov), 1.f, os, pk.ldv);
    float* ls = pk.lse.grow(L);
    float* dr = pk.drow.grow(L);
    for (int64_t i = 0; i < L; ++i) {
      ls[i] = lp[g.offset(lst, p, i) + h * lst[D - 2]];
      dr[i] = simd::row_dot(dos + i * pk.ldv, os + i * pk.ldv, dv);
    }
    pk.dk.grow(L * pk.ldq);
    pk.dv.grow(L * pk.ldv);
  };
  auto store = [&](T* dst, const Task& t, Range r, const float* src, int64_t ld, int64_t d, float mult) {
    for (int64_t i = r.begin; i < r.end; ++i) store_row(dst + (g.token(t.p, i) * nh + t.h) * d, src + i * ld, d, mult);
  };

  ChunkPartials partials;
  // Runs `tasks` with a per-worker pack cache; with params, in chunks that fold the modifier's
  // parameter gradient into their partial. body(pack, scratch, modifier, problem, task).
  auto run = [&](const std::vector<Task>& tasks, bool params, auto&& body) {
    const int64_t ntasks = static_cast<int64_t>(tasks.size());
    const int64_t psize = g.param_size();
    if (params) partials = ChunkPartials(ntasks, ChunkPartials::default_chunk(ntasks), g.partial_size());
    struct State {
      DenseBwdPack pk;
      Scratch ws;
      Buffer dab;
      typename Geo::Modifier mod;
    };
    run_tasks(
        ntasks, params ? partials.chunk : 1, [&] { return State{.mod = g.modifier()}; },
        [&](State& st, PrefetchQueue& pq, int64_t ti, int64_t next) {
          float* dacc = params ? st.dab.grow(psize) : nullptr;
          if (dacc != nullptr && partials.starts(ti)) std::fill(dacc, dacc + psize, 0.f);
          const Task& t = tasks[ti];
          if (t.p != st.pk.p || t.h != st.pk.h) pack(st.pk, t.p, t.h);
          if (next >= 0 && (tasks[next].p != t.p || tasks[next].h != t.h)) {
            const Task& nt = tasks[next];
            for (int64_t i = 0, nl = g.len(nt.p); i < nl; ++i) {
              qv.queue(pq, qv.at(g.offset(qv.s, nt.p, i), nt.h), dqk);
              kv.queue(pq, kv.at(g.offset(kv.s, nt.p, i), nt.h), dqk);
              vv.queue(pq, vv.at(g.offset(vv.s, nt.p, i), nt.h), dv);
              gv.queue(pq, gv.at(g.offset(gv.s, nt.p, i), nt.h), dv);
              ov.queue(pq, ov.at(g.offset(ov.s, nt.p, i), nt.h), dv);
            }
          }
          pq.plan(t.end - t.begin);
          g.bind(st.mod, t.h, dacc);
          BwdProblem p = st.pk.problem(dqk, dv);
          p.prefetch = &pq;
          body(st.pk, st.ws, st.mod, p, t);
          pq.drain();
          if (dacc != nullptr && partials.ends(ti, ntasks)) g.fold_params(dacc, partials.of(ti));
        });
  };

  if (!two_pass) {
    std::vector<Task> tasks;
    for (int64_t p = 0; p < P; ++p)
      for (int64_t h = 0; h < nh; ++h)
        if (g.len(p) > 0) tasks.push_back(Task{p, h, 0, g.len(p)});
    run(tasks, want_params, [&](DenseBwdPack& pk, Scratch& ws, auto& mod, BwdProblem& p, const Task& t) {
      const int64_t L = pk.L;
      std::fill(pk.dq.data(), pk.dq.data() + L * pk.ldq, 0.f);
      std::fill(pk.dk.data(), pk.dk.data() + L * pk.ldq, 0.f);
      std::fill(pk.dv.data(), pk.dv.data() + L * pk.ldv, 0.f);
      attention_backward(p, mod, ws, Range{0, L}, Range{0, L}, kAll);
      store(dqp, t, Range{0, L}, pk.dq.data(), pk.ldq, dqk, scale);
      store(dkp, t, Range{0, L}, pk.dk.data(), pk.ldq, dqk, 1.f);
      store(dvp, t, Range{0, L}, pk.dv.data(), pk.ldv, dv, 1.f);
    });
    return partials;
  }

  std::vector<Task> key_tasks, query_tasks;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t len = g.len(p);
    if (len == 0) continue;
    for (int64_t h = 0; h < nh; ++h) {
      add_chunks(key_tasks, p, h, len, kDenseQueryChunk, key_tile(len));
      add_chunks(query_tasks, p, h, len, kDenseQueryChunk);
    }
  }
  run(key_tasks, want_params, [&](DenseBwdPack& pk, Scratch& ws, auto& mod, BwdProblem& p, const Task& t) {
    const Range kr{t.begin, t.end};
    std::fill(pk.dk.data() + kr.begin * pk.ldq, pk.dk.data() + kr.end * pk.ldq, 0.f);
    std::fill(pk.dv.data() + kr.begin * pk.ldv, pk.dv.data() + kr.end * pk.ldv, 0.f);
    attention_backward(p, mod, ws, Range{0, pk.L}, kr, kKeyValue | kParams);
    store(dkp, t, kr, pk.dk.data(), pk.ldq, dqk, 1.f);
    store(dvp, t, kr, pk.dv.data(), pk.ldv, dv, 1.f);
  });
  run(query_tasks, false, [&](DenseBwdPack& pk, Scratch& ws, auto& mod, BwdProblem& p, const Task& t) {
    const Range qr{t.begin, t.end};
    std::fill(pk.dq.data() + qr.begin * pk.ldq, pk.dq.data() + qr.end * pk.ldq, 0.f);
    attention_backward(p, mod, ws, qr, Range{0, pk.L}, kQuery);
    store(dqp, t, qr, pk.dq.data(), pk.ldq, dqk, scale);
  });
  return partials;
}

}  // namespace attn
}  // namespace vitk
