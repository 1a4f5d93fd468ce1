// The codebook family's CPU (and, when built, CUDA) entry points, each with its op's schema
// signature and registered as the op's kernel for its device.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/core/SymIntArrayRef.h>

#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

namespace vitk {
namespace cpu {

// z [..., D] with codebook [K, D], or z [..., G, D] with codebook [G, K, D] (group g searched only in
// sub-codebook g). Returns (indices int64 z.shape[:-1], distances float32 z.shape[:-1]): the nearest
// code by squared Euclidean distance (cosine=true: of the l2-normalized vectors, reported as
// 2 - 2 cos, codes normalized as F.normalize does, x / max(||x||, 1e-12)), ties to the lowest index.
// The distance is that of the chosen code, evaluated directly in double. exact=false ranks by the
// fp32 expansion ||e||^2 - 2 z.e; exact=true returns the code whose distance evaluated in double
// (sums over d in order, fused multiply-adds; cosine ranks by -z.e / max(||e||, 1e-12)) is lowest
// (vitkernels.codebook_argmin documents the guarantee). Non-finite input: a row of z with a NaN or
// an infinity gets index 0; a code with one never wins unless every code of its group has one (then
// index 0). Never allocates N x K.
std::tuple<at::Tensor, at::Tensor> codebook_argmin(const at::Tensor& z, const at::Tensor& codebook, bool cosine,
                                                   bool exact);
// The CPU search keeps block indices in int32 vector lanes (with headroom): at most this many codes.
constexpr int64_t kMaxCodes = std::numeric_limits<int32_t>::max() / 2;
// "" when the codebook fits the CPU kernel, else the limit it exceeds.
std::string codebook_argmin_limits(const at::Tensor& z, const at::Tensor& codebook, bool cosine, bool exact);

// Gathers codebook rows: indices [...] with codebook [K, D] -> [..., D]; indices [..., G] with
// codebook [G, K, D] -> [..., G, D]. Out-of-range indices raise.
at::Tensor codebook_lookup(const at::Tensor& indices, const at::Tensor& codebook);

// Deterministic index-add of grad_output rows into a zero tensor of codebook_shape.
at::Tensor codebook_lookup_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                    c10::SymIntArrayRef codebook_shape);

}  // namespace cpu

#ifdef VITK_WITH_CUDA
namespace cuda {
at::Tensor codebook_lookup(const at::Tensor& indices, const at::Tensor& codebook);
at::Tensor codebook_lookup_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                    c10::SymIntArrayRef codebook_shape);
}  // namespace cuda
#endif

}  // namespace vitk
