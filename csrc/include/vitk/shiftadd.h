// CPU entry points of the shiftadd family (ShiftAddViT), each with its op's schema signature and
// registered as the op's CPU kernel. Semantics: vitkernels.reference.shiftadd.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace vitk {
namespace cpu {

// LinAngularAttention_binary's MatAdd core. q, k [B, N, heads, d], v [B, N, heads, dv], any strides.
// q and k are normalized per token, binarized at the mean of the whole normalized tensor (x > mean,
// so a tie falls to 0), and out = normalize(0.5 v + (1/pi) q_b (k_b^T v)) [B, N, heads, dv],
// contiguous. With save_for_backward it also returns what the backward needs, and nothing N x d in
// floating point: codes int64 [2, B, heads, N, ceil(d / 64)] (q's then k's bits, bit i of word w is
// channel 64 w + i), norms [3, B, heads, N] (||q||, ||k|| and the output's norm before normalizing)
// and state [B, heads, d, dv] = k_b^T v, both in the accumulation type (float64 for float64
// inputs, else float32). Without it those three come back empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> binary_linear_attention_fwd(const at::Tensor& q,
                                                                                     const at::Tensor& k,
                                                                                     const at::Tensor& v,
                                                                                     bool save_for_backward);

// The straight-through gradient (q_b's and k_b's gradients are those of clamp(x, 0, 1) of the
// normalized q and k): (dq, dk, dv), contiguous, q's dtype; deterministic.
std::tuple<at::Tensor, at::Tensor, at::Tensor> binary_linear_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& codes, const at::Tensor& norms, const at::Tensor& state);

// x [T, C] (any strides), expert_index [T] int64 in [0, num_experts): (x_sorted [T, C] contiguous,
// offsets int64 [E + 1], order int64 [T]) with x_sorted[i] = x[order[i]], the rows of expert e at
// [offsets[e], offsets[e + 1]), each expert's tokens in token order. Out-of-range indices raise.
std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_dispatch(const at::Tensor& x, const at::Tensor& expert_index,
                                                               int64_t num_experts);

// out[order[i]] = gate[order[i]] * y_sorted[i]: y_sorted [T, C'] back in token order ([T, C'],
// contiguous, y_sorted's dtype). order must be a permutation of [0, T); gate [T] is in token order.
at::Tensor expert_combine(const at::Tensor& y_sorted, const at::Tensor& order, const at::Tensor& gate);

// The backward of expert_combine: (dy_sorted [T, C'] = gate[order[i]] * grad_out[order[i]],
// dgate [T] = rowwise grad_out[t] . y_sorted[i] where order[i] = t, in gate's dtype); an output not
// asked for comes back empty.
std::tuple<at::Tensor, at::Tensor> expert_combine_bwd(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                                      const at::Tensor& order, const at::Tensor& gate, bool y_grad,
                                                      bool gate_grad);

}  // namespace cpu
}  // namespace vitk
