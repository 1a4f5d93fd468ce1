// CPU kernels of packed varlen attention (block-diagonal attention over segments, as in the
// Qwen2.5-VL vision encoder): forward and backward on the attention core, with no modifier.
//
// The schedules are the driver's dense ones (attn::dense_forward / dense_backward in
// vitk/attention_driver.h); this file supplies the geometry (Segments) and its checks.
//
// A problem is one (segment, head). Its queries are cut into chunks of at most 256 rows, one task
// each, so a single long segment still spreads over every thread; a thread packs a
// problem's keys and values (and queries) once and keeps them while its consecutive tasks belong to
// the same problem. Keys longer than one core tile are handled by the core's online softmax.
//
// Backward: a problem is normally one task (dq, dk and dv accumulated together, each key tile
// streaming every query block). When there are few, long problems -- a rule on shapes only, so the
// result never depends on the thread count -- it runs in two passes instead: key chunks accumulate
// dk and dv, then query chunks accumulate dq, each pass recomputing the probabilities. That costs
// two extra tile products but lets threads split one problem with no shared accumulator.
#include "vitk/window_attention.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vitk/attention_driver.h"
#include "vitk/checks.h"
#include "vitk/tiling.h"
#include "vitk/registration.h"

namespace vitk {
namespace cpu {
namespace {

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

// The driver's dense geometry (attn::dense_forward / dense_backward): one problem per segment, its
// tokens consecutive rows of the [total, heads, d] tensors; no modifier.
struct Segments : attn::DenseNoModifier {
  static constexpr int kDims = 3;
  const std::vector<int64_t>& off;
  int64_t nh, dqk, dv;
  Segments(const std::vector<int64_t>& o, const at::Tensor& q, const at::Tensor& v)
      : off(o), nh(q.size(1)), dqk(q.size(2)), dv(v.size(2)) {}
  int64_t problems() const { return static_cast<int64_t>(off.size()) - 1; }
  int64_t len(int64_t p) const { return off[p + 1] - off[p]; }
  int64_t token(int64_t p, int64_t i) const { return off[p] + i; }
  int64_t offset(const int64_t* s, int64_t p, int64_t i) const { return (off[p] + i) * s[0]; }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                                        double scale) {
  check_varlen_args(q, k, v, cu_seqlens, max_seqlen);
  const std::vector<int64_t> off = read_offsets(cu_seqlens, q.size(0), max_seqlen);
  at::Tensor out = attn::empty_out(q, v);
  at::Tensor lse = attn::empty_lse(q);
  if (out.numel() == 0) return {out, lse};
  attn::dispatch_float(q, "varlen_attention_fwd", [&](auto t) {
    attn::dense_forward<typename decltype(t)::type>(Segments(off, q, v), q, k, v, static_cast<float>(scale), out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                                    const at::Tensor& k, const at::Tensor& v,
                                                                    const at::Tensor& out, const at::Tensor& lse,
                                                                    const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                                                    double scale) {
  check_varlen_args(q, k, v, cu_seqlens, max_seqlen);
  const std::vector<int64_t> oshape = attn::out_shape(q, v);
  check_like(grad_out, "grad_out", q, oshape);
  check_like(out, "out", q, oshape);
  check_lse_like(lse, q, q.sizes().slice(0, 2));
  const std::vector<int64_t> off = read_offsets(cu_seqlens, q.size(0), max_seqlen);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), q.options());
  at::Tensor dv = at::empty(oshape, q.options());
  if (q.numel() == 0) return {dq, dk, dv};
  attn::dispatch_float(q, "varlen_attention_bwd", [&](auto t) {
    attn::dense_backward<typename decltype(t)::type>(Segments(off, q, v), grad_out, q, k, v, out, lse,
                                                     static_cast<float>(scale), false, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "varlen_attention_fwd", vitk::Backend::kCpu, &vitk::cpu::varlen_attention_fwd);
  VITK_IMPL(m, "varlen_attention_bwd", vitk::Backend::kCpu, &vitk::cpu::varlen_attention_bwd);
}
