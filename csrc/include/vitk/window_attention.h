// The window_attention family's CPU entry points (shifted-window attention as in Swin, and packed
// varlen attention as in Qwen2.5-VL's vision encoder), bound to Python in bindings.cpp and routed
// to from vitkernels/ops/window_attention.py. Semantics: vitkernels/reference/window_attention.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace vitk {
namespace cpu {

// q, k [B, H, W, heads, dqk], v [B, H, W, heads, dv], any strides (typically slices of one packed
// qkv tensor; never copied whole). Window (wh, ww), cyclic shift (sh, sw) with 0 <= shift < window,
// optional relative-position bias table [(2wh-1)(2ww-1), heads] of any float dtype.
// Returns (out [B, H, W, heads, dv] contiguous in q's dtype, lse float32 [B, H, W, heads]).
std::tuple<at::Tensor, at::Tensor> window_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        int64_t wh, int64_t ww, int64_t sh, int64_t sw,
                                                        const c10::optional<at::Tensor>& rel_pos_bias, double scale);

// Returns (dq, dk, dv, dbias): image layout, contiguous, q's dtype; dbias is the gradient of the
// bias table in the table's dtype (deterministic, independent of the thread count), or an empty
// tensor when bias_grad is false or there is no bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, int64_t wh, int64_t ww, int64_t sh, int64_t sw,
    const c10::optional<at::Tensor>& rel_pos_bias, double scale, bool bias_grad);

// q, k [total, heads, dqk], v [total, heads, dv], any strides; cu_seqlens int32 [S+1] (0 = cu[0] <=
// ... <= cu[S] = total); block-diagonal attention within each segment. Returns (out [total, heads,
// dv] in q's dtype, lse float32 [total, heads]).
std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                                        double scale);

// Returns (dq, dk, dv), contiguous, q's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                                    const at::Tensor& k, const at::Tensor& v,
                                                                    const at::Tensor& out, const at::Tensor& lse,
                                                                    const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                                                    double scale);

}  // namespace cpu
}  // namespace vitk
