// CPU kernels of shifted-window attention (Swin): forward and backward on the attention core.
//
// One task is one (image, window, group of heads); heads run inside it, one core problem each. The
// window's tokens are found by arithmetic on the window grid -- padded coordinate (wy*wh + r,
// wx*ww + c), absent past the image edge, otherwise the image token shifted back by (sh, sw)
// modulo the image -- and gathered straight from q, k, v through their strides into small fp32
// tiles, so the rolled, padded and partitioned copies of the reference never exist and a packed
// qkv tensor is read in place. While a task computes, the next task's cache lines are prefetched a
// few per query row (attn::PrefetchQueue). A window of up to 256 tokens is one key tile of the
// core, so its softmax is exact in one pass; larger windows go through the online softmax.
//
// The score modifier adds the relative-position bias and the shift/padding mask. The bias is read
// from BiasRows, the table laid out per (head, query column) so that one query's biases against
// all keys are one contiguous run: no gather, no [heads, N, N] expansion. Only windows in the last
// window row or column differ in mask (the region test and the padding), so the masks of the four
// window kinds are built once per call (at most 3 [N, N] tiles) and interior windows add none.
//
// Backward: the bias gradient is the sum of dLogits over every window and image. Tasks are cut into
// fixed chunks; each chunk accumulates its dLogits with the same contiguous runs into a BiasRows-
// shaped fp32 buffer, folds it into a table-shaped partial at the chunk's end, and the partials are
// summed in chunk order -- deterministic, and independent of the thread count.
#include "vitk/window_attention.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vitk/attention_driver.h"
#include "vitk/checks.h"
#include "vitk/image_layout.h"
#include "vitk/registration.h"
#include "vitk/tiling.h"

namespace vitk {
namespace cpu {
namespace {

using attn::Buffer;
using attn::kNegInf;
using attn::kPosInf;
using attn::pad_lanes;

// The -100 of timm's shifted-window mask (not -inf: a token still sees a little of its
// neighbours from the other side of the roll).
constexpr float kShiftMask = -100.f;

// ------------------------------------------------------------------------------ geometry

struct Geometry : ImageDims {
  int64_t wh = 1, ww = 1, sh = 0, sw = 0;
  int64_t N = 1, nWh = 0, nWw = 0, nW = 0, Hp = 0, Wp = 0;
  int64_t TW = 1;                   // 2ww - 1: one row of the bias table
  bool shifted = false;
  std::vector<int64_t> ysrc, xsrc;  // padded coordinate -> image coordinate, -1 when absent
  std::vector<int32_t> pos_r, pos_c;  // in-window position -> (r, c)
  std::vector<float> extra[4];      // [N][N] mask of each window kind (0, -100, -inf); empty: none
  // Tasks: (image, window, group of heads), heads innermost. Heads are grouped only when there are
  // too few windows to feed the threads; the rule depends on shapes alone.
  int64_t hpg = 1, G = 1, tasks = 0;

  // Window kind: 0 interior, +1 in the last window column, +2 in the last window row.
  int kind(int64_t wy, int64_t wx) const { return (wy == nWh - 1 ? 2 : 0) + (wx == nWw - 1 ? 1 : 0); }
  const float* extra_of(int kd) const { return extra[kd].empty() ? nullptr : extra[kd].data(); }
};

constexpr int64_t kMinTasks = 32;

// Region of padded coordinate p along one axis: timm's slices (0, -w), (-w, -s), (-s, None) of the
// padded extent P; one region when the axis is not shifted.
inline int region(int64_t p, int64_t P, int64_t w, int64_t s) {
  if (s == 0) return 0;
  if (p < P - w) return 0;
  if (p < P - s) return 1;
  return 2;
}

Geometry make_geometry(const at::Tensor& q, const at::Tensor& v, int64_t wh, int64_t ww, int64_t sh, int64_t sw) {
  Geometry g;
  static_cast<ImageDims&>(g) = image_dims(q, v);
  g.wh = wh;
  g.ww = ww;
  g.sh = sh;
  g.sw = sw;
  g.N = wh * ww;
  g.TW = 2 * ww - 1;
  g.nWh = ceil_div(g.H, wh);
  g.nWw = ceil_div(g.W, ww);
  g.nW = g.nWh * g.nWw;
  g.Hp = g.nWh * wh;
  g.Wp = g.nWw * ww;
  g.shifted = sh != 0 || sw != 0;
  const int64_t windows = g.B * g.nW;
  if (windows > 0 && g.nh > 0) {
    const int64_t want_groups = std::min<int64_t>(g.nh, ceil_div(kMinTasks, windows));
    g.hpg = ceil_div(g.nh, want_groups);
    g.G = ceil_div(g.nh, g.hpg);
    g.tasks = windows * g.G;
  }
  const int64_t N = g.N;
  g.ysrc.resize(g.Hp);
  g.xsrc.resize(g.Wp);
  for (int64_t y = 0; y < g.Hp; ++y) g.ysrc[y] = y < g.H ? (y + sh) % g.H : -1;
  for (int64_t x = 0; x < g.Wp; ++x) g.xsrc[x] = x < g.W ? (x + sw) % g.W : -1;
  g.pos_r.resize(N);
  g.pos_c.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    g.pos_r[i] = static_cast<int32_t>(i / ww);
    g.pos_c[i] = static_cast<int32_t>(i % ww);
  }
  if (g.nW == 0) return g;
  std::vector<int> reg(N);
  std::vector<char> valid(N);
  for (int kd = 0; kd < 4; ++kd) {
    // Any window of a kind stands for all of them: away from the last row/column every position is
    // in region 0 and inside the image.
    const int64_t wy = (kd & 2) ? g.nWh - 1 : 0, wx = (kd & 1) ? g.nWw - 1 : 0;
    if (g.kind(wy, wx) != kd) continue;  // no window of this kind
    bool any = false;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t y = wy * wh + g.pos_r[i], x = wx * ww + g.pos_c[i];
      valid[i] = y < g.H && x < g.W;
      reg[i] = 3 * region(y, g.Hp, wh, sh) + region(x, g.Wp, ww, sw);
      any = any || !valid[i] || (g.shifted && reg[i] != reg[0]);
    }
    if (!any) continue;  // a kind without padding or region boundary adds nothing
    std::vector<float>& e = g.extra[kd];
    e.assign(N * N + attn::kLanes, 0.f);  // + padding for the vector tail
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) {
        float val = 0.f;
        if (!valid[j]) val = kNegInf;
        else if (g.shifted && reg[i] != reg[j]) val = kShiftMask;
        e[i * N + j] = val;
      }
  }
  return g;
}

// The bias table laid out so that the biases of one query against consecutive keys are consecutive
// floats. For query (ri, ci) and key (rj, cj) the table row is ri - rj + wh - 1 and the column
// ci - cj + ww - 1; with a = wh - 1 - ri + rj, store E[h][ci][a * ww + cj] = table[(2wh-2-a) * (2ww-1)
// + (ww-1 + ci - cj)][h]. Then query (ri, ci)'s row of biases against keys j = rj * ww + cj is
// E[h][ci][(wh-1-ri) * ww + j], a contiguous run of N floats, added with whole vectors. E holds
// (2wh-1) ww floats per (head, ci) -- the table times ww, never [heads, N, N] -- plus 16 floats of
// padding for the vector tail.
struct BiasRows {
  int64_t LE = 0;  // floats per (head, ci) row, padded
  std::vector<float> e;
  const float* head(const Geometry& g, int64_t h) const { return e.data() + h * g.ww * LE; }
};

inline int64_t bias_row_len(const Geometry& g) { return (2 * g.wh - 1) * g.ww + attn::kLanes; }

BiasRows make_bias_rows(const Geometry& g, const at::Tensor& bias) {
  const at::Tensor t = bias.to(at::kFloat).contiguous();
  const float* src = t.data_ptr<float>();
  const int64_t TH = 2 * g.wh - 1, TW = g.TW, nh = g.nh, ww = g.ww;
  BiasRows br;
  br.LE = bias_row_len(g);
  br.e.assign(nh * ww * br.LE, 0.f);
  for (int64_t h = 0; h < nh; ++h)
    for (int64_t ci = 0; ci < ww; ++ci) {
      float* row = br.e.data() + (h * ww + ci) * br.LE;
      for (int64_t a = 0; a < TH; ++a)
        for (int64_t cj = 0; cj < ww; ++cj) row[a * ww + cj] = src[((TH - 1 - a) * TW + (ww - 1 + ci - cj)) * nh + h];
    }
  return br;
}

struct TaskIndex {
  int64_t b = 0, wy = 0, wx = 0, h0 = 0, h1 = 0;
};

// Task t = (b * nW + window) * G + head group.
TaskIndex decode_task(const Geometry& g, int64_t task) {
  TaskIndex t;
  const int64_t grp = task % g.G, bw = task / g.G, w = bw % g.nW;
  t.b = bw / g.nW;
  t.wy = w / g.nWw;
  t.wx = w % g.nWw;
  t.h0 = grp * g.hpg;
  t.h1 = std::min(g.nh, t.h0 + g.hpg);
  return t;
}

// A token view that also queues a token's head rows for prefetching.
template <typename T>
struct View5 : TokenView<T> {
  using TokenView<T>::s;
  using TokenView<T>::row;
  int64_t d = 0;
  explicit View5(const at::Tensor& t) : TokenView<T>(t), d(t.size(4)) {}
  // Queues the cache lines of heads [h0, h1) of one token: one run when the heads are contiguous.
  void queue(attn::PrefetchQueue& pq, int64_t b, int64_t y, int64_t x, int64_t h0, int64_t h1) const {
    if (s[4] == 1 && s[3] == d) {
      pq.add(row(b, y, x, h0), (h1 - h0) * d * static_cast<int64_t>(sizeof(T)));
      return;
    }
    for (int64_t h = h0; h < h1; ++h) TokenView<T>::queue(pq, row(b, y, x, h), d);
  }
};

// The image tokens of one window: image (y, x) per in-window position, y = -1 when absent.
struct WindowTokens {
  std::vector<int64_t> y, x;
  explicit WindowTokens(int64_t N) : y(N), x(N) {}
  void locate(const Geometry& g, int64_t wy, int64_t wx) {
    const int64_t* ys = g.ysrc.data() + wy * g.wh;
    const int64_t* xs = g.xsrc.data() + wx * g.ww;
    for (int64_t i = 0; i < g.N; ++i) {
      const int64_t yy = ys[g.pos_r[i]], xx = xs[g.pos_c[i]];
      const bool ok = yy >= 0 && xx >= 0;
      y[i] = ok ? yy : -1;
      x[i] = ok ? xx : -1;
    }
  }
  bool present(int64_t i) const { return y[i] >= 0; }
  // Queues what task t reads from `ins` and writes to the contiguous [B, H, W, heads, width] outputs
  // (widths in `outw`, in elements of T).
  template <typename T, size_t NI, size_t NO>
  void queue(attn::PrefetchQueue& pq, const Geometry& g, const TaskIndex& t, const View5<T>* const (&ins)[NI],
             T* const (&outs)[NO], const int64_t (&outw)[NO]) const {
    for (size_t i = 0; i < y.size(); ++i) {
      if (y[i] < 0) continue;
      for (const View5<T>* in : ins) in->queue(pq, t.b, y[i], x[i], t.h0, t.h1);
      const int64_t tok = (t.b * g.H + y[i]) * g.W + x[i];
      for (size_t o = 0; o < NO; ++o)
        pq.add(outs[o] + (tok * g.nh + t.h0) * outw[o], (t.h1 - t.h0) * outw[o] * static_cast<int64_t>(sizeof(T)));
    }
  }
};

// A worker's walk over its tasks: the current task's window tokens, and the next task's, located and
// queued for prefetching (what it reads from `ins`, what it writes to `outs`) while the current one
// computes.
template <typename T, size_t NI, size_t NO>
struct WindowWalk {
  const Geometry& g;
  const View5<T>* const (&ins)[NI];
  T* const (&outs)[NO];
  const int64_t (&outw)[NO];
  WindowTokens tok, next;
  int64_t located = -1;  // the task whose tokens tok holds
  WindowWalk(const Geometry& geom, const View5<T>* const (&in)[NI], T* const (&out)[NO], const int64_t (&w)[NO])
      : g(geom), ins(in), outs(out), outw(w), tok(geom.N), next(geom.N) {}

  // Task ti, with its tokens in tok; next's rows queued and planned over ti's query rows.
  TaskIndex start(int64_t ti, int64_t nt, attn::PrefetchQueue& pq) {
    const TaskIndex cur = decode_task(g, ti);
    if (located != ti) tok.locate(g, cur.wy, cur.wx);
    located = -1;
    if (nt >= 0) {
      const TaskIndex n = decode_task(g, nt);
      next.locate(g, n.wy, n.wx);
      next.queue(pq, g, n, ins, outs, outw);
      located = nt;
    }
    pq.plan((cur.h1 - cur.h0) * g.N);
    return cur;
  }
  void finish() { std::swap(tok, next); }

  // Row i of head h of the current window in `t` (null for an absent token, which packs as zeros).
  auto rows(const View5<T>& t, int64_t b, int64_t h) const {
    return [this, &t, b, h](int64_t i) -> const T* {
      return tok.present(i) ? t.row(b, tok.y[i], tok.x[i], h) : nullptr;
    };
  }
  // The output row of in-window token i (present) of image b.
  int64_t token(int64_t b, int64_t i) const { return (b * g.H + tok.y[i]) * g.W + tok.x[i]; }
};

// ------------------------------------------------------------------------------ modifier

// Adds the relative-position bias (a contiguous run of BiasRows per query) and the window kind's
// mask. The backward accumulates dLogits into dE, shaped like this head's BiasRows, by the same
// runs; fold_bias_grad maps dE back onto the table once per chunk of windows.
struct WindowModifier {
  static constexpr bool kNeedsRaw = false;
  const Geometry* g = nullptr;
  const float* rows = nullptr;   // this head's BiasRows [ww][LE], or null
  const float* extra = nullptr;  // [N][N] (+16 padding) this window kind's mask, or null
  float* dacc = nullptr;         // [ww][LE] this head's accumulator, or null
  int64_t LE = 0;

  const float* bias_run(int64_t qi, int64_t k0) const {
    return rows + g->pos_c[qi] * LE + (g->wh - 1 - g->pos_r[qi]) * g->ww + k0;
  }

  void forward(int64_t q0, int64_t m, int64_t k0, int64_t n, float* s, int64_t lds) const {
    if (rows != nullptr && extra != nullptr) {
      for (int64_t i = 0; i < m; ++i)
        attn::simd::add2_padded(s + i * lds, bias_run(q0 + i, k0), extra + (q0 + i) * g->N + k0, n);
    } else if (rows != nullptr) {
      for (int64_t i = 0; i < m; ++i) attn::simd::add_padded(s + i * lds, bias_run(q0 + i, k0), n);
    } else if (extra != nullptr) {
      for (int64_t i = 0; i < m; ++i) attn::simd::add_padded(s + i * lds, extra + (q0 + i) * g->N + k0, n);
    }
  }

  // dLogits of padding lanes are exact zeros (P = 0 there), so whole-vector accumulation is safe.
  void backward(int64_t q0, int64_t m, int64_t k0, int64_t n, const float*, float* ds, int64_t lds,
                bool params) const {
    if (!params || dacc == nullptr) return;
    for (int64_t i = 0; i < m; ++i) {
      const int64_t qi = q0 + i;
      attn::simd::add_padded(dacc + g->pos_c[qi] * LE + (g->wh - 1 - g->pos_r[qi]) * g->ww + k0, ds + i * lds, n);
    }
  }
};

// The modifier of task t's window kind; its bias rows are bound per head.
WindowModifier window_modifier(const Geometry& g, const TaskIndex& t) {
  WindowModifier mod;
  mod.g = &g;
  mod.extra = g.extra_of(g.kind(t.wy, t.wx));
  return mod;
}

// part[h][(2wh-2-a) * (2ww-1) + (ww-1 + ci - cj)] += dE[h][ci][a * ww + cj] (see BiasRows).
void fold_bias_grad(const Geometry& g, const float* dacc, int64_t LE, float* part) {
  const int64_t TH = 2 * g.wh - 1, ww = g.ww, TW = g.TW, TT = TH * TW;
  for (int64_t h = 0; h < g.nh; ++h)
    for (int64_t ci = 0; ci < ww; ++ci) {
      const float* row = dacc + (h * ww + ci) * LE;
      float* dst = part + h * TT;
      for (int64_t a = 0; a < TH; ++a)
        for (int64_t cj = 0; cj < ww; ++cj) dst[(TH - 1 - a) * TW + (ww - 1 + ci - cj)] += row[a * ww + cj];
    }
}

// ------------------------------------------------------------------------------ checks

// (wh, ww, sh, sw) from the schema's int[2] window_size and shift_size, checked.
struct WindowArgs {
  int64_t wh, ww, sh, sw;
};

WindowArgs window_args(at::IntArrayRef window_size, at::IntArrayRef shift_size) {
  TORCH_CHECK_VALUE(window_size.size() == 2, "window_size: expected two integers, got ", window_size);
  TORCH_CHECK_VALUE(shift_size.size() == 2, "shift_size: expected two integers, got ", shift_size);
  const WindowArgs a{window_size[0], window_size[1], shift_size[0], shift_size[1]};
  TORCH_CHECK_VALUE(a.wh >= 1 && a.ww >= 1, "window_size: expected positive sizes, got ", window_size);
  TORCH_CHECK_VALUE(a.sh >= 0 && a.sh < a.wh && a.sw >= 0 && a.sw < a.ww,
                    "shift_size: expected 0 <= shift < window per axis, got ", shift_size, " for window ",
                    window_size);
  return a;
}

WindowArgs check_window_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             at::IntArrayRef window_size, at::IntArrayRef shift_size,
                             const c10::optional<at::Tensor>& bias) {
  check_image_qkv(q, k, v);
  const WindowArgs a = window_args(window_size, shift_size);
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    check_dtype_in(b, "rel_pos_bias", {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
    check_same_device(q, "q", b, "rel_pos_bias");
    const int64_t T = (2 * a.wh - 1) * (2 * a.ww - 1);
    TORCH_CHECK_VALUE(b.dim() == 2 && b.size(0) == T && b.size(1) == q.size(3), "rel_pos_bias: expected shape [(2*",
                      a.wh, "-1)*(2*", a.ww, "-1), heads] = [", T, ", ", q.size(3), "], got ", b.sizes());
  }
  return a;
}

bool has_bias(const c10::optional<at::Tensor>& b) { return b.has_value() && b->defined(); }

// ------------------------------------------------------------------------------ forward

template <typename T>
void window_fwd_impl(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const BiasRows* bias, float scale, at::Tensor& out, at::Tensor& lse) {
  const View5<T> qv(q), kv(k), vv(v);
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const int64_t N = g.N, dqk = g.dqk, dv = g.dv, nh = g.nh;
  const int64_t ldq = dqk, ldkt = pad_lanes(N), ldv = pad_lanes(dv);
  const View5<T>* const ins[3] = {&qv, &kv, &vv};
  T* const outs[1] = {op};
  const int64_t outw[1] = {dv};
  struct State {
    Buffer qb, ktb, vb, ob, lb;
    attn::Scratch ws;
    WindowWalk<T, 3, 1> walk;
  };
  const bool flush = attn::flush_is_negligible(v);  // see flush_is_negligible
  attn::run_tasks(
      g.tasks, 1, [&] { return State{.walk = WindowWalk<T, 3, 1>(g, ins, outs, outw)}; },
      [&](State& st, attn::PrefetchQueue& pq, int64_t task, int64_t next) {
        const attn::FlushUnderflow ftz(flush);
        float* qs = st.qb.grow(N * ldq);
        float* kts = st.ktb.grow(dqk * ldkt);
        float* vs = st.vb.grow(N * ldv);
        float* os = st.ob.grow(N * ldv);
        float* ls = st.lb.grow(N);
        WindowWalk<T, 3, 1>& w = st.walk;
        const TaskIndex cur = w.start(task, next, pq);
        const int64_t b = cur.b;
        WindowModifier mod = window_modifier(g, cur);
        for (int64_t h = cur.h0; h < cur.h1; ++h) {
          attn::pack_rows<T>(N, dqk, qv.sd(), w.rows(qv, b, h), scale, qs, ldq);
          attn::pack_cols<T>(N, dqk, kv.sd(), w.rows(kv, b, h), kts, ldkt);
          attn::pack_rows<T>(N, dv, vv.sd(), w.rows(vv, b, h), 1.f, vs, ldv);

          attn::FwdProblem p{.M = N, .N = N, .dqk = dqk, .dv = dv, .q = qs, .ldq = ldq, .kt = kts, .ldkt = ldkt,
                             .v = vs, .ldv = ldv, .o = os, .ldo = ldv, .lse = ls, .prefetch = &pq};
          mod.rows = bias != nullptr ? bias->head(g, h) : nullptr;
          mod.LE = bias != nullptr ? bias->LE : 0;
          attn::attention_forward(p, mod, st.ws, Range{0, N});

          for (int64_t i = 0; i < N; ++i) {
            if (!w.tok.present(i)) continue;
            const int64_t t = w.token(b, i);
            attn::store_row(op + (t * nh + h) * dv, os + i * ldv, dv);
            lp[t * nh + h] = ls[i];
          }
        }
        pq.drain();
        w.finish();
      });
}

// ------------------------------------------------------------------------------ backward

// Chunks of consecutive tasks, each with its own bias-gradient partial; the count depends on shapes
// only, so the summation order (and the result) does not depend on the thread count.
int64_t bias_chunk(const Geometry& g) { return std::max<int64_t>(8, ceil_div(g.tasks, 1024)); }

template <typename T>
void window_bwd_impl(const Geometry& g, const at::Tensor& go, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const BiasRows* bias,
                     float scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv_t, attn::ChunkPartials* partials) {
  const View5<T> qv(q), kv(k), vv(v), gv(go), ov(out);
  const int64_t ls0 = lse.stride(0), ls1 = lse.stride(1), ls2 = lse.stride(2), ls3 = lse.stride(3);
  const float* lp = lse.data_ptr<float>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv_t.data_ptr<T>();
  const int64_t N = g.N, dqk = g.dqk, dv = g.dv, nh = g.nh;
  const int64_t ldq = pad_lanes(dqk), ldkt = pad_lanes(N), ldv = pad_lanes(dv);
  const int64_t LE = bias_row_len(g), AB = g.ww * LE;  // AB: accumulator per head
  const View5<T>* const ins[5] = {&qv, &kv, &vv, &gv, &ov};
  T* const outs[3] = {dqp, dkp, dvp};
  const int64_t outw[3] = {dqk, dqk, dv};
  struct State {
    Buffer qb, kb, ktb, vtb, dob, oub, lb, drb, dqb, dkb, dvb, dab;
    attn::Scratch ws;
    WindowWalk<T, 5, 3> walk;
  };
  const bool flush = attn::flush_is_negligible(q, 0x1p20) && attn::flush_is_negligible(k, 0x1p20) &&
                     attn::flush_is_negligible(v, 0x1p20) && attn::flush_is_negligible(go, 0x1p20);
  attn::run_tasks(
      g.tasks, bias_chunk(g), [&] { return State{.walk = WindowWalk<T, 5, 3>(g, ins, outs, outw)}; },
      [&](State& st, attn::PrefetchQueue& pq, int64_t task, int64_t next) {
        const attn::FlushUnderflow ftz(flush);
        float* qs = st.qb.grow(N * ldq);
        float* ks = st.kb.grow(N * ldq);
        float* kts = st.ktb.grow(dqk * ldkt);
        float* vts = st.vtb.grow(dv * ldkt);
        float* dos = st.dob.grow(N * ldv);
        float* os = st.oub.grow(N * ldv);
        float* ls = st.lb.grow(N);
        float* drow = st.drb.grow(N);
        float* dqs = st.dqb.grow(N * ldq);
        float* dks = st.dkb.grow(N * ldq);
        float* dvs = st.dvb.grow(N * ldv);
        float* dacc = partials != nullptr ? st.dab.grow(nh * AB) : nullptr;
        if (dacc != nullptr && partials->starts(task)) std::fill(dacc, dacc + nh * AB, 0.f);
        WindowWalk<T, 5, 3>& w = st.walk;
        const TaskIndex cur = w.start(task, next, pq);
        const int64_t b = cur.b;
        WindowModifier mod = window_modifier(g, cur);
        for (int64_t h = cur.h0; h < cur.h1; ++h) {
          attn::pack_rows<T>(N, dqk, qv.sd(), w.rows(qv, b, h), scale, qs, ldq);
          attn::pack_rows<T>(N, dqk, kv.sd(), w.rows(kv, b, h), 1.f, ks, ldq);
          attn::pack_cols<T>(N, dqk, kv.sd(), w.rows(kv, b, h), kts, ldkt);
          attn::pack_cols<T>(N, dv, vv.sd(), w.rows(vv, b, h), vts, ldkt);
          attn::pack_rows<T>(N, dv, gv.sd(), w.rows(gv, b, h), 1.f, dos, ldv);
          attn::pack_rows<T>(N, dv, ov.sd(), w.rows(ov, b, h), 1.f, os, ldv);
          for (int64_t i = 0; i < N; ++i) {
            if (!w.tok.present(i)) {
              ls[i] = kPosInf;  // P = 0: an absent query contributes nothing
              drow[i] = 0.f;
              continue;
            }
            ls[i] = lp[b * ls0 + w.tok.y[i] * ls1 + w.tok.x[i] * ls2 + h * ls3];
            drow[i] = attn::simd::row_dot(dos + i * ldv, os + i * ldv, dv);
          }
          std::fill(dqs, dqs + N * ldq, 0.f);
          std::fill(dks, dks + N * ldq, 0.f);
          std::fill(dvs, dvs + N * ldv, 0.f);

          attn::BwdProblem p{.M = N, .N = N, .dqk = dqk, .dv = dv, .q = qs, .k = ks, .ldq = ldq, .kt = kts, .vt = vts,
                             .ldkt = ldkt, .dout = dos, .ldv = ldv, .lse = ls, .drow = drow, .dq = dqs, .dk = dks,
                             .dvv = dvs, .prefetch = &pq};
          mod.rows = bias != nullptr ? bias->head(g, h) : nullptr;
          mod.LE = LE;
          mod.dacc = dacc != nullptr ? dacc + h * AB : nullptr;
          attn::attention_backward(p, mod, st.ws, Range{0, N}, Range{0, N}, attn::kAll);

          for (int64_t i = 0; i < N; ++i) {
            if (!w.tok.present(i)) continue;
            const int64_t t = w.token(b, i);
            attn::store_row(dqp + (t * nh + h) * dqk, dqs + i * ldq, dqk, scale);
            attn::store_row(dkp + (t * nh + h) * dqk, dks + i * ldq, dqk);
            attn::store_row(dvp + (t * nh + h) * dv, dvs + i * ldv, dv);
          }
        }
        pq.drain();
        w.finish();
        if (dacc != nullptr && partials->ends(task, g.tasks)) fold_bias_grad(g, dacc, LE, partials->of(task));
      });
}

}  // namespace

std::string window_attention_limits(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    at::IntArrayRef window_size, at::IntArrayRef, const c10::optional<at::Tensor>&,
                                    double) {
  if (window_size.size() == 2 && window_size[0] * window_size[1] > kMaxWindowTokens)
    return c10::str("window_size ", window_size, " exceeds the cpu backend's limit of ", kMaxWindowTokens,
                    " tokens per window");
  return {};
}

std::tuple<at::Tensor, at::Tensor> window_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                                        const c10::optional<at::Tensor>& rel_pos_bias, double scale) {
  const auto [wh, ww, sh, sw] = check_window_args(q, k, v, window_size, shift_size, rel_pos_bias);
  at::Tensor out = attn::empty_out(q, v);
  at::Tensor lse = attn::empty_lse(q);
  if (out.numel() == 0) return {out, lse};
  const Geometry g = make_geometry(q, v, wh, ww, sh, sw);
  BiasRows rows;
  if (has_bias(rel_pos_bias)) rows = make_bias_rows(g, *rel_pos_bias);
  const BiasRows* bp = has_bias(rel_pos_bias) ? &rows : nullptr;
  attn::dispatch_float(q, "window_attention_fwd", [&](auto t) {
    window_fwd_impl<typename decltype(t)::type>(g, q, k, v, bp, static_cast<float>(scale), out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, at::IntArrayRef window_size, at::IntArrayRef shift_size,
    const c10::optional<at::Tensor>& rel_pos_bias, double scale, bool bias_grad) {
  const auto [wh, ww, sh, sw] = check_window_args(q, k, v, window_size, shift_size, rel_pos_bias);
  const std::vector<int64_t> oshape = attn::out_shape(q, v);
  check_like(grad_out, "grad_out", q, oshape);
  check_like(out, "out", q, oshape);
  check_lse_like(lse, q, q.sizes().slice(0, 4));

  const bool with_bias = has_bias(rel_pos_bias);
  const bool want_dbias = with_bias && bias_grad;
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), q.options());
  at::Tensor dv = at::empty(oshape, q.options());
  at::Tensor dbias = want_dbias ? at::zeros(rel_pos_bias->sizes(), rel_pos_bias->options())
                                : at::empty({0}, q.options());
  if (q.numel() == 0) return {dq, dk, dv, dbias};
  const Geometry g = make_geometry(q, v, wh, ww, sh, sw);
  BiasRows rows;
  if (with_bias) rows = make_bias_rows(g, *rel_pos_bias);
  const BiasRows* bp = with_bias ? &rows : nullptr;
  const int64_t TT = (2 * wh - 1) * (2 * ww - 1);
  attn::ChunkPartials partials(g.tasks, bias_chunk(g), want_dbias ? g.nh * TT : 0);
  attn::dispatch_float(q, "window_attention_bwd", [&](auto t) {
    window_bwd_impl<typename decltype(t)::type>(g, grad_out, q, k, v, out, lse, bp, static_cast<float>(scale), dq, dk,
                                                dv, want_dbias ? &partials : nullptr);
  });
  if (want_dbias) {
    // Partials in chunk order: a fixed summation order whatever the thread count.
    std::vector<float> acc(TT * g.nh, 0.f);
    for (int64_t c = 0; c < partials.count; ++c)
      for (int64_t h = 0; h < g.nh; ++h) {
        const float* part = partials.part(c) + h * TT;
        for (int64_t t = 0; t < TT; ++t) acc[t * g.nh + h] += part[t];
      }
    dbias.copy_(at::from_blob(acc.data(), {TT, g.nh}, at::TensorOptions().dtype(at::kFloat)));
  }
  return {dq, dk, dv, dbias};
}

std::string window_attention_bwd_limits(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, at::IntArrayRef window_size,
                                        at::IntArrayRef shift_size, const c10::optional<at::Tensor>& rel_pos_bias,
                                        double scale, bool) {
  return window_attention_limits({}, {}, {}, window_size, shift_size, rel_pos_bias, scale);
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  using vitk::Backend;
  VITK_IMPL_LIMITED(m, "window_attention_fwd", Backend::kCpu, &vitk::cpu::window_attention_fwd,
                    &vitk::cpu::window_attention_limits);
  VITK_IMPL_LIMITED(m, "window_attention_bwd", Backend::kCpu, &vitk::cpu::window_attention_bwd,
                    &vitk::cpu::window_attention_bwd_limits);
}
