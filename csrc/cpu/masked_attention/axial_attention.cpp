// CPU kernels of PPMA's criss-cross ("chunk") attention 0.5 A_h(A_w v) + 0.5 A_w(A_h v): the one-axis
// primitive (attention among the tokens of each image row, axis = 2, or column, axis = 1, with the
// segment sums of a per-token log decay along that axis added to the scores), forward and backward,
// and the fused forward of the whole form (at the end of the file), whose backward in
// vitkernels/ops/masked_attention.py is three calls of the primitive's backward (the two row
// attentions share one call as two value streams).
//
// A problem is one (image, row or column, head): L = W or H queries and keys, tiny (7..56 tokens),
// so one task is one problem and the task source hands them out in batches. The problem's tokens
// are gathered straight from q, k, v through their strides (a packed qkv tensor is read in place).
// The mask for query j1 and key j2 is sgn(j1 - j2) (P[j1] - P[j2]) with P the double prefix sums of
// the line's finite decays (non-finite ones are counted apart, see vitk/decay_mask.h); the modifier forms each difference in double and rounds it once (see
// vitk/decay_mask.h for why), vectorized over the keys on either side of the query, and nothing
// L x L is stored beside the core's own score tile. The backward accumulates dLoss/dP per problem
// and turns it into the decay gradient of its line by a reverse prefix sum; problems own disjoint
// lines of every output, so the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vitk/attention_driver.h"
#include "vitk/masked_attention.h"
#include "vitk/checks.h"
#include "vitk/decay_mask.h"
#include "vitk/tiling.h"
#include "vitk/registration.h"

namespace vitk {
namespace cpu {
namespace {

using attn::Buffer;
using attn::pad_lanes;

struct AxialGeom : ImageDims {
  int64_t axis = 2;
  int64_t L = 0;  // tokens per line
  int64_t G = 0;  // lines per image
  int64_t tasks = 0;
  // Image coordinates of token t of line gi.
  int64_t y(int64_t gi, int64_t t) const { return axis == 2 ? gi : t; }
  int64_t x(int64_t gi, int64_t t) const { return axis == 2 ? t : gi; }
};

AxialGeom make_geom(const at::Tensor& q, const at::Tensor& v, int64_t axis) {
  AxialGeom g;
  static_cast<ImageDims&>(g) = image_dims(q, v);
  g.axis = axis;
  g.L = axis == 2 ? g.W : g.H;
  g.G = axis == 2 ? g.H : g.W;
  g.tasks = g.B * g.G * g.nh;
  return g;
}

struct TaskIndex {
  int64_t b, gi, h;
};

// Task = (image, line, head), heads innermost: consecutive tasks read neighbouring memory.
inline TaskIndex decode(const AxialGeom& g, int64_t t) {
  return TaskIndex{t / (g.G * g.nh), (t / g.nh) % g.G, t % g.nh};
}

// A line of decays [0, n) (read at offset, step) as prefix sums: P of the finite values in double
// and, when the line holds non-finite decays, Pc of their codes (see decay::split_nonfinite).
// Returns Pc, or nullptr when every decay is finite.
const int64_t* line_prefix(const at::Tensor& ld, int64_t offset, int64_t step, int64_t n, double* P, int64_t* Pc) {
  decay::read_line(ld, offset, step, n, P);
  const bool special = decay::split_nonfinite(P, Pc, n);
  decay::prefix_sum(P, n);
  if (!special) return nullptr;
  decay::prefix_sum(Pc, n);
  return Pc;
}

const int64_t* line_prefix(const AxialGeom& g, const at::Tensor& ld, const TaskIndex& ti, double* P, int64_t* Pc) {
  const decay::PlaneStrides s(ld);
  return line_prefix(ld, s.at(ti.b, g.y(ti.gi, 0), g.x(ti.gi, 0), ti.h), g.axis == 2 ? s.s2 : s.s1, g.L, P, Pc);
}

// ------------------------------------------------------------------------------ modifier

struct AxialModifier {
  static constexpr bool kNeedsRaw = false;
  const double* P = nullptr;  // [L] prefix sums of the line's decays, zero to a whole vector past L
  const int64_t* Pc = nullptr;  // [L] prefix codes of its non-finite decays; null: all finite
  double* dP = nullptr;       // [L] dLoss/dP, accumulated; null: no decay gradient
  float* col = nullptr;       // scratch, one key tile

  // P is zero-padded to whole vectors, so every row is processed in whole 16-lane steps: the keys
  // after the query take P[j2] - P[j1], those before P[j1] - P[j2] (a lane mask, no split loops).
  void forward(int64_t q0, int64_t m, int64_t k0, int64_t n, float* s, int64_t lds) const {
    const double* pk = P + k0;
    for (int64_t i = 0; i < m; ++i) {
      const int64_t j1 = q0 + i;
      float* row = s + i * lds;
#ifdef __AVX512F__
      const __m512d p1 = _mm512_set1_pd(P[j1]);
      for (int64_t x = 0; x < n; x += attn::kLanes) {
        const int64_t t = j1 - k0 - x;  // the query's lane in this step (may lie outside it)
        __m512d lo = _mm512_sub_pd(p1, _mm512_loadu_pd(pk + x));
        __m512d hi = _mm512_sub_pd(p1, _mm512_loadu_pd(pk + x + 8));
        lo = _mm512_mask_sub_pd(lo, lanes_after(t), _mm512_setzero_pd(), lo);
        hi = _mm512_mask_sub_pd(hi, lanes_after(t - 8), _mm512_setzero_pd(), hi);
        const __m512 add = _mm512_castpd_ps(_mm512_insertf64x4(
            _mm512_castps_pd(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo))), _mm256_castps_pd(_mm512_cvtpd_ps(hi)), 1));
        _mm512_storeu_ps(row + x, _mm512_add_ps(_mm512_loadu_ps(row + x), add));
      }
#else
      const int64_t lo = std::clamp<int64_t>(j1 - k0, 0, n), hi = std::clamp<int64_t>(j1 - k0 + 1, 0, n);
      const double p1 = P[j1];
      for (int64_t x = 0; x < lo; ++x) row[x] += static_cast<float>(p1 - pk[x]);
      for (int64_t x = hi; x < n; ++x) row[x] += static_cast<float>(pk[x] - p1);
#endif
      if (Pc != nullptr)
        for (int64_t x = 0; x < n; ++x) row[x] += decay::path_special(std::abs(Pc[j1] - Pc[k0 + x]));
    }
  }

#ifdef __AVX512F__
  // Of 8 lanes, those after lane t.
  static __mmask8 lanes_after(int64_t t) {
    if (t < 0) return 0xFF;
    if (t >= 7) return 0;
    return static_cast<__mmask8>(0xFFu << (t + 1));
  }
  // Of 16 lanes, those before lane t, and lane t itself.
  static __mmask16 lanes_before(int64_t t) {
    if (t <= 0) return 0;
    if (t >= 16) return 0xFFFF;
    return static_cast<__mmask16>((1u << t) - 1u);
  }
  static __mmask16 lane_at(int64_t t) { return t >= 0 && t < 16 ? static_cast<__mmask16>(1u << t) : 0; }
#endif

  // d logit / dP[j1] = sgn(j1 - j2), d logit / dP[j2] = -sgn(j1 - j2).
  void backward(int64_t q0, int64_t m, int64_t k0, int64_t n, const float*, float* ds, int64_t lds,
                bool params) const {
    if (!params || dP == nullptr) return;
    std::fill(col, col + pad_lanes(n), 0.f);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t j1 = q0 + i;
      const float* d = ds + i * lds;
#ifdef __AVX512F__
      // e = sgn(j2 - j1) dS: col[j2] += e, dP[j1] -= sum e. Padding lanes of dS are zeros.
      __m512 acc = _mm512_setzero_ps();
      for (int64_t x = 0; x < n; x += attn::kLanes) {
        const int64_t t = j1 - k0 - x;
        const __m512 dv = _mm512_loadu_ps(d + x);
        __m512 e = _mm512_mask_sub_ps(dv, lanes_before(t), _mm512_setzero_ps(), dv);
        e = _mm512_maskz_mov_ps(static_cast<__mmask16>(~lane_at(t)), e);
        _mm512_storeu_ps(col + x, _mm512_add_ps(_mm512_loadu_ps(col + x), e));
        acc = _mm512_add_ps(acc, e);
      }
      dP[j1] -= static_cast<double>(_mm512_reduce_add_ps(acc));
#else
      const int64_t lo = std::clamp<int64_t>(j1 - k0, 0, n), hi = std::clamp<int64_t>(j1 - k0 + 1, 0, n);
      float before = 0.f, after = 0.f;
      for (int64_t x = 0; x < lo; ++x) {
        before += d[x];
        col[x] -= d[x];
      }
      for (int64_t x = hi; x < n; ++x) {
        after += d[x];
        col[x] += d[x];
      }
      dP[j1] += static_cast<double>(before) - static_cast<double>(after);
#endif
    }
    for (int64_t x = 0; x < n; ++x) dP[k0 + x] += col[x];
  }
};

void check_axial_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ld,
                      int64_t axis) {
  check_image_qkv(q, k, v);
  decay::check_decay(ld, "log_decay", q);
  TORCH_CHECK_VALUE(axis == 1 || axis == 2,
                    "axis: expected 1 (attention along H, within columns) or 2 (along W, within rows), got ", axis);
}

// Queues the cache lines task ti reads from `ins` and writes to the contiguous outputs `outs`
// (widths in elements), so that they arrive while the current task computes.
template <typename T, size_t NI, size_t NO>
void queue_task(attn::PrefetchQueue& pq, const AxialGeom& g, const TaskIndex& ti, const TokenView<T>* const (&ins)[NI],
                const int64_t (&inw)[NI], T* const (&outs)[NO], const int64_t (&outw)[NO]) {
  for (int64_t t = 0; t < g.L; ++t) {
    const int64_t y = g.y(ti.gi, t), x = g.x(ti.gi, t);
    for (size_t i = 0; i < NI; ++i) {
      ins[i]->queue(pq, ins[i]->row(ti.b, y, x, ti.h), inw[i]);
    }
    const int64_t row = ((ti.b * g.H + y) * g.W + x) * g.nh + ti.h;
    for (size_t o = 0; o < NO; ++o) pq.add(outs[o] + row * outw[o], outw[o] * static_cast<int64_t>(sizeof(T)));
  }
}

// ------------------------------------------------------------------------------ forward

template <typename T>
void axial_fwd_impl(const AxialGeom& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& ld, float scale, at::Tensor& out, at::Tensor& lse) {
  const TokenView<T> qv(q), kv(k), vv(v);
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const int64_t L = g.L, dqk = g.dqk, dv = g.dv, nh = g.nh;
  const int64_t ldq = dqk, ldkt = pad_lanes(L), ldv = pad_lanes(dv);
  attn::run_workers(g.tasks, [&](attn::TaskSource& source) {
    // Padding columns of kt and lanes of v are zeroed once: packing never writes them.
    Buffer qb, ktb, vb, ob, lb;
    float* qs = qb.grow(L * ldq);
    float* kts = ktb.zeros(dqk * ldkt);
    float* vs = vb.zeros(L * ldv);
    float* os = ob.grow(L * ldv);
    float* ls = lb.grow(L);
    std::vector<double> P(pad_lanes(L) + attn::kLanes, 0.0);  // zero padding: see AxialModifier
    std::vector<int64_t> Pc(L);
    attn::Scratch ws;
    attn::PrefetchQueue pq;
    const TokenView<T>* const ins[3] = {&qv, &kv, &vv};
    const int64_t inw[3] = {dqk, dqk, dv};
    T* const outs[1] = {op};
    const int64_t outw[1] = {dv};
    Range batch;
    while (source.next(batch)) {
      for (int64_t task = batch.begin; task < batch.end; ++task) {
        const TaskIndex ti = decode(g, task);
        pq.clear();
        if (task + 1 < batch.end) queue_task(pq, g, decode(g, task + 1), ins, inw, outs, outw);
        pq.plan(L);
        const int64_t* codes = line_prefix(g, ld, ti, P.data(), Pc.data());
        auto rows = [&](const TokenView<T>& tv) {
          return [&](int64_t t) -> const T* { return tv.row(ti.b, g.y(ti.gi, t), g.x(ti.gi, t), ti.h); };
        };
        attn::pack_rows<T>(L, dqk, qv.s[4], rows(qv), scale, qs, ldq);
        attn::pack_cols<T>(L, dqk, kv.s[4], rows(kv), kts, ldkt);
        attn::pack_rows<T>(L, dv, vv.s[4], rows(vv), 1.f, vs, ldv);
        attn::FwdProblem pr{.M = L, .N = L, .dqk = dqk, .dv = dv, .q = qs, .ldq = ldq, .kt = kts, .ldkt = ldkt,
                            .v = vs, .ldv = ldv, .o = os, .ldo = ldv, .lse = ls};
        AxialModifier mod;
        mod.P = P.data();
        mod.Pc = codes;
        pr.prefetch = &pq;
        attn::attention_forward(pr, mod, ws, Range{0, L});
        pq.drain();
        for (int64_t t = 0; t < L; ++t) {
          const int64_t row = ((ti.b * g.H + g.y(ti.gi, t)) * g.W + g.x(ti.gi, t)) * nh + ti.h;
          attn::stream_store_row(op + row * dv, os + t * ldv, dv);
          lp[row] = ls[t];
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------ backward

// The value-side tensors of one stream of the backward: v, grad_out, out in, dv out.
struct ValueStream {
  const at::Tensor* v = nullptr;
  const at::Tensor* go = nullptr;
  const at::Tensor* out = nullptr;
  at::Tensor* dv = nullptr;
};

// A second value stream shares the lines' probabilities with the first (two attentions of the
// same q, k and decays over different values): its dP adds to the first's and its rowsum(dO * O)
// to the first's, so dS, dq, dk and the decay gradient come out of one pass for both. Its values
// are packed beside the first's, at column ldv of every packed value row (row ldv of the
// transposed tile), with zeros between, and the core sees one value width of ldv + dv.
template <typename T>
void axial_bwd_impl(const AxialGeom& g, const ValueStream (&vs)[2], int64_t nstreams, const at::Tensor& q,
                    const at::Tensor& k, const at::Tensor& ld, const at::Tensor& lse, bool want_decay, float scale,
                    at::Tensor& dq_t, at::Tensor& dk_t, at::Tensor& dld) {
  const bool two = nstreams == 2;
  const ValueStream& s2 = two ? vs[1] : vs[0];  // stands in for the absent stream; never read then
  const TokenView<T> qv(q), kv(k), vv(*vs[0].v), gv(*vs[0].go), ov(*vs[0].out), vv2(*s2.v), gv2(*s2.go),
      ov2(*s2.out);
  const TokenView<T>* const vals[2][3] = {{&vv, &gv, &ov}, {&vv2, &gv2, &ov2}};
  const decay::PlaneStrides sl(lse);
  const float* lp = lse.data_ptr<float>();
  T* dqp = dq_t.data_ptr<T>();
  T* dkp = dk_t.data_ptr<T>();
  T* dvp[2] = {vs[0].dv->data_ptr<T>(), s2.dv->data_ptr<T>()};
  const int64_t L = g.L, dqk = g.dqk, dv = g.dv, nh = g.nh;
  const int64_t ldq = pad_lanes(dqk), ldkt = pad_lanes(L), ldv = pad_lanes(dv);
  const int64_t ldc = nstreams * ldv, dvc = (nstreams - 1) * ldv + dv;  // both streams side by side
  attn::run_workers(g.tasks, [&](attn::TaskSource& source) {
    // Every padding lane and column is zeroed once here; packing only ever writes real data.
    Buffer qb, kb, ktb, vtb, dob, oub, lb, drb, dqb, dkb, dvb, colb;
    float* qs = qb.zeros(L * ldq);
    float* ks = kb.zeros(L * ldq);
    float* kts = ktb.zeros(dqk * ldkt);
    float* vts = vtb.zeros(ldc * ldkt);
    float* dos = dob.zeros(L * ldc);
    float* os = oub.zeros(L * ldc);
    float* ls = lb.grow(L);
    float* drow = drb.grow(L);
    float* dqs = dqb.grow(L * ldq);
    float* dks = dkb.grow(L * ldq);
    float* dvs = dvb.grow(L * ldc);
    float* col = colb.grow(pad_lanes(attn::key_tile(L)));
    std::vector<double> P(pad_lanes(L) + attn::kLanes, 0.0), dP(L), dx(L);
    std::vector<int64_t> Pc(L);
    attn::Scratch ws;
    attn::PrefetchQueue pq;
    const TokenView<T>* const ins[8] = {&qv, &kv, &vv, &gv, &ov, &vv2, &gv2, &ov2};
    const int64_t inw[8] = {dqk, dqk, dv, dv, dv, dv, dv, dv};
    T* const outs[4] = {dqp, dkp, dvp[0], dvp[1]};
    const int64_t outw[4] = {dqk, dqk, dv, dv};
    const TokenView<T>* const ins1[5] = {&qv, &kv, &vv, &gv, &ov};
    const int64_t inw1[5] = {dqk, dqk, dv, dv, dv};
    T* const outs1[3] = {dqp, dkp, dvp[0]};
    const int64_t outw1[3] = {dqk, dqk, dv};
    Range batch;
    while (source.next(batch)) {
      for (int64_t task = batch.begin; task < batch.end; ++task) {
        const TaskIndex ti = decode(g, task);
        pq.clear();
        if (task + 1 < batch.end) {
          if (two)
            queue_task(pq, g, decode(g, task + 1), ins, inw, outs, outw);
          else
            queue_task(pq, g, decode(g, task + 1), ins1, inw1, outs1, outw1);
        }
        pq.plan(L);
        const int64_t* codes = line_prefix(g, ld, ti, P.data(), Pc.data());
        auto rows = [&](const TokenView<T>& tv) {
          return [&](int64_t t) -> const T* { return tv.row(ti.b, g.y(ti.gi, t), g.x(ti.gi, t), ti.h); };
        };
        attn::pack_rows<T>(L, dqk, qv.s[4], rows(qv), scale, qs, ldq);
        attn::pack_rows<T>(L, dqk, kv.s[4], rows(kv), 1.f, ks, ldq);
        attn::pack_cols<T>(L, dqk, kv.s[4], rows(kv), kts, ldkt);
        for (int64_t st = 0; st < nstreams; ++st) {
          const TokenView<T>& sv = *vals[st][0];
          const TokenView<T>& sg = *vals[st][1];
          const TokenView<T>& so = *vals[st][2];
          attn::pack_cols<T>(L, dv, sv.s[4], rows(sv), vts + st * ldv * ldkt, ldkt);
          attn::pack_rows<T>(L, dv, sg.s[4], rows(sg), 1.f, dos + st * ldv, ldc);
          attn::pack_rows<T>(L, dv, so.s[4], rows(so), 1.f, os + st * ldv, ldc);
        }
        for (int64_t t = 0; t < L; ++t) {
          ls[t] = lp[sl.at(ti.b, g.y(ti.gi, t), g.x(ti.gi, t), ti.h)];
          drow[t] = attn::simd::row_dot(dos + t * ldc, os + t * ldc, ldc);
        }
        std::fill(dqs, dqs + L * ldq, 0.f);
        std::fill(dks, dks + L * ldq, 0.f);
        std::fill(dvs, dvs + L * ldc, 0.f);
        attn::BwdProblem pr{.M = L, .N = L, .dqk = dqk, .dv = dvc, .q = qs, .k = ks, .ldq = ldq, .kt = kts, .vt = vts,
                            .ldkt = ldkt, .dout = dos, .ldv = ldc, .lse = ls, .drow = drow, .dq = dqs, .dk = dks,
                            .dvv = dvs};
        AxialModifier mod;
        mod.P = P.data();
        mod.Pc = codes;
        mod.col = col;
        if (want_decay) {
          std::fill(dP.begin(), dP.end(), 0.0);
          mod.dP = dP.data();
        }
        pr.prefetch = &pq;
        attn::attention_backward(pr, mod, ws, Range{0, L}, Range{0, L}, attn::kAll);
        pq.drain();
        for (int64_t t = 0; t < L; ++t) {
          const int64_t row = ((ti.b * g.H + g.y(ti.gi, t)) * g.W + g.x(ti.gi, t)) * nh + ti.h;
          attn::stream_store_row(dqp + row * dqk, dqs + t * ldq, dqk, scale);
          attn::stream_store_row(dkp + row * dqk, dks + t * ldq, dqk);
          for (int64_t st = 0; st < nstreams; ++st) attn::stream_store_row(dvp[st] + row * dv, dvs + t * ldc + st * ldv, dv);
        }
        if (want_decay) {
          decay::reverse_prefix(dP.data(), L, dx.data());
          const decay::PlaneStrides so(dld);
          decay::write_line(dld, so.at(ti.b, g.y(ti.gi, 0), g.x(ti.gi, 0), ti.h), g.axis == 2 ? so.s2 : so.s1, L,
                            dx.data());
        }
      }
    }
  });
}


// ------------------------------------------------------------------------------ fused criss-cross forward
//
// Both halves of 0.5 A_h(A_w v) + 0.5 A_w(A_h v) share the same two softmaxes, so one task per
// (image, head) computes each row's W x W and each column's H x H probabilities once and applies
// them twice, where four primitive calls would compute each softmax twice. The whole image of the
// head is packed once in fp32, token t = y W + x at row t of [N][2 ldv] buffers, so a row is a block
// of consecutive buffer rows and a column is every W-th one, both of which the core's gemm reads
// through its row strides:
//   X = [v | y_w]    y_w = A_w v, written by the row pass
//   Y = [y_h | o_wh] written by the column pass in one product: A_h [v | y_w]
// The column pass needs every row's y_w and the second row pass needs every column's y_h, so one of
// the two families of probabilities has to be kept until the end: the rows' (aw, H x W x pad(W)),
// while the columns' are used as soon as they are computed. Scratch per task is O(N (H + W)).


// Probabilities of one line in place: s [L][lds] holds the logits on entry; lse[t * lse_step] gets
// each row's log-sum-exp. Whole rows at once: a line is at most a few hundred keys.
inline void line_softmax(float* s, int64_t L, int64_t lds, float* lse, int64_t lse_step, attn::PrefetchQueue& pq) {
  for (int64_t i = 0; i < L; ++i) {
    pq.step();
    float* row = s + i * lds;
    const float m = attn::simd::row_max(row, L);
    const float m_use = m == attn::kNegInf ? 0.f : m;
    const float l = attn::simd::row_exp_sum(row, L, m_use);
    if (l > 0.f) {
      attn::simd::row_scale(row, L, 1.f / l);
      lse[i * lse_step] = m_use + std::log(l);
    } else {  // a NaN or +inf logit, or all -inf: a NaN row (see attention_forward)
      std::fill(row, row + L, attn::kNaN);
      lse[i * lse_step] = attn::kNaN;
    }
  }
}

// dst[j] = (a[j] + b[j]) / 2, j < n.
inline void average2(float* __restrict dst, const float* __restrict a, const float* __restrict b, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = 0.5f * (a[j] + b[j]);
}

// A worker's buffers, kept from call to call: they reach megabytes (the rows' probabilities of a
// 56 x 56 image are 0.8 MB), and allocated afresh they are new pages on every call, whose faults
// and zeroing stood out in the profile.
struct FusedScratch {
  Buffer x, y, aw, ah, q, k, ktw, kth, o, mean;
};

template <typename T>
void axial_decay_fwd_impl(const ImageDims& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& la, const at::Tensor& lb, float scale, at::Tensor& out_t,
                          at::Tensor& parts_t, at::Tensor& mids_t, at::Tensor& lse_t, bool save) {
  const TokenView<T> qv(q), kv(k), vv(v);
  T* outp = out_t.data_ptr<T>();
  T* partp = save ? parts_t.data_ptr<T>() : nullptr;
  T* midp = save ? mids_t.data_ptr<T>() : nullptr;
  float* lsep = lse_t.data_ptr<float>();
  const int64_t H = g.H, W = g.W, nh = g.nh, dqk = g.dqk, dv = g.dv, N = H * W;
  const int64_t ldw = pad_lanes(W), ldh = pad_lanes(H), ldv = pad_lanes(dv), ldx = 2 * ldv;
  const int64_t half = g.B * N * nh;  // elements per token column of one half of parts / mids / lse
  const decay::PlaneStrides sa(la), sb(lb);
  const int64_t tasks = g.B * nh;
  attn::run_workers(tasks, [&](attn::TaskSource& source) {
    // Padding lanes of X's v half and the padding columns of both kt tiles are zeroed once here:
    // packing writes only real data, and every other buffer is written whole by a gemm.
    thread_local FusedScratch sc;
    float* X = sc.x.zeros(N * ldx);
    float* Y = sc.y.grow(N * ldx);
    float* aw = sc.aw.grow(H * W * ldw);
    float* ah = sc.ah.grow(H * ldh);
    float* qa = sc.q.grow(N * dqk);
    float* ka = sc.k.grow(N * dqk);
    float* ktw = sc.ktw.zeros(dqk * ldw);
    float* kth = sc.kth.zeros(dqk * ldh);
    float* ohw = sc.o.grow(W * ldv);
    float* mean = sc.mean.grow(ldv);
    attn::PrefetchQueue pq;
    // Prefix sums, zero-padded past the line to whole vectors (see AxialModifier).
    std::vector<double> P(pad_lanes(std::max(H, W)) + attn::kLanes, 0.0);
    std::vector<int64_t> Pc(std::max(H, W));
    Range batch;
    while (source.next(batch)) {
      for (int64_t task = batch.begin; task < batch.end; ++task) {
        const int64_t b = task / nh, h = task % nh;
        const int64_t tok0 = b * N * nh + h;  // flat [B, H, W, heads] index of token 0, this head
        auto at_row = [&](const TokenView<T>& tv, int64_t y) {
          return [&tv, b, h, y](int64_t x) -> const T* { return tv.row(b, y, x, h); };
        };
        // The next task's q, k, v rows arrive while this one computes: the gathers at a token stride
        // of 3 heads x d were the slowest part of the task without it. Spread over both passes'
        // softmax rows (see PrefetchQueue).
        pq.clear();
        if (task + 1 < batch.end) {
          const int64_t b1 = (task + 1) / nh, h1 = (task + 1) % nh;
          for (int64_t t = 0; t < N; ++t) {
            const int64_t y = t / W, x = t % W;
            for (const TokenView<T>* tv : {&qv, &kv, &vv}) {
              const int64_t width = tv == &vv ? dv : dqk;
              pq.add(tv->row(b1, y, x, h1), ((width - 1) * tv->s[4] + 1) * static_cast<int64_t>(sizeof(T)));
            }
          }
        }
        pq.plan(2 * N);
        // The head's q (scaled), k and v, read once in token order (the strided gathers of a
        // column are cache misses; gathering the packed fp32 rows again is not).
        for (int64_t y = 0; y < H; ++y) {
          attn::pack_rows<T>(W, dqk, qv.s[4], at_row(qv, y), scale, qa + y * W * dqk, dqk);
          attn::pack_rows<T>(W, dqk, kv.s[4], at_row(kv, y), 1.f, ka + y * W * dqk, dqk);
          attn::pack_rows<T>(W, dv, vv.s[4], at_row(vv, y), 1.f, X + y * W * ldx, ldx);
        }

        // Rows: probabilities kept in aw, y_w = A_w v into X's second half.
        for (int64_t y = 0; y < H; ++y) {
          attn::pack_cols<float>(W, dqk, 1, [&](int64_t x) -> const float* { return ka + (y * W + x) * dqk; }, ktw,
                                 ldw);
          float* a = aw + y * W * ldw;
          attn::gemm<false, false>(W, ldw, dqk, qa + y * W * dqk, dqk, ktw, ldw, a, ldw);
          std::fill(P.begin(), P.end(), 0.0);
          AxialModifier mod;
          mod.Pc = line_prefix(la, sa.at(b, y, 0, h), sa.s2, W, P.data(), Pc.data());
          mod.P = P.data();
          mod.forward(0, W, 0, W, a, ldw);
          line_softmax(a, W, ldw, lsep + tok0 + y * W * nh, nh, pq);
          attn::gemm<false, false>(W, ldv, W, a, ldw, X + y * W * ldx, ldx, X + y * W * ldx + ldv, ldx);
        }

        // Columns: [y_h | o_wh] = A_h [v | y_w], one product over both halves.
        for (int64_t x = 0; x < W; ++x) {
          attn::pack_cols<float>(H, dqk, 1, [&](int64_t y) -> const float* { return ka + (y * W + x) * dqk; }, kth,
                                 ldh);
          attn::gemm<false, false>(H, ldh, dqk, qa + x * dqk, W * dqk, kth, ldh, ah, ldh);
          std::fill(P.begin(), P.end(), 0.0);
          AxialModifier mod;
          mod.Pc = line_prefix(lb, sb.at(b, 0, x, h), sb.s1, H, P.data(), Pc.data());
          mod.P = P.data();
          mod.forward(0, H, 0, H, ah, ldh);
          line_softmax(ah, H, ldh, lsep + half + tok0 + x * nh, W * nh, pq);
          attn::gemm<false, false>(H, ldx, H, ah, ldh, X + x * ldx, W * ldx, Y + x * ldx, W * ldx);
        }

        // Rows again: o_hw = A_w y_h, then every output of the row's tokens in one sweep.
        for (int64_t y = 0; y < H; ++y) {
          const float* a = aw + y * W * ldw;
          attn::gemm<false, false>(W, ldv, W, a, ldw, Y + y * W * ldx, ldx, ohw, ldv);
          for (int64_t x = 0; x < W; ++x) {
            const int64_t t = y * W + x;
            const int64_t row = (tok0 + t * nh) * dv;
            const float* xr = X + t * ldx;
            const float* yr = Y + t * ldx;
            const float* o2 = ohw + x * ldv;
            average2(mean, yr + ldv, o2, ldv);
            attn::stream_store_row(outp + row, mean, dv);
            if (!save) continue;
            attn::stream_store_row(partp + row, yr + ldv, dv);
            attn::stream_store_row(partp + half * dv + row, o2, dv);
            attn::stream_store_row(midp + row, xr + ldv, dv);
            attn::stream_store_row(midp + half * dv + row, yr, dv);
          }
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> axial_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& log_decay, int64_t axis, double scale) {
  check_axial_args(q, k, v, log_decay, axis);
  const std::vector<int64_t> oshape = attn::out_shape(q, v);
  at::Tensor out = at::empty(oshape, q.options());
  at::Tensor lse = at::empty(q.sizes().slice(0, 4), q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const AxialGeom g = make_geom(q, v, axis);
  attn::dispatch_float(q, "axial_attention_fwd", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    axial_fwd_impl<scalar_t>(g, q, k, v, log_decay, static_cast<float>(scale), out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> axial_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& log_decay, const at::Tensor& out, const at::Tensor& lse, int64_t axis, double scale,
    bool decay_grad, const c10::optional<at::Tensor>& grad_out2, const c10::optional<at::Tensor>& v2,
    const c10::optional<at::Tensor>& out2) {
  check_axial_args(q, k, v, log_decay, axis);
  decay::check_like_out(grad_out, "grad_out", q, v);
  decay::check_like_out(out, "out", q, v);
  decay::check_lse(lse, q);
  const bool two = grad_out2.has_value() && grad_out2->defined();
  TORCH_CHECK_VALUE(two == (v2.has_value() && v2->defined()) && two == (out2.has_value() && out2->defined()),
                    "grad_out2, v2, out2: expected all three (a second value stream) or none");
  if (two) {
    check_like(*v2, "v2", q, v.sizes());
    decay::check_like_out(*grad_out2, "grad_out2", q, v);
    decay::check_like_out(*out2, "out2", q, v);
  }
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), q.options());
  at::Tensor dv = at::empty(v.sizes(), q.options());
  at::Tensor dv2 = two ? at::empty(v.sizes(), q.options()) : at::empty({0}, q.options());
  at::Tensor dld = decay_grad ? at::empty(log_decay.sizes(), log_decay.options()) : at::empty({0}, q.options());
  if (q.numel() == 0) return {dq, dk, dv, dld, dv2};
  const AxialGeom g = make_geom(q, v, axis);
  const ValueStream first{&v, &grad_out, &out, &dv};
  const ValueStream vs[2] = {first, two ? ValueStream{&*v2, &*grad_out2, &*out2, &dv2} : first};
  attn::dispatch_float(q, "axial_attention_bwd", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    axial_bwd_impl<scalar_t>(g, vs, two ? 2 : 1, q, k, log_decay, lse, decay_grad, static_cast<float>(scale), dq, dk,
                             dld);
  });
  if (decay_grad) decay::zero_nonfinite_grads(dld, log_decay);
  return {dq, dk, dv, dld, dv2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> axial_decay_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_alpha,
    const at::Tensor& log_beta, double scale, bool save_for_backward) {
  check_image_qkv(q, k, v);
  decay::check_decay(log_alpha, "log_alpha", q);
  decay::check_decay(log_beta, "log_beta", q);
  const std::vector<int64_t> oshape = attn::out_shape(q, v);
  std::vector<int64_t> pshape{2};
  pshape.insert(pshape.end(), oshape.begin(), oshape.end());
  std::vector<int64_t> lshape{2};
  lshape.insert(lshape.end(), q.sizes().begin(), q.sizes().begin() + 4);
  at::Tensor out = at::empty(oshape, q.options());
  // Without save_for_backward nothing reads parts or mids: empty, and the kernel stores only out.
  const std::vector<int64_t> sshape = save_for_backward ? pshape : std::vector<int64_t>{0};
  at::Tensor parts = at::empty(sshape, q.options());
  at::Tensor mids = at::empty(sshape, q.options());
  at::Tensor lse = at::empty(lshape, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, parts, mids, lse};
  const ImageDims g = image_dims(q, v);
  attn::dispatch_float(q, "axial_decay_attention_fwd", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    axial_decay_fwd_impl<scalar_t>(g, q, k, v, log_alpha, log_beta, static_cast<float>(scale), out, parts, mids,
                                   lse, save_for_backward);
  });
  return {out, parts, mids, lse};
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "axial_attention_fwd", vitk::Backend::kCpu, &vitk::cpu::axial_attention_fwd);
  VITK_IMPL(m, "axial_attention_bwd", vitk::Backend::kCpu, &vitk::cpu::axial_attention_bwd);
  VITK_IMPL(m, "axial_decay_attention_fwd", vitk::Backend::kCpu, &vitk::cpu::axial_decay_attention_fwd);
}
