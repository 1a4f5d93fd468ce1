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
// The schedules are the driver's dense ones (vitk/attention_driver.h), shared with varlen attention:
// this file supplies the geometry (GaussProblems) and the modifier (GaussModifier).
#include "vitk/masked_attention.h"

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

#include "vitk/attention_driver.h"
#include "vitk/checks.h"
#include "vitk/image_layout.h"
#include "vitk/tiling.h"
#include "vitk/registration.h"

namespace vitk {
namespace cpu {
namespace {

constexpr double kSigmaEps = 1e-5;  // the paper's 1e-5 added to sigma^2

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

// ------------------------------------------------------------------------------ problems

// The driver's dense geometry (attn::dense_forward / dense_backward): one problem per image, its
// tokens in image order, the head's table runs as the modifier and the table's gradient, folded
// onto [heads][|dy|][|dx|] per chunk of tasks, as its parameters.
struct GaussProblems {
  static constexpr int kDims = 5;
  const Geometry& g;
  const std::vector<float>& table;
  int64_t nh, dqk, dv;
  GaussProblems(const Geometry& geom, const std::vector<float>& t)
      : g(geom), table(t), nh(geom.nh), dqk(geom.dqk), dv(geom.dv) {}
  int64_t problems() const { return g.B; }
  int64_t len(int64_t) const { return g.N; }
  int64_t token(int64_t b, int64_t i) const { return b * g.N + i; }
  int64_t offset(const int64_t* s, int64_t b, int64_t i) const { return b * s[0] + g.py[i] * s[1] + g.px[i] * s[2]; }
  using Modifier = GaussModifier;
  Modifier modifier() const {
    Modifier m;
    m.g = &g;
    return m;
  }
  void bind(Modifier& m, int64_t h, float* dacc) const {
    m.table = table.data() + h * g.table_size();
    m.dacc = dacc != nullptr ? dacc + h * g.table_size() : nullptr;
  }
  int64_t param_size() const { return g.nh * g.table_size(); }
  int64_t partial_size() const { return g.nh * g.H * g.W; }
  void fold_params(const float* dacc, float* part) const { fold_grad(g, dacc, part); }
};

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
  at::Tensor out = attn::empty_out(q, v);
  at::Tensor lse = attn::empty_lse(q);
  if (out.numel() == 0) return {out, lse};
  const Geometry g = make_geometry(q, v);
  const std::vector<float> table = make_table(g, read_mixture(mix_weight, mix_sigma));
  attn::dispatch_float(q, "gaussian_mask_attention_fwd", [&](auto t) {
    attn::dense_forward<typename decltype(t)::type>(GaussProblems(g, table), q, k, v, static_cast<float>(scale), out,
                                                    lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_mask_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& mix_weight, const at::Tensor& mix_sigma, const at::Tensor& out, const at::Tensor& lse,
    double scale, bool mix_grad) {
  check_args(q, k, v, mix_weight, mix_sigma);
  const std::vector<int64_t> oshape = attn::out_shape(q, v);
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
  attn::ChunkPartials partials;
  attn::dispatch_float(q, "gaussian_mask_attention_bwd", [&](auto t) {
    partials = attn::dense_backward<typename decltype(t)::type>(GaussProblems(g, table), grad_out, q, k, v, out, lse,
                                                                static_cast<float>(scale), mix_grad, dq, dk, dv);
  });
  if (!mix_grad) return {dq, dk, dv, at::empty({0}, q.options()), at::empty({0}, q.options())};
  // Partials in chunk order: a fixed summation order whatever the thread count.
  const int64_t part_size = g.nh * g.H * g.W;
  std::vector<double> dg(part_size, 0.0);
  for (int64_t c = 0; c < partials.count; ++c) {
    const float* part = partials.part(c);
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
