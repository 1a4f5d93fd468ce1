// Every op's schema, in one place. The C++ kernels register themselves per dispatch key next to
// their code (TORCH_LIBRARY_IMPL(vitk, CPU | CUDA, m) through VITK_IMPL, see vitk/registration.h),
// the public composites over the internal forward ops in composites.cpp; the Python package adds
// fake kernels, autograd, the Triton backends and the router of forced backends
// (vitkernels/ops/<family>.py, declared through vitkernels/ops/_define.py).
#include <torch/library.h>

TORCH_LIBRARY(vitk, m) {
  // ---- codebook family (VQ tokenizers) ----
  m.def("codebook_argmin(Tensor z, Tensor codebook, *, bool cosine=False, bool exact=False) "
        "-> (Tensor indices, Tensor distances)",
        {at::Tag::pt2_compliant_tag});
  m.def("codebook_lookup(Tensor indices, Tensor codebook) -> Tensor", {at::Tag::pt2_compliant_tag});
  // The backward of codebook_lookup: an index-add of grad_output into a zero codebook-shaped tensor.
  m.def("codebook_lookup_backward(Tensor grad_output, Tensor indices, SymInt[] codebook_shape) -> Tensor",
        {at::Tag::pt2_compliant_tag});

  // ---- spectral family (wavelet, Fourier and long-convolution token mixers) ----
  // One level of the dual-tree complex wavelet transform (near_sym_b), pytorch_wavelets' layout.
  m.def("dtcwt2d(Tensor x) -> (Tensor lowpass, Tensor highpass)", {at::Tag::pt2_compliant_tag});
  m.def("idtcwt2d(Tensor lowpass, Tensor highpass) -> Tensor", {at::Tag::pt2_compliant_tag});
  // Their adjoints (the transforms are linear): each is the other bank run with the first's filters.
  m.def("dtcwt2d_backward(Tensor grad_lowpass, Tensor grad_highpass, SymInt[2] input_size) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("idtcwt2d_backward(Tensor grad_output) -> (Tensor grad_lowpass, Tensor grad_highpass)",
        {at::Tag::pt2_compliant_tag});
  // GFNet's global filter, irfft2(rfft2(x) * weight) with norm="ortho", channels-last; the backward
  // gives grad_x (the same filter conjugated) and grad_weight, each empty when not asked for.
  m.def("global_filter(Tensor x, Tensor weight) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("global_filter_backward(Tensor grad_output, Tensor x, Tensor weight, bool x_grad, bool weight_grad) "
        "-> (Tensor grad_x, Tensor grad_weight)",
        {at::Tag::pt2_compliant_tag});
  // SVT's whole spectral layer, channels-last, without the full highpass in memory.
  m.def("svt_spectral_mix(Tensor x, Tensor weight_ll, Tensor weight_1, Tensor bias_1, Tensor weight_2, "
        "Tensor bias_2) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Its backward: the gradients of all six inputs, the highpass recomputed, no [B, C, 6, ...] copies.
  m.def("svt_spectral_mix_backward(Tensor grad_output, Tensor x, Tensor weight_ll, Tensor weight_1, Tensor bias_1, "
        "Tensor weight_2, Tensor bias_2) -> (Tensor grad_x, Tensor grad_weight_ll, Tensor grad_weight_1, "
        "Tensor grad_bias_1, Tensor grad_weight_2, Tensor grad_bias_2)",
        {at::Tag::pt2_compliant_tag});
  // Multi-Dimensional Hyena's 2-D long convolution (linear, top-left anchored) plus D * u; the backward
  // gives (grad_u, grad_k, grad_D), each empty when not asked for.
  m.def("fftconv2d(Tensor u, Tensor k, Tensor? D=None) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("fftconv2d_backward(Tensor grad_output, Tensor u, Tensor k, Tensor? D, bool u_grad, bool k_grad, "
        "bool D_grad) -> (Tensor grad_u, Tensor grad_k, Tensor grad_D)",
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

  // ---- masked_attention family (structured masks computed inside the online softmax; reduced k/v) ----
  // Composites over *_fwd ops that also return what autograd saves for *_bwd (the log-sum-exp, and
  // for the symmetric polyline form the two halves of the output); nothing N x N exists in either pass.
  m.def("polyline_attention(Tensor q, Tensor k, Tensor v, Tensor log_alpha, Tensor log_beta, float? scale=None, "
        "bool symmetric=True) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Without save_for_backward (no gradient wanted) parts comes back empty and is not stored.
  m.def("polyline_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor log_alpha, Tensor log_beta, float scale, "
        "bool symmetric, bool save_for_backward=True) -> (Tensor out, Tensor lse, Tensor parts)",
        {at::Tag::pt2_compliant_tag});
  m.def("polyline_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor log_alpha, Tensor log_beta, "
        "Tensor out, Tensor parts, Tensor lse, float scale, bool symmetric, bool decay_grad) "
        "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dlog_alpha, Tensor dlog_beta)",
        {at::Tag::pt2_compliant_tag});
  m.def("axial_decay_attention(Tensor q, Tensor k, Tensor v, Tensor log_alpha, Tensor log_beta, float? scale=None) "
        "-> Tensor",
        {at::Tag::pt2_compliant_tag});
  // One axis of the criss-cross form: attention among the tokens of each image row (axis=2) or column
  // (axis=1), with the segment sums of log_decay along that axis added to the scores.
  m.def("axial_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor log_decay, int axis, float scale) "
        "-> (Tensor out, Tensor lse)",
        {at::Tag::pt2_compliant_tag});
  // An optional second value stream (grad_out2, v2, out2) over the same q, k, decays and lse: one
  // pass gives the summed dq, dk and dlog_decay of both attentions and each one's dv (dv2 empty without).
  m.def("axial_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor log_decay, Tensor out, "
        "Tensor lse, int axis, float scale, bool decay_grad, Tensor? grad_out2=None, Tensor? v2=None, "
        "Tensor? out2=None) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dlog_decay, Tensor dv2)",
        {at::Tag::pt2_compliant_tag});
  // The criss-cross form in one pass: both softmaxes once, out = (parts[0] + parts[1]) / 2 with
  // parts = [A_h y_w, A_w y_h], mids = [y_w, y_h] = [A_w v, A_h v], lse = [row softmax, column softmax]:
  // what the three axial_attention_bwd calls of its backward need (the two row attentions share one
  // call as two value streams). Without save_for_backward (no gradient wanted) parts and mids are
  // empty and never written: inference stores only out.
  m.def("axial_decay_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor log_alpha, Tensor log_beta, float scale, "
        "bool save_for_backward=True) -> (Tensor out, Tensor parts, Tensor mids, Tensor lse)",
        {at::Tag::pt2_compliant_tag});
  m.def("gaussian_mask_attention(Tensor q, Tensor k, Tensor v, Tensor mix_weight, Tensor mix_sigma, "
        "float? scale=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("gaussian_mask_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor mix_weight, Tensor mix_sigma, "
        "float scale) -> (Tensor out, Tensor lse)",
        {at::Tag::pt2_compliant_tag});
  m.def("gaussian_mask_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor mix_weight, "
        "Tensor mix_sigma, Tensor out, Tensor lse, float scale, bool mix_grad) "
        "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dmix_weight, Tensor dmix_sigma)",
        {at::Tag::pt2_compliant_tag});
  m.def("reduced_attention(Tensor q, Tensor k, Tensor v, float? scale=None) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("reduced_attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)",
        {at::Tag::pt2_compliant_tag});
  m.def("reduced_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) "
        "-> (Tensor dq, Tensor dk, Tensor dv)",
        {at::Tag::pt2_compliant_tag});

  // ---- quant family (post-training-quantized attention) ----
  m.def("quant_attention(Tensor q, Tensor k, Tensor v, float q_scale, float k_scale, float v_scale, *, "
        "int q_zero=0, int k_zero=0, int v_zero=0, int attn_bits=4, float attn_base=1.4142135623730951, "
        "float attn_delta=1.0, float? scale=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});

  // ---- lowbit family (int8 W8A8, int4 W4A16 / W4A8, power-of-two shift weights) ----
  m.def("quantize_per_token(Tensor x, *, bool symmetric=True) -> (Tensor q, Tensor scale, Tensor zero_point)",
        {at::Tag::pt2_compliant_tag});
  // w_q: [N, K] int8, or the same weights in the kernels' blocked layout (vitkernels.lowbit.block_int8).
  m.def("int8_linear(Tensor x_q, Tensor x_scale, Tensor? x_zero_point, Tensor w_q, Tensor w_scale, "
        "Tensor? bias=None, *, str activation=\"none\", ScalarType? out_dtype=None) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("dynamic_int8_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None, *, "
        "str activation=\"none\", bool symmetric=True) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("int4_linear(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? w_zero, int group_size, "
        "Tensor? bias=None, *, str activation=\"none\") -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("int4_int8_linear(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? bias=None, *, "
        "str activation=\"none\") -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("shift_linear(Tensor x, Tensor w_packed, Tensor? w_scale=None, Tensor? bias=None, *, "
        "str activation=\"none\") -> Tensor",
        {at::Tag::pt2_compliant_tag});

  // ---- shiftadd family (ShiftAddViT: binary "MatAdd" linear attention, mixture-of-experts dispatch) ----
  // The public attention is a composite over *_fwd, which also returns what autograd saves for *_bwd:
  // the codes bit-packed, the norms and the d x dv state (empty without save_for_backward).
  m.def("binary_linear_attention(Tensor q, Tensor k, Tensor v) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("binary_linear_attention_fwd(Tensor q, Tensor k, Tensor v, bool save_for_backward=True) "
        "-> (Tensor out, Tensor codes, Tensor norms, Tensor state)",
        {at::Tag::pt2_compliant_tag});
  m.def("binary_linear_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor codes, "
        "Tensor norms, Tensor state) -> (Tensor dq, Tensor dk, Tensor dv)",
        {at::Tag::pt2_compliant_tag});
  m.def("expert_dispatch(Tensor x, Tensor expert_index, int num_experts) "
        "-> (Tensor x_sorted, Tensor offsets, Tensor order)",
        {at::Tag::pt2_compliant_tag});
  m.def("expert_combine(Tensor y_sorted, Tensor order, Tensor gate) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("expert_combine_bwd(Tensor grad_out, Tensor y_sorted, Tensor order, Tensor gate, bool y_grad, "
        "bool gate_grad) -> (Tensor dy_sorted, Tensor dgate)",
        {at::Tag::pt2_compliant_tag});
}
