// CPU entry points of reduced attention: dense attention of many queries against a short k/v
// (PVTv2's spatial-reduction attention, S2AFormer's strip attention with compressed q/k channels),
// each with its op's schema signature and registered as the op's CPU kernel.
// Semantics: vitkernels.reference.masked_attention.reduced_attention.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace vitk {
namespace cpu {

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
