// The public attention ops as composites over their internal forward ops (CompositeImplicitAutograd,
// so autograd, torch.compile and torch.export all see the forward op, whose backward is its own op).
// In C++ so that a C++-only process (libtorch + this library, e.g. an AOTInductor deployment or a
// plain C++ caller) has them too. They do two things: the default scale head_dim^-1/2, and for the
// ops whose forward can skip its saved tensors, save_for_backward only when a gradient is wanted.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <tuple>

namespace vitk {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Tensors2 = std::tuple<Tensor, Tensor>;

template <class Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// head_dim^-1/2 of q's last dimension. A head_dim of 0 (or a q of no dimension) is left to the forward
// op's argument check, which names it; 1.0 here only keeps this arithmetic finite until then.
double default_scale(const Tensor& q, std::optional<double> scale) {
  if (scale.has_value()) return *scale;
  if (q.dim() == 0) return 1.0;
  const int64_t d = q.sym_size(-1).guard_int(__FILE__, __LINE__);
  return d > 0 ? 1.0 / std::sqrt(static_cast<double>(d)) : 1.0;
}

bool wants_grad(std::initializer_list<const Tensor*> inputs) {
  if (!c10::GradMode::is_enabled()) return false;
  for (const Tensor* t : inputs)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

Tensor window_attention(const Tensor& q, const Tensor& k, const Tensor& v, at::IntArrayRef window_size,
                        at::IntArrayRef shift_size, const OptTensor& rel_pos_bias, std::optional<double> scale) {
  static const auto fwd = op<Tensors2(const Tensor&, const Tensor&, const Tensor&, at::IntArrayRef, at::IntArrayRef,
                                      const OptTensor&, double)>("vitk::window_attention_fwd");
  return std::get<0>(fwd.call(q, k, v, window_size, shift_size, rel_pos_bias, default_scale(q, scale)));
}

Tensor varlen_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                        int64_t max_seqlen, std::optional<double> scale) {
  static const auto fwd = op<Tensors2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, double)>(
      "vitk::varlen_attention_fwd");
  return std::get<0>(fwd.call(q, k, v, cu_seqlens, max_seqlen, default_scale(q, scale)));
}

Tensor polyline_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& log_alpha,
                          const Tensor& log_beta, std::optional<double> scale, bool symmetric) {
  static const auto fwd = op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                const Tensor&, const Tensor&, double, bool, bool)>(
      "vitk::polyline_attention_fwd");
  // Inference skips the saved halves of the symmetric form: the kernel then stores only the output.
  const bool save = wants_grad({&q, &k, &v, &log_alpha, &log_beta});
  return std::get<0>(fwd.call(q, k, v, log_alpha, log_beta, default_scale(q, scale), symmetric, save));
}

Tensor axial_decay_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& log_alpha,
                             const Tensor& log_beta, std::optional<double> scale) {
  static const auto fwd = op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, bool)>(
      "vitk::axial_decay_attention_fwd");
  // Inference skips the four saved tensors: the kernel then stores only the output.
  const bool save = wants_grad({&q, &k, &v, &log_alpha, &log_beta});
  return std::get<0>(fwd.call(q, k, v, log_alpha, log_beta, default_scale(q, scale), save));
}

Tensor gaussian_mask_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mix_weight,
                               const Tensor& mix_sigma, std::optional<double> scale) {
  static const auto fwd =
      op<Tensors2(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double)>(
          "vitk::gaussian_mask_attention_fwd");
  return std::get<0>(fwd.call(q, k, v, mix_weight, mix_sigma, default_scale(q, scale)));
}

Tensor reduced_attention(const Tensor& q, const Tensor& k, const Tensor& v, std::optional<double> scale) {
  static const auto fwd =
      op<Tensors2(const Tensor&, const Tensor&, const Tensor&, double)>("vitk::reduced_attention_fwd");
  return std::get<0>(fwd.call(q, k, v, default_scale(q, scale)));
}

Tensor binary_linear_attention(const Tensor& q, const Tensor& k, const Tensor& v) {
  static const auto fwd =
      op<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, bool)>(
          "vitk::binary_linear_attention_fwd");
  // Inference keeps only the output: the codes, norms and state are not returned.
  return std::get<0>(fwd.call(q, k, v, wants_grad({&q, &k, &v})));
}

}  // namespace

TORCH_LIBRARY_IMPL(vitk, CompositeImplicitAutograd, m) {
  m.impl("window_attention", TORCH_FN(window_attention));
  m.impl("varlen_attention", TORCH_FN(varlen_attention));
  m.impl("polyline_attention", TORCH_FN(polyline_attention));
  m.impl("axial_decay_attention", TORCH_FN(axial_decay_attention));
  m.impl("gaussian_mask_attention", TORCH_FN(gaussian_mask_attention));
  m.impl("reduced_attention", TORCH_FN(reduced_attention));
  m.impl("binary_linear_attention", TORCH_FN(binary_linear_attention));
}

}  // namespace vitk
