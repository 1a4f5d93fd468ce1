// Torch binding of the codebook family's CUDA kernels: validates arguments, allocates outputs, and
// calls the torch-free launchers in kernels/codebook.cu on the current stream (so CUDA graphs and
// torch.compile's reduce-overhead mode capture them); registered as the ops' CUDA kernels. Compiled
// only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "kernels/codebook.cuh"
#include "vitk/checks.h"
#include "vitk/codebook.h"
#include "vitk/registration.h"

namespace vitk {
namespace cuda {
namespace {

namespace ck = ::vitk::cuda_kernels;

ck::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ck::kFloat32;
    case at::kHalf: return ck::kFloat16;
    case at::kBFloat16: return ck::kBFloat16;
    case at::kDouble: return ck::kFloat64;
    default: break;
  }
  TORCH_CHECK_VALUE(false, "codebook: no CUDA kernel for dtype ", t);
  return ck::kFloat32;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// The kernels cannot raise, so an out-of-range index is found here, with one reduction and one
// device-to-host copy, before any of them reads a code row.
void check_index_range(const at::Tensor& indices, int64_t K) {
  if (indices.numel() == 0) return;
  const auto [lo_t, hi_t] = at::aminmax(indices);
  const int64_t lo = lo_t.item<int64_t>(), hi = hi_t.item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < K, "indices: expected values in [0, ", K, "), got ", lo < 0 ? lo : hi);
}

}  // namespace

at::Tensor codebook_lookup(const at::Tensor& indices, const at::Tensor& codebook) {
  check_defined(indices, "indices");
  check_defined(codebook, "codebook");
  check_device_type(codebook, "codebook", at::kCUDA);
  check_same_device(codebook, "codebook", indices, "indices");
  check_dtype_in(indices, "indices", {at::kLong, at::kInt});
  check_dtype_in(codebook, "codebook", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_dim_in(codebook, "codebook", 2, 3);
  const bool grouped = codebook.dim() == 3;
  const int64_t G = grouped ? codebook.size(0) : 1;
  const int64_t K = codebook.size(-2);
  const int64_t D = codebook.size(-1);
  TORCH_CHECK_VALUE(!grouped || (indices.dim() >= 1 && indices.size(-1) == G), "indices: expected shape [..., G=", G,
                    "] for a grouped codebook ", codebook.sizes(), ", got ", indices.sizes());

  const c10::cuda::CUDAGuard guard(codebook.device());
  std::vector<int64_t> out_shape = indices.sizes().vec();
  out_shape.push_back(D);
  at::Tensor out = at::empty(out_shape, codebook.options());
  if (out.numel() == 0) return out;
  check_nonempty_dim(codebook, "codebook", -2, "code (K)");

  // The kernel addresses rows as [G, K, D] and indices as a flat run whose row r belongs to group
  // r % G; both hold only for contiguous tensors (usually already so: no copy then).
  const at::Tensor cb = codebook.contiguous();
  const at::Tensor idx = indices.contiguous();
  check_index_range(idx, K);
  check_launch(ck::codebook_lookup_launch(kernel_dtype(cb.scalar_type()), cb.const_data_ptr(), idx.const_data_ptr(),
                                          idx.scalar_type() == at::kLong, out.mutable_data_ptr(), idx.numel(), G, K,
                                          D, c10::cuda::getCurrentCUDAStream()),
               "codebook_lookup");
  return out;
}

at::Tensor codebook_lookup_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                    c10::SymIntArrayRef codebook_sym_shape) {
  const at::IntArrayRef codebook_shape = C10_AS_INTARRAYREF_SLOW(codebook_sym_shape);
  check_defined(grad_output, "grad_output");
  check_defined(indices, "indices");
  check_device_type(grad_output, "grad_output", at::kCUDA);
  check_same_device(grad_output, "grad_output", indices, "indices");
  check_dtype_in(grad_output, "grad_output", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_dtype_in(indices, "indices", {at::kLong, at::kInt});
  TORCH_CHECK_VALUE(codebook_shape.size() == 2 || codebook_shape.size() == 3,
                    "codebook_shape: expected [K, D] or [G, K, D], got ", codebook_shape);
  for (int64_t s : codebook_shape)
    TORCH_CHECK_VALUE(s >= 0, "codebook_shape: expected non-negative sizes, got ", codebook_shape);
  const bool grouped = codebook_shape.size() == 3;
  const int64_t G = grouped ? codebook_shape[0] : 1;
  const int64_t K = codebook_shape[codebook_shape.size() - 2];
  const int64_t D = codebook_shape[codebook_shape.size() - 1];
  TORCH_CHECK_VALUE(grad_output.dim() == indices.dim() + 1 &&
                  grad_output.sizes().slice(0, indices.dim()).equals(indices.sizes()) && grad_output.size(-1) == D,
                    "grad_output: expected shape indices.shape + [D=", D, "] = ", indices.sizes(), " + [", D, "], got ",
                    grad_output.sizes());
  TORCH_CHECK_VALUE(!grouped || (indices.dim() >= 1 && indices.size(-1) == G), "indices: expected shape [..., G=", G,
                    "] for codebook_shape ", codebook_shape, ", got ", indices.sizes());

  const c10::cuda::CUDAGuard guard(grad_output.device());
  at::Tensor grad_codebook = at::empty(codebook_shape, grad_output.options());
  if (grad_codebook.numel() == 0) return grad_codebook;
  TORCH_CHECK_VALUE(G >= 1, "codebook_shape: expected at least one group, got ", codebook_shape);

  const at::Tensor grad = grad_output.contiguous();
  const at::Tensor idx = indices.contiguous();
  check_index_range(idx, K);
  const ck::DType dtype = kernel_dtype(grad.scalar_type());
  // fp16/bf16 grads are summed in an fp32 scratch accumulator, then rounded once.
  const size_t ws_bytes = ck::codebook_lookup_backward_workspace_bytes(dtype, G, K, D);
  at::Tensor workspace;
  if (ws_bytes > 0)
    workspace = at::empty({static_cast<int64_t>(ws_bytes / sizeof(float))}, grad.options().dtype(at::kFloat));
  check_launch(ck::codebook_lookup_backward_launch(dtype, grad.const_data_ptr(), idx.const_data_ptr(),
                                                   idx.scalar_type() == at::kLong, grad_codebook.mutable_data_ptr(),
                                                   ws_bytes > 0 ? workspace.mutable_data_ptr() : nullptr, idx.numel(),
                                                   G, K, D, c10::cuda::getCurrentCUDAStream()),
               "codebook_lookup_backward");
  return grad_codebook;
}

}  // namespace cuda
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CUDA, m) {
  VITK_IMPL(m, "codebook_lookup", vitk::Backend::kCuda, &vitk::cuda::codebook_lookup);
  VITK_IMPL(m, "codebook_lookup_backward", vitk::Backend::kCuda, &vitk::cuda::codebook_lookup_backward);
}
