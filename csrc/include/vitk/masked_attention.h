// The masked_attention family's CPU entry points, each with its op's schema signature and
// registered as the op's CPU kernel next to its code in csrc/cpu/masked_attention/; semantics:
// vitkernels/reference/masked_attention.py. Structured masks computed inside the online softmax:
//   polyline_attention   PPMA's polyline ("whole") attention, also RMT's Manhattan self-attention
//                        with a per-head constant decay                    (polyline_attention.cpp)
//   axial_attention      the one-axis primitive of PPMA's criss-cross ("chunk") attention, and
//   axial_decay_attention  its fused two-axis forward                      (axial_attention.cpp)
//   gaussian_mask_attention  Gaussian-mixture masks ("RetNet viewed through convolution")
//                                                                          (gaussian_mask_attention.cpp)
//   reduced_attention    many queries against a short k/v: PVTv2's spatial-reduction attention,
//                        S2AFormer's strip attention with compressed q/k channels (reduced_attention.cpp)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace vitk {
namespace cpu {

// ---- polyline_attention

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

// ---- axial_attention, axial_decay_attention

// Attention among the tokens of each image row (axis = 2: query (i, j1), keys (i, j2), logits +=
// sum_{c in (min j, max j]} log_decay[b, i, c, h]) or each column (axis = 1, the same along i with
// log_decay[b, r, j, h]). Same argument conventions as polyline_attention_fwd. Returns (out [B, H, W, heads, dv],
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

// q, k [B, H, W, heads, dqk], v [B, H, W, heads, dv], any strides; log_alpha (decays along each row,
// for A_w) and log_beta (down each column, for A_h) [B, H, W, heads], any float dtype and any strides.
// Returns, in q's dtype unless stated:
//   out   [B, H, W, heads, dv]     (parts[0] + parts[1]) / 2, averaged in fp32
//   parts [2, B, H, W, heads, dv]  o_wh = A_h y_w, o_hw = A_w y_h
//   mids  [2, B, H, W, heads, dv]  y_w = A_w v, y_h = A_h v
//   lse   fp32 [2, B, H, W, heads] log-sum-exp of the row softmax (A_w) and of the column softmax (A_h)
// so that the backward is three calls of axial_attention_bwd: (o_wh; axis 1, lse[1], v = y_w), then
// (o_hw; axis 2, lse[0], v = y_h) and (y_w; axis 2, lse[0], v) as one call with two value streams,
// then (y_h; axis 1, lse[1], v).
// Without save_for_backward, parts and mids are empty [0] tensors and only out and lse are written.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> axial_decay_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_alpha,
    const at::Tensor& log_beta, double scale, bool save_for_backward);

// ---- gaussian_mask_attention

// q, k [B, H, W, heads, dqk], v [B, H, W, heads, dv], any strides (read in place); mix_weight and
// mix_sigma [heads, M] of any float dtype. Logits (q k^T scale) * G_h with
// G_h[p, p'] = sum_m w[h, m] exp(-|p - p'|^2 / (2 (sigma[h, m]^2 + 1e-5))) on the H x W grid.
// Returns (out [B, H, W, heads, dv] contiguous in q's dtype, lse float32 [B, H, W, heads]).
std::tuple<at::Tensor, at::Tensor> gaussian_mask_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                               const at::Tensor& v, const at::Tensor& mix_weight,
                                                               const at::Tensor& mix_sigma, double scale);

// Returns (dq, dk, dv, dmix_weight, dmix_sigma): dq/dk/dv contiguous in q's dtype; the mixture
// gradients in the parameters' dtype and shape (deterministic, independent of the thread count),
// or empty tensors when mix_grad is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_mask_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& mix_weight, const at::Tensor& mix_sigma, const at::Tensor& out, const at::Tensor& lse,
    double scale, bool mix_grad);

// ---- reduced_attention

// q [B, Nq, heads, dqk], k [B, Nk, heads, dqk], v [B, Nk, heads, dv], any strides (k and v are
// typically slices of one packed kv projection); dqk may be 1 and differ from dv.
// Returns (out [B, Nq, heads, dv] contiguous in q's dtype, lse float32 [B, Nq, heads]).
std::tuple<at::Tensor, at::Tensor> reduced_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, double scale);

// Returns (dq, dk, dv), contiguous, q's dtype; deterministic (dk and dv are reduced over fixed query
// chunks in a fixed order, whatever the thread count).
std::tuple<at::Tensor, at::Tensor, at::Tensor> reduced_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                                     const at::Tensor& k, const at::Tensor& v,
                                                                     const at::Tensor& out, const at::Tensor& lse,
                                                                     double scale);

}  // namespace cpu
}  // namespace vitk
