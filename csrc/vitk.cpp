// Every public op's schema, in one place. Implementations are bound per dispatch key from Python
// (vitkernels/ops/<family>.py), which routes to the C++ CPU kernel, the CUDA kernel or the Triton
// kernel according to vitkernels.backends; the kernels themselves live in csrc/cpu and csrc/cuda.
#include <torch/library.h>

TORCH_LIBRARY(vitk, m) {
  // ---- codebook family (VQ tokenizers) ----
  m.def("codebook_argmin(Tensor z, Tensor codebook, *, bool cosine=False) -> (Tensor indices, Tensor distances)",
        {at::Tag::pt2_compliant_tag});
  m.def("codebook_lookup(Tensor indices, Tensor codebook) -> Tensor", {at::Tag::pt2_compliant_tag});
  // The backward of codebook_lookup: an index-add of grad_output into a zero codebook-shaped tensor.
  m.def("codebook_lookup_backward(Tensor grad_output, Tensor indices, SymInt[] codebook_shape) -> Tensor",
        {at::Tag::pt2_compliant_tag});
}
