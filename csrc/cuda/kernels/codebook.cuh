// Host launchers of the codebook family's CUDA kernels (codebook.cu). Torch-free by design
// (DESIGN.md invariant 7): raw pointers, sizes and a stream in, a cudaError_t out, so nvcc alone can
// compile and check every kernel; csrc/cuda/codebook.cpp is the thin torch binding over these.
//
// Layout contract (the binding makes tensors contiguous before calling):
//   codebook / grad_codebook  [G, K, D]   (G = 1 for a plain [K, D] codebook)
//   indices                   [rows]      int64 (idx64) or int32; row r belongs to group r % G,
//                                         which is what a contiguous [..., G] index tensor gives
//   out / grad_output         [rows, D]
// An index outside [0, K) never causes an out-of-bounds access: lookup writes a zero row for it and
// the backward drops it. (The op layer range-checks indices before a GPU kernel runs.)
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace vitk {
namespace cuda_kernels {

// The element types the kernels are instantiated for (the binding maps at::ScalarType onto these).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// out[r, :] = codebook[r % G, indices[r], :]. A pure row copy, so it is dtype-agnostic apart from
// the element size, and moves rows in 16-byte pieces whenever sizes and alignment allow.
cudaError_t codebook_lookup_launch(DType dtype, const void* codebook, const void* indices, bool idx64, void* out,
                                   int64_t rows, int64_t G, int64_t K, int64_t D, cudaStream_t stream);

// Bytes of scratch codebook_lookup_backward_launch needs for dtype: a G*K*D fp32 accumulator for
// fp16/bf16, nothing for fp32/fp64 (those accumulate in place in grad_codebook).
size_t codebook_lookup_backward_workspace_bytes(DType dtype, int64_t G, int64_t K, int64_t D);

// grad_codebook = 0; grad_codebook[r % G, indices[r], :] += grad_output[r, :] for every row, with
// atomics (fp32 accumulation for 16-bit grads, then rounded once). The order of the atomic adds
// varies from run to run, so fp32 results are not bitwise deterministic. workspace must hold
// codebook_lookup_backward_workspace_bytes(dtype, G, K, D) bytes (may be null when that is 0) and
// be 16-byte aligned.
cudaError_t codebook_lookup_backward_launch(DType dtype, const void* grad_output, const void* indices, bool idx64,
                                            void* grad_codebook, void* workspace, int64_t rows, int64_t G,
                                            int64_t K, int64_t D, cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace vitk
