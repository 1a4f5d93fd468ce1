// CPU entry point of the fused forward of PPMA's criss-cross ("chunk") attention,
// out = 0.5 A_h(A_w v) + 0.5 A_w(A_h v) (kernel in csrc/cpu/axial_attention.cpp, beside the one-axis
// primitive it fuses; declared in polyline_attention.h), with its op's schema signature and
// registered as the op's CPU kernel; semantics: vitkernels/reference/masked_attention.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace vitk {
namespace cpu {

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

}  // namespace cpu
}  // namespace vitk
