// The codebook family's CPU (and, when built, CUDA) entry points, bound to Python in bindings.cpp
// and routed to from vitkernels/ops/codebook.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace vitk {
namespace cpu {

// z [..., D] with codebook [K, D], or z [..., G, D] with codebook [G, K, D] (group g searched only in
// sub-codebook g). Returns (indices int64 z.shape[:-1], distances float32 z.shape[:-1]): the nearest
// code by squared Euclidean distance (cosine=true: of the l2-normalized vectors, reported as
// 2 - 2 cos), ties to the lowest index. Never allocates N x K.
std::tuple<at::Tensor, at::Tensor> codebook_argmin(const at::Tensor& z, const at::Tensor& codebook, bool cosine);

// Gathers codebook rows: indices [...] with codebook [K, D] -> [..., D]; indices [..., G] with
// codebook [G, K, D] -> [..., G, D]. Out-of-range indices raise.
at::Tensor codebook_lookup(const at::Tensor& indices, const at::Tensor& codebook);

// Deterministic index-add of grad_output rows into a zero tensor of codebook_shape.
at::Tensor codebook_lookup_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                    at::IntArrayRef codebook_shape);

}  // namespace cpu

#ifdef VITK_WITH_CUDA
namespace cuda {
at::Tensor codebook_lookup(const at::Tensor& indices, const at::Tensor& codebook);
at::Tensor codebook_lookup_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                    at::IntArrayRef codebook_shape);
}  // namespace cuda
#endif

}  // namespace vitk
