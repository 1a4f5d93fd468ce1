// CPU entry points of Gaussian-mixture masked attention ("RetNet viewed through convolution"),
// each with its op's schema signature and registered as the op's CPU kernel.
// Semantics: vitkernels.reference.masked_attention.gaussian_mask_attention.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace vitk {
namespace cpu {

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

}  // namespace cpu
}  // namespace vitk
