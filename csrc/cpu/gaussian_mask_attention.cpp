// CPU kernels of Gaussian-mixture masked attention ("RetNet viewed through convolution"): forward
// and backward on the attention core, with a multiplicative score modifier.
//
// A problem is one (image, head): N = H*W queries against the same N keys. The mask
//   G_h[p, p'] = sum_m w[h, m] exp(-d^2 / (2 s[h, m])),  s = sigma^2 + 1e-5,  d^2 = dy^2 + dx^2,
// depends only on the offset (dy, dx) = (y2 - y1, x2 - x1), so it is tabulated once per call: for
// each head a [2H-1][2W-1] fp32 table indexed by (dy + H-1, dx + W-1), computed in double. For a
// query (y1, x1) the keys of one image row y2 (consecutive tokens x2 = 0..W-1) read the contiguous
// run table[y2 - y1 + H-1][W-1 - x1 + x2 ...]: the modifier multiplies score rows by table runs,
// with whole vectors, and never gathers. The logits are raw * G (raw = q k^T scale, as the paper's
// code multiplies the mask into the scaled scores).
//
// Backward: dRaw = dLogits * G, and dG = dLogits * raw is accumulated into the same [2H-1][2W-1]
// layout. The score loops walk key-row segments outermost when they rewrite a score tile in place
// (consecutive stores then go to different query rows, never to the neighbouring part of the row
// just written, which would stall store forwarding when W is not a multiple of 16), and query rows
// outermost when they accumulate into the table (consecutive segments then hit different table
// rows). The table gradient is folded to [heads][|dy|][|dx|] per fixed chunk of tasks, the chunk
// partials are summed in chunk order (deterministic, independent of the thread count), and finally
// mapped onto the mixture parameters in double:
//   dw[h, m]     = sum_{dy,dx} dG * e,                 e = exp(-d^2 / (2 s))
//   dsigma[h, m] = sum_{dy,dx} dG * w * e * d^2 * sigma / s^2      (d/dsigma of -d^2 / (2 s)).
//
// Schedules as in varlen attention: the forward cuts each problem's queries into chunks (a thread
// keeps a problem's packed keys while its consecutive tasks share it); the backward runs one task
// per problem, or for a few long problems (a rule on shapes only) two passes: key chunks for dk, dv
// and the mixture gradient, then query chunks for dq.
#include "vitk/gaussian_mask_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "vitk/attention_core.h"
#include "vitk/checks.h"
#include "vitk/image_layout.h"
#include "vitk/tiling.h"
#include "vitk/registration.h"

namespace vitk {
namespace cpu {
namespace {

using attn::Buffer;
using attn::pad_lanes;

constexpr double kSigmaEps = 1e-5;  // the paper's 1e-5 added to sigma^2
constexpr int64_t kQueryChunk = 256;
constexpr int64_t kTwoPassMinLen = 512;
constexpr int64_t kTwoPassMaxProblems = 16;

// ------------------------------------------------------------------------------ geometry and mask

struct Geometry : ImageDims {
  int64_t N = 0;
  int64_t TH = 1, LR = 1;        // table rows (2H-1) and row length (2W-1) per head
  std::vector<int32_t> py, px;   // token -> image (y, x)
  std::vector<int64_t> qoff;     // token -> its run offset in the table: (H-1-y) LR + (W-1-x)
  int64_t table_size() const { return TH * LR; }
};

Geometry make_geometry(const at::Tensor& q, const at::Tensor& v) {
  Geometry g;
  static_cast<ImageDims&>(g) = image_dims(q, v);
  g.N = g.H * g.W;
  g.TH = 2 * g.H - 1;
  g.LR = 2 * g.W - 1;
  g.py.resize(g.N);
  g.px.resize(g.N);
  g.qoff.resize(g.N);
  for (int64_t t = 0; t < g.N; ++t) {
    const int64_t y = t / g.W, x = t - y * g.W;
    g.py[t] = static_cast<int32_t>(y);
    g.px[t] = static_cast<int32_t>(x);
    g.qoff[t] = (g.H - 1 - y) * g.LR + (g.W - 1 - x);
  }
  return g;
}

struct Mixture {
  int64_t M = 0;
  std::vector<double> w, sigma;  // [heads][M]
};

Mixture read_mixture(const at::Tensor& mix_weight, const at::Tensor& mix_sigma) {
  Mixture mx;
  mx.M = mix_weight.size(1);
  const at::Tensor w = mix_weight.to(at::kDouble).contiguous();
  const at::Tensor s = mix_sigma.to(at::kDouble).contiguous();
  mx.w.assign(w.data_ptr<double>(), w.data_ptr<double>() + w.numel());
  mx.sigma.assign(s.data_ptr<double>(), s.data_ptr<double>() + s.numel());
  return mx;
}

// [heads][2H-1][2W-1] fp32: G at offset (a - (H-1), c - (W-1)), from the [H][W] values at
// (|dy|, |dx|), computed in double.
std::vector<float> make_table(const Geometry& g, const Mixture& mx) {
  const int64_t H = g.H, W = g.W;
  std::vector<double> folded(H * W);
  std::vector<float> table(g.nh * g.table_size() + attn::kLanes, 0.f);
  for (int64_t h = 0; h < g.nh; ++h) {
    std::fill(folded.begin(), folded.end(), 0.0);
    for (int64_t m = 0; m < mx.M; ++m) {
      const double w = mx.w[h * mx.M + m], sg = mx.sigma[h * mx.M + m];
      const double inv = 1.0 / (2.0 * (sg * sg + kSigmaEps));
      for (int64_t dy = 0; dy < H; ++dy)
        for (int64_t dx = 0; dx < W; ++dx) folded[dy * W + dx] += w * std::exp(-double(dy * dy + dx * dx) * inv);
    }
    float* th = table.data() + h * g.table_size();
    for (int64_t a = 0; a < g.TH; ++a)
      for (int64_t c = 0; c < g.LR; ++c)
        th[a * g.LR + c] = static_cast<float>(folded[std::abs(a - (H - 1)) * W + std::abs(c - (W - 1))]);
  }
  return table;
}

// ------------------------------------------------------------------------------ runs

// x[j] *= g[j], j < len (a key-row segment of a score row; len <= W may be below 16).
inline void mul_run(float* __restrict x, const float* __restrict gv, int64_t len) {
#ifdef __AVX512F__
  using namespace attn::simd;
  int64_t j = 0;
  for (; j + attn::kLanes <= len; j += attn::kLanes) store(x + j, mul(load(x + j), load(gv + j)));
  if (j < len) {
    const __mmask16 m = tail_mask(len - j);
    _mm512_mask_storeu_ps(x + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j), _mm512_maskz_loadu_ps(m, gv + j)));
  }
#else
  for (int64_t j = 0; j < len; ++j) x[j] *= gv[j];
#endif
}

// acc[j] += a[j] * b[j], j < len.
inline void fma_run(float* __restrict acc, const float* __restrict a, const float* __restrict b, int64_t len) {
#ifdef __AVX512F__
  using namespace attn::simd;
  int64_t j = 0;
  for (; j + attn::kLanes <= len; j += attn::kLanes) store(acc + j, fmadd(load(a + j), load(b + j), load(acc + j)));
  if (j < len) {
    const __mmask16 m = tail_mask(len - j);
    const __m512 r = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + j), _mm512_maskz_loadu_ps(m, b + j),
                                     _mm512_maskz_loadu_ps(m, acc + j));
    _mm512_mask_storeu_ps(acc + j, m, r);
  }
#else
  for (int64_t j = 0; j < len; ++j) acc[j] += a[j] * b[j];
#endif
}

// ------------------------------------------------------------------------------ modifier

// Multiplies the scores by the head's mask table runs; the backward also accumulates dLogits * raw
// into dacc (this head's [2H-1][2W-1] accumulator) when asked for parameter gradients.
struct GaussModifier {
  static constexpr bool kNeedsRaw = true;
  const Geometry* g = nullptr;
  const float* table = nullptr;  // [2H-1][2W-1]
  float* dacc = nullptr;         // [2H-1][2W-1] or null
  struct Segment {
    int64_t col, len, koff;  // tile column, length, key-side table offset y2 LR + x2
  };
  std::vector<Segment> segs;

  // Cuts keys [k0, k0+n) at image-row boundaries.
  void segment(int64_t k0, int64_t n) {
    segs.clear();
    const int64_t W = g->W, end = k0 + n;
    for (int64_t j = k0; j < end;) {
      const int64_t y2 = j / W, x2 = j - y2 * W, len = std::min(W - x2, end - j);
      segs.push_back(Segment{j - k0, len, y2 * g->LR + x2});
      j += len;
    }
  }

  void scale_tile(int64_t q0, int64_t m, float* s, int64_t lds) const {
    const int64_t* qoff = g->qoff.data() + q0;
    for (const Segment& sg : segs) {
      const float* base = table + sg.koff;
      float* col = s + sg.col;
      for (int64_t i = 0; i < m; ++i) mul_run(col + i * lds, base + qoff[i], sg.len);
    }
  }

  void forward(int64_t q0, int64_t m, int64_t k0, int64_t n, float* s, int64_t lds) {
    segment(k0, n);
    scale_tile(q0, m, s, lds);
  }

  void backward(int64_t q0, int64_t m, int64_t k0, int64_t n, const float* raw, float* ds, int64_t lds,
                bool params) {
    segment(k0, n);
    if (params && dacc != nullptr) {
      const int64_t* qoff = g->qoff.data() + q0;
      for (int64_t i = 0; i < m; ++i) {
        float* acc = dacc + qoff[i];
        const float* d = ds + i * lds;
        const float* r = raw + i * lds;
        for (const Segment& sg : segs) fma_run(acc + sg.koff, d + sg.col, r + sg.col, sg.len);
      }
    }
    scale_tile(q0, m, ds, lds);
  }
};

// part[h][|dy|][|dx|] += dacc[h][dy + H-1][dx + W-1].
void fold_grad(const Geometry& g, const float* dacc, float* part) {
  const int64_t H = g.H, W = g.W;
  for (int64_t h = 0; h < g.nh; ++h) {
    const float* src = dacc + h * g.table_size();
    float* dst = part + h * H * W;
    for (int64_t a = 0; a < g.TH; ++a) {
      float* drow = dst + std::abs(a - (H - 1)) * W;
      const float* srow = src + a * g.LR;
      for (int64_t c = 0; c < g.LR; ++c) drow[std::abs(c - (W - 1))] += srow[c];
    }
  }
}

// ------------------------------------------------------------------------------ tensors

// Element strides of a [B, H, W, heads, d] tensor; rows addressed by problem-local token index.
template <typename T>
struct View5 {
  const T* base = nullptr;
  int64_t s[5] = {0, 0, 0, 0, 0};
  const Geometry* g = nullptr;
  View5(const at::Tensor& t, const Geometry& geom) : base(t.data_ptr<T>()), g(&geom) {
    for (int i = 0; i < 5; ++i) s[i] = t.stride(i);
  }
  const T* row(int64_t b, int64_t t, int64_t h) const {
    return base + b * s[0] + g->py[t] * s[1] + g->px[t] * s[2] + h * s[3];
  }
  void queue(attn::PrefetchQueue& pq, int64_t b, int64_t t0, int64_t n, int64_t h, int64_t d) const {
    for (int64_t t = t0; t < t0 + n; ++t) {
      if (s[4] == 1) {
        pq.add(row(b, t, h), d * static_cast<int64_t>(sizeof(T)));
      } else {
        for (int64_t e = 0; e < d; ++e) pq.add(row(b, t, h) + e * s[4], sizeof(T));
      }
    }
  }
};

struct Task {
  int64_t b, h, begin, end;
};

// Nearly equal chunks of at most `chunk` rows, each starting on a multiple of `align`.
void add_chunks(std::vector<Task>& tasks, int64_t b, int64_t h, int64_t len, int64_t chunk, int64_t align) {
  const int64_t pieces = ceil_div(len, chunk);
  for (int64_t p = 0; p < pieces; ++p) {
    const Range r = split_range(len, pieces, p, align);
    if (r.size() > 0) tasks.push_back(Task{b, h, r.begin, r.end});
  }
}

// Rows [r) of problem (b, h) into a contiguous [B, N, heads, d] output, times mult.
template <typename T>
void store_rows(T* dst, const Geometry& g, int64_t b, int64_t h, Range r, const float* src, int64_t ld, int64_t d,
                float mult) {
  for (int64_t i = r.begin; i < r.end; ++i) {
    T* o = dst + ((b * g.N + i) * g.nh + h) * d;
    const float* sr = src + i * ld;
    for (int64_t e = 0; e < d; ++e) o[e] = static_cast<T>(sr[e] * mult);
  }
}

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mix_weight,
                const at::Tensor& mix_sigma) {
  check_image_qkv(q, k, v);
  for (auto [t, name] :
       {std::pair<const at::Tensor&, const char*>{mix_weight, "mix_weight"}, {mix_sigma, "mix_sigma"}}) {
    check_dtype_in(t, name, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
    check_same_device(q, "q", t, name);
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == q.size(3) && t.size(1) >= 1, name, ": expected shape [heads, M] = [",
                      q.size(3), ", M] with M >= 1, got ", t.sizes());
  }
  TORCH_CHECK_VALUE(mix_sigma.sizes() == mix_weight.sizes(), "mix_sigma: expected the shape of mix_weight ",
                    mix_weight.sizes(), ", got ", mix_sigma.sizes());
}

// ------------------------------------------------------------------------------ forward

template <typename T>
void gauss_fwd_impl(const Geometry& g, const std::vector<float>& table, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, float scale, at::Tensor& out, at::Tensor& lse) {
  const View5<T> qv(q, g), kv(k, g), vv(v, g);
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const int64_t N = g.N, nh = g.nh, dqk = g.dqk, dv = g.dv;
  const int64_t ldq = dqk, ldv = pad_lanes(dv), ldkt = pad_lanes(N);
  std::vector<Task> tasks;
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t h = 0; h < nh; ++h) add_chunks(tasks, b, h, N, kQueryChunk, 1);
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  attn::run_workers(ntasks, [&](attn::TaskSource& source) {
    Buffer qb, ktb, vb, ob, lb;
    attn::Scratch ws;
    attn::PrefetchQueue pq;
    float* qs = qb.grow(N * ldq);
    // Padding columns of kt and lanes of v are never written by the packing: zero them once.
    float* kts = ktb.zeros(dqk * ldkt);
    float* vs = vb.zeros(N * ldv);
    float* os = ob.grow(N * ldv);
    float* ls = lb.grow(N);
    GaussModifier mod;
    mod.g = &g;
    int64_t cb = -1, ch = -1;
    Range batch;
    while (source.next(batch)) {
      for (int64_t ti = batch.begin; ti < batch.end; ++ti) {
        const Task& t = tasks[ti];
        pq.clear();
        if (ti + 1 < batch.end) {
          const Task& nt = tasks[ti + 1];
          if (nt.b != t.b || nt.h != t.h) {
            qv.queue(pq, nt.b, 0, N, nt.h, dqk);
            kv.queue(pq, nt.b, 0, N, nt.h, dqk);
            vv.queue(pq, nt.b, 0, N, nt.h, dv);
          }
        }
        pq.plan(t.end - t.begin);
        if (t.b != cb || t.h != ch) {
          cb = t.b;
          ch = t.h;
          auto rows = [&](const View5<T>& vw) {
            return [&, vw](int64_t i) -> const T* { return vw.row(t.b, i, t.h); };
          };
          attn::pack_rows<T>(N, dqk, qv.s[4], rows(qv), scale, qs, ldq);
          attn::pack_cols<T>(N, dqk, kv.s[4], rows(kv), kts, ldkt);
          attn::pack_rows<T>(N, dv, vv.s[4], rows(vv), 1.f, vs, ldv);
        }
        attn::FwdProblem p{.M = N, .N = N, .dqk = dqk, .dv = dv, .q = qs, .ldq = ldq, .kt = kts, .ldkt = ldkt,
                           .v = vs, .ldv = ldv, .o = os, .ldo = ldv, .lse = ls, .prefetch = &pq};
        mod.table = table.data() + t.h * g.table_size();
        attn::attention_forward(p, mod, ws, Range{t.begin, t.end});
        pq.drain();
        store_rows(op, g, t.b, t.h, Range{t.begin, t.end}, os, ldv, dv, 1.f);
        for (int64_t i = t.begin; i < t.end; ++i) lp[(t.b * N + i) * nh + t.h] = ls[i];
      }
    }
  });
}

// ------------------------------------------------------------------------------ backward

// One (image, head) problem packed for the backward, with its accumulators.
struct BwdPack {
  Buffer q, k, kt, vt, dout, lse, drow, dq, dk, dv;
  int64_t b = -1, h = -1, ldq = 0, ldkt = 0, ldv = 0;
};

template <typename T>
void pack_problem(BwdPack& pk, const Geometry& g, int64_t b, int64_t h, const View5<T>& qv, const View5<T>& kv,
                  const View5<T>& vv, const View5<T>& gv, const View5<T>& ov, const float* lp, const int64_t* ls,
                  float scale) {
  const int64_t N = g.N, dqk = g.dqk, dv = g.dv;
  pk.b = b;
  pk.h = h;
  pk.ldq = pad_lanes(dqk);
  pk.ldkt = pad_lanes(N);
  pk.ldv = pad_lanes(dv);
  auto rows = [&](const View5<T>& vw) { return [&, vw](int64_t i) -> const T* { return vw.row(b, i, h); }; };
  attn::pack_rows<T>(N, dqk, qv.s[4], rows(qv), scale, pk.q.zeros(N * pk.ldq), pk.ldq);
  attn::pack_rows<T>(N, dqk, kv.s[4], rows(kv), 1.f, pk.k.zeros(N * pk.ldq), pk.ldq);
  attn::pack_cols<T>(N, dqk, kv.s[4], rows(kv), pk.kt.zeros(dqk * pk.ldkt), pk.ldkt);
  attn::pack_cols<T>(N, dv, vv.s[4], rows(vv), pk.vt.zeros(dv * pk.ldkt), pk.ldkt);
  float* dos = pk.dout.zeros(N * pk.ldv);
  attn::pack_rows<T>(N, dv, gv.s[4], rows(gv), 1.f, dos, pk.ldv);
  // O goes through the dq buffer (unused until the backward starts) to get Drow by vector dots.
  float* os = pk.dq.zeros(N * std::max(pk.ldq, pk.ldv));
  attn::pack_rows<T>(N, dv, ov.s[4], rows(ov), 1.f, os, pk.ldv);
  float* lse = pk.lse.grow(N);
  float* dr = pk.drow.grow(N);
  for (int64_t i = 0; i < N; ++i) {
    lse[i] = lp[b * ls[0] + g.py[i] * ls[1] + g.px[i] * ls[2] + h * ls[3]];
    dr[i] = attn::simd::row_dot(dos + i * pk.ldv, os + i * pk.ldv, dv);
  }
  pk.dk.grow(N * pk.ldq);
  pk.dv.grow(N * pk.ldv);
}

attn::BwdProblem problem_of(const BwdPack& pk, const Geometry& g) {
  attn::BwdProblem p{.M = g.N, .N = g.N, .dqk = g.dqk, .dv = g.dv, .q = pk.q.data(), .k = pk.k.data(), .ldq = pk.ldq,
                     .kt = pk.kt.data(), .vt = pk.vt.data(), .ldkt = pk.ldkt, .dout = pk.dout.data(), .ldv = pk.ldv,
                     .lse = pk.lse.data(), .drow = pk.drow.data(), .dq = pk.dq.data(), .dk = pk.dk.data(),
                     .dvv = pk.dv.data()};
  return p;
}

// Chunks of consecutive tasks that share one mixture-gradient partial: a rule on the task count
// alone, so the summation order never depends on the thread count. Enough chunks for every thread
// of a large machine, at most 1024 partials.
int64_t param_chunk(int64_t ntasks) {
  return std::max<int64_t>(ceil_div(ntasks, 1024), std::min<int64_t>(8, ceil_div(ntasks, 64)));
}

template <typename T>
void gauss_bwd_impl(const Geometry& g, const std::vector<float>& table, const at::Tensor& go, const at::Tensor& q,
                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                    float scale, bool want_params, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv_t,
                    std::vector<float>& partials, int64_t& nchunks_out) {
  const View5<T> qv(q, g), kv(k, g), vv(v, g), gv(go, g), ov(out, g);
  const float* lp = lse.data_ptr<float>();
  const int64_t ls[4] = {lse.stride(0), lse.stride(1), lse.stride(2), lse.stride(3)};
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv_t.data_ptr<T>();
  const int64_t N = g.N, nh = g.nh, dqk = g.dqk, dv = g.dv;
  const int64_t TL = g.table_size(), part_size = nh * g.H * g.W;
  const bool two_pass = N >= kTwoPassMinLen && g.B * nh < kTwoPassMaxProblems;

  // Runs `tasks` in chunks of `chunk` consecutive tasks (each chunk on one thread, in order), with a
  // per-thread problem cache; with params, each chunk folds its mixture gradient into its partial.
  auto run = [&](const std::vector<Task>& tasks, bool params, auto&& body) {
    const int64_t ntasks = static_cast<int64_t>(tasks.size());
    const int64_t chunk = params ? param_chunk(ntasks) : 1;
    const int64_t nchunks = ceil_div(ntasks, chunk);
    if (params) {
      partials.assign(nchunks * part_size, 0.f);
      nchunks_out = nchunks;
    }
    attn::run_workers(nchunks, [&](attn::TaskSource& source) {
      BwdPack pk;
      attn::Scratch ws;
      attn::PrefetchQueue pq;
      Buffer dab;
      float* dacc = params ? dab.grow(nh * TL) : nullptr;
      GaussModifier mod;
      mod.g = &g;
      Range batch;
      while (source.next(batch)) {
        const int64_t tb = batch.begin * chunk, te = std::min(ntasks, batch.end * chunk);
        for (int64_t ti = tb; ti < te; ++ti) {
          if (dacc != nullptr && ti % chunk == 0) std::fill(dacc, dacc + nh * TL, 0.f);
          const Task& t = tasks[ti];
          if (t.b != pk.b || t.h != pk.h) pack_problem<T>(pk, g, t.b, t.h, qv, kv, vv, gv, ov, lp, ls, scale);
          pq.clear();
          if (ti + 1 < te && (tasks[ti + 1].b != t.b || tasks[ti + 1].h != t.h)) {
            const Task& nt = tasks[ti + 1];
            qv.queue(pq, nt.b, 0, N, nt.h, dqk);
            kv.queue(pq, nt.b, 0, N, nt.h, dqk);
            vv.queue(pq, nt.b, 0, N, nt.h, dv);
            gv.queue(pq, nt.b, 0, N, nt.h, dv);
            ov.queue(pq, nt.b, 0, N, nt.h, dv);
          }
          pq.plan(t.end - t.begin);
          mod.table = table.data() + t.h * TL;
          mod.dacc = dacc != nullptr ? dacc + t.h * TL : nullptr;
          attn::BwdProblem p = problem_of(pk, g);
          p.prefetch = &pq;
          body(pk, ws, mod, p, t);
          pq.drain();
          if (dacc != nullptr && (ti % chunk == chunk - 1 || ti + 1 == ntasks))
            fold_grad(g, dacc, partials.data() + (ti / chunk) * part_size);
        }
      }
    });
  };

  if (!two_pass) {
    std::vector<Task> tasks;
    for (int64_t b = 0; b < g.B; ++b)
      for (int64_t h = 0; h < nh; ++h) tasks.push_back(Task{b, h, 0, N});
    run(tasks, want_params, [&](BwdPack& pk, attn::Scratch& ws, GaussModifier& mod, attn::BwdProblem& p,
                                const Task& t) {
      std::fill(pk.dq.data(), pk.dq.data() + N * pk.ldq, 0.f);
      std::fill(pk.dk.data(), pk.dk.data() + N * pk.ldq, 0.f);
      std::fill(pk.dv.data(), pk.dv.data() + N * pk.ldv, 0.f);
      attn::attention_backward(p, mod, ws, Range{0, N}, Range{0, N}, attn::kAll);
      store_rows(dqp, g, t.b, t.h, Range{0, N}, pk.dq.data(), pk.ldq, dqk, scale);
      store_rows(dkp, g, t.b, t.h, Range{0, N}, pk.dk.data(), pk.ldq, dqk, 1.f);
      store_rows(dvp, g, t.b, t.h, Range{0, N}, pk.dv.data(), pk.ldv, dv, 1.f);
    });
    return;
  }

  // Pass A: key chunks (on the core's key-tile grid) -> dk, dv and the mixture gradient.
  // Pass B: query chunks -> dq.
  std::vector<Task> key_tasks, query_tasks;
  for (int64_t b = 0; b < g.B; ++b)
    for (int64_t h = 0; h < nh; ++h) {
      add_chunks(key_tasks, b, h, N, kQueryChunk, attn::key_tile(N));
      add_chunks(query_tasks, b, h, N, kQueryChunk, 1);
    }
  run(key_tasks, want_params, [&](BwdPack& pk, attn::Scratch& ws, GaussModifier& mod, attn::BwdProblem& p,
                                  const Task& t) {
    const Range kr{t.begin, t.end};
    std::fill(pk.dk.data() + kr.begin * pk.ldq, pk.dk.data() + kr.end * pk.ldq, 0.f);
    std::fill(pk.dv.data() + kr.begin * pk.ldv, pk.dv.data() + kr.end * pk.ldv, 0.f);
    attn::attention_backward(p, mod, ws, Range{0, N}, kr, attn::kKeyValue | attn::kParams);
    store_rows(dkp, g, t.b, t.h, kr, pk.dk.data(), pk.ldq, dqk, 1.f);
    store_rows(dvp, g, t.b, t.h, kr, pk.dv.data(), pk.ldv, dv, 1.f);
  });
  run(query_tasks, false, [&](BwdPack& pk, attn::Scratch& ws, GaussModifier& mod, attn::BwdProblem& p,
                              const Task& t) {
    const Range qr{t.begin, t.end};
    std::fill(pk.dq.data() + qr.begin * pk.ldq, pk.dq.data() + qr.end * pk.ldq, 0.f);
    attn::attention_backward(p, mod, ws, qr, Range{0, N}, attn::kQuery);
    store_rows(dqp, g, t.b, t.h, qr, pk.dq.data(), pk.ldq, dqk, scale);
  });
}

// dG summed over everything, [heads][|dy|][|dx|] in double, onto the mixture parameters.
void mixture_grads(const Geometry& g, const Mixture& mx, const std::vector<double>& dg, std::vector<double>& dw,
                   std::vector<double>& dsig) {
  const int64_t H = g.H, W = g.W, M = mx.M;
  dw.assign(g.nh * M, 0.0);
  dsig.assign(g.nh * M, 0.0);
  for (int64_t h = 0; h < g.nh; ++h)
    for (int64_t m = 0; m < M; ++m) {
      const double w = mx.w[h * M + m], sg = mx.sigma[h * M + m];
      const double s = sg * sg + kSigmaEps, inv = 1.0 / (2.0 * s);
      const double dsig_scale = w * sg / (s * s);
      double aw = 0.0, as = 0.0;
      for (int64_t dy = 0; dy < H; ++dy)
        for (int64_t dx = 0; dx < W; ++dx) {
          const double d2 = double(dy * dy + dx * dx);
          const double e = std::exp(-d2 * inv);
          const double t = dg[(h * H + dy) * W + dx];
          aw += t * e;
          as += t * e * d2;
        }
      dw[h * M + m] = aw;
      dsig[h * M + m] = as * dsig_scale;
    }
}

at::Tensor to_param(const std::vector<double>& vals, const at::Tensor& like) {
  at::Tensor t = at::empty(like.sizes(), like.options());
  t.copy_(at::from_blob(const_cast<double*>(vals.data()), like.sizes(), at::TensorOptions().dtype(at::kDouble)));
  return t;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gaussian_mask_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const at::Tensor& mix_weight,
                                                               const at::Tensor& mix_sigma, double scale) {
  check_args(q, k, v, mix_weight, mix_sigma);
  std::vector<int64_t> oshape(q.sizes().begin(), q.sizes().end());
  oshape[4] = v.size(4);
  at::Tensor out = at::empty(oshape, q.options());
  at::Tensor lse = at::empty(q.sizes().slice(0, 4), q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const Geometry g = make_geometry(q, v);
  const std::vector<float> table = make_table(g, read_mixture(mix_weight, mix_sigma));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gaussian_mask_attention_fwd", [&] {
    gauss_fwd_impl<scalar_t>(g, table, q, k, v, static_cast<float>(scale), out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_mask_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& mix_weight, const at::Tensor& mix_sigma, const at::Tensor& out, const at::Tensor& lse,
    double scale, bool mix_grad) {
  check_args(q, k, v, mix_weight, mix_sigma);
  std::vector<int64_t> oshape(q.sizes().begin(), q.sizes().end());
  oshape[4] = v.size(4);
  check_like(grad_out, "grad_out", q, oshape);
  check_like(out, "out", q, oshape);
  check_lse_like(lse, q, q.sizes().slice(0, 4));
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), q.options());
  at::Tensor dv = at::empty(oshape, q.options());
  if (q.numel() == 0) {
    // No token, no gradient: the mixture gradients are zero.
    at::Tensor dw = mix_grad ? at::zeros(mix_weight.sizes(), mix_weight.options()) : at::empty({0}, q.options());
    at::Tensor ds = mix_grad ? at::zeros(mix_sigma.sizes(), mix_sigma.options()) : at::empty({0}, q.options());
    return {dq, dk, dv, dw, ds};
  }
  const Geometry g = make_geometry(q, v);
  const Mixture mx = read_mixture(mix_weight, mix_sigma);
  const std::vector<float> table = make_table(g, mx);
  std::vector<float> partials;
  int64_t nchunks = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "gaussian_mask_attention_bwd", [&] {
    gauss_bwd_impl<scalar_t>(g, table, grad_out, q, k, v, out, lse, static_cast<float>(scale), mix_grad, dq, dk, dv,
                             partials, nchunks);
  });
  if (!mix_grad) return {dq, dk, dv, at::empty({0}, q.options()), at::empty({0}, q.options())};
  // Partials in chunk order: a fixed summation order whatever the thread count.
  const int64_t part_size = g.nh * g.H * g.W;
  std::vector<double> dg(part_size, 0.0);
  for (int64_t c = 0; c < nchunks; ++c) {
    const float* part = partials.data() + c * part_size;
    for (int64_t i = 0; i < part_size; ++i) dg[i] += part[i];
  }
  std::vector<double> dw, dsig;
  mixture_grads(g, mx, dg, dw, dsig);
  return {dq, dk, dv, to_param(dw, mix_weight), to_param(dsig, mix_sigma)};
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "gaussian_mask_attention_fwd", vitk::Backend::kCpu, &vitk::cpu::gaussian_mask_attention_fwd);
  VITK_IMPL(m, "gaussian_mask_attention_bwd", vitk::Backend::kCpu, &vitk::cpu::gaussian_mask_attention_bwd);
}
