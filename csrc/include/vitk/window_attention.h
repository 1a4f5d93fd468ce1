// The window_attention family's CPU entry points (shifted-window attention as in Swin, and packed
// varlen attention as in Qwen2.5-VL's vision encoder), each with its op's schema signature and
// registered as the op's CPU kernel. Semantics: vitkernels/reference/window_attention.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace vitk {
namespace cpu {

// The CPU kernels' largest window, in tokens (vitkernels.backends() reports it).
constexpr int64_t kMaxWindowTokens = 4096;

// q, k [B, H, W, heads, dqk], v [B, H, W, heads, dv], any strides (typically slices of one packed
// qkv tensor; never copied whole). window_size (wh, ww), cyclic shift_size (sh, sw) with
// 0 <= shift < window, optional relative-position bias table [(2wh-1)(2ww-1), heads] of any float
// dtype. Returns (out [B, H, W, heads, dv] contiguous in q's dtype, lse float32 [B, H, W, heads]).
std::tuple<at::Tensor, at::Tensor> window_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                                        const c10::optional<at::Tensor>& rel_pos_bias, double scale);
// "" when the window fits the CPU kernels, else the limit it exceeds (same arguments as the kernel).
std::string window_attention_limits(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    at::IntArrayRef window_size, at::IntArrayRef shift_size,
                                    const c10::optional<at::Tensor>& rel_pos_bias, double scale);

// Returns (dq, dk, dv, dbias): image layout, contiguous, q's dtype; dbias is the gradient of the
// bias table in the table's dtype (deterministic, independent of the thread count), or an empty
// tensor when bias_grad is false or there is no bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, at::IntArrayRef window_size, at::IntArrayRef shift_size,
    const c10::optional<at::Tensor>& rel_pos_bias, double scale, bool bias_grad);
std::string window_attention_bwd_limits(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                        at::IntArrayRef window_size, at::IntArrayRef shift_size,
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
