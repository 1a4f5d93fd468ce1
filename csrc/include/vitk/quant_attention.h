// CPU entry point of quantized attention: the post-training-quantized ViTs' attention (int8 q, k, v with
// zero points, softmax probabilities quantized on a log grid of 2^attn_bits levels below attn_delta,
// not renormalized), with the op's schema signature and registered as its CPU kernel.
// Semantics: vitkernels.reference.quant_attention.quant_attention.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace vitk {
namespace cpu {

// q [B, N, heads, d], k [B, Nk, heads, d], v [B, Nk, heads, dv], any strides (typically views of one
// packed qkv projection), float32 / bfloat16 / float16. Returns out [B, N, heads, dv], contiguous, in
// q's dtype. Inference only: no backward exists.
at::Tensor quant_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double q_scale,
                           double k_scale, double v_scale, int64_t q_zero, int64_t k_zero, int64_t v_zero,
                           int64_t attn_bits, double attn_base, double attn_delta, std::optional<double> scale);

}  // namespace cpu
}  // namespace vitk
