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

  // ---- window_attention family (Swin-style shifted windows; packed varlen segments) ----
  // The public ops are composites over *_fwd, which also returns the log-sum-exp that autograd saves
  // for *_bwd; nothing N x N is stored between the passes.
  m.def("window_attention(Tensor q, Tensor k, Tensor v, int[2] window_size, int[2] shift_size=[0,0], "
        "Tensor? rel_pos_bias=None, float? scale=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("window_attention_fwd(Tensor q, Tensor k, Tensor v, int[2] window_size, int[2] shift_size, "
        "Tensor? rel_pos_bias, float scale) -> (Tensor out, Tensor lse)",
        {at::Tag::pt2_compliant_tag});
  m.def("window_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "int[2] window_size, int[2] shift_size, Tensor? rel_pos_bias, float scale, bool bias_grad) "
        "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)",
        {at::Tag::pt2_compliant_tag});
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float? scale=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale) "
        "-> (Tensor out, Tensor lse)",
        {at::Tag::pt2_compliant_tag});
  m.def("varlen_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens, int max_seqlen, float scale) -> (Tensor dq, Tensor dk, Tensor dv)",
        {at::Tag::pt2_compliant_tag});
}
