// CPU entry points of the decay-masked members of the masked_attention family: PPMA's polyline
// ("whole") attention, which is also RMT's Manhattan self-attention with a per-head constant decay,
// and the one-axis primitive of PPMA's criss-cross ("chunk") attention, each with its op's schema
// signature and registered as the op's CPU kernel; semantics:
// vitkernels/reference/masked_attention.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace vitk {
namespace cpu {

// q, k [B, H, W, heads, dqk], v [B, H, W, heads, dv], any strides; log_alpha, log_beta
// [B, H, W, heads], any float dtype and any strides (zero strides for a broadcast per-head decay).
// Returns (out [B, H, W, heads, dv] in q's dtype, lse fp32 [P, B, H, W, heads], parts), P = 2 when
// symmetric (pass 0 with the mask logM, pass 1 with logM^T); parts [2, B, H, W, heads, dv] holds the
// two passes' outputs when symmetric (out = (parts[0] + parts[1]) / 2), else it is empty. Without
// save_for_backward parts is always empty, and the one-tile symmetric kernel stores only out.
std::tuple<at::Tensor, at::Tensor, at::Tensor> polyline_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                                      const at::Tensor& v, const at::Tensor& log_alpha,
                                                                      const at::Tensor& log_beta, double scale,
                                                                      bool symmetric, bool save_for_backward);

// Returns (dq, dk, dv, dlog_alpha, dlog_beta), contiguous; the decay gradients in the decays' dtypes
// and full [B, H, W, heads] shape (deterministic, independent of the thread count), or empty tensors
// when decay_grad is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> polyline_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& log_alpha, const at::Tensor& log_beta, const at::Tensor& out, const at::Tensor& parts,
    const at::Tensor& lse, double scale, bool symmetric, bool decay_grad);

// Attention among the tokens of each image row (axis = 2: query (i, j1), keys (i, j2), logits +=
// sum_{c in (min j, max j]} log_decay[b, i, c, h]) or each column (axis = 1, the same along i with
// log_decay[b, r, j, h]). Same argument conventions as above. Returns (out [B, H, W, heads, dv],
// lse fp32 [B, H, W, heads]).
std::tuple<at::Tensor, at::Tensor> axial_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& log_decay, int64_t axis, double scale);

// Returns (dq, dk, dv, dlog_decay, dv2); dlog_decay as for the polyline decays. With a second value
// stream (grad_out2, v2, out2, all shaped like grad_out, v, out), the backward of two attentions that
// share q, k, the decays and so lse, summed: dq, dk and dlog_decay of both, dv of the first, dv2 of the
// second; otherwise dv2 is empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> axial_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& log_decay, const at::Tensor& out, const at::Tensor& lse, int64_t axis, double scale,
    bool decay_grad, const c10::optional<at::Tensor>& grad_out2, const c10::optional<at::Tensor>& v2,
    const c10::optional<at::Tensor>& out2);

}  // namespace cpu
}  // namespace vitk
