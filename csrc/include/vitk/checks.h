// Argument checks shared by every CPU and CUDA entry point. Each message names the argument and
// says what was expected, so a user sees "codebook: expected ..." rather than a crash.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>

namespace vitk {

inline std::string dtype_list(std::initializer_list<at::ScalarType> types) {
  std::string s;
  for (auto t : types) {
    if (!s.empty()) s += ", ";
    s += c10::toString(t);
  }
  return s;
}

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, ": expected a tensor, got None");
}

inline void check_dtype_in(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> types) {
  check_defined(t, name);
  for (auto ty : types)
    if (t.scalar_type() == ty) return;
  TORCH_CHECK_VALUE(false, name, ": expected dtype in {", dtype_list(types), "}, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), b_name, ": expected the same dtype as ", a_name, " (",
                    a.scalar_type(), "), got ", b.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), b_name, ": expected a tensor on ", a_name, "'s device (", a.device(),
                    "), got one on ", b.device());
}

inline void check_device_type(const at::Tensor& t, const char* name, c10::DeviceType type) {
  TORCH_CHECK_VALUE(t.device().type() == type, name, ": expected a ", c10::DeviceTypeName(type, /*lower_case=*/true),
                    " tensor, got one on ", t.device());
}

inline void check_dim_in(const at::Tensor& t, const char* name, int64_t lo, int64_t hi) {
  TORCH_CHECK_VALUE(t.dim() >= lo && t.dim() <= hi, name, ": expected ", lo == hi ? std::to_string(lo)
                    : std::to_string(lo) + " to " + std::to_string(hi), " dimensions, got shape ", t.sizes());
}

// A tensor that must match q's device and dtype and have exactly `shape` (a backward's grad_out and out).
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& q, at::IntArrayRef shape) {
  check_defined(t, name);
  check_same_device(q, "q", t, name);
  check_same_dtype(q, "q", t, name);
  TORCH_CHECK_VALUE(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
}

// A forward's saved log-sum-exp: fp32, on q's device, of exactly `shape`.
inline void check_lse_like(const at::Tensor& lse, const at::Tensor& q, at::IntArrayRef shape) {
  check_dtype_in(lse, "lse", {at::kFloat});
  check_same_device(q, "q", lse, "lse");
  TORCH_CHECK_VALUE(lse.sizes() == shape, "lse: expected shape ", shape, ", got ", lse.sizes());
}

inline void check_nonempty_dim(const at::Tensor& t, const char* name, int64_t dim, const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) > 0, name, ": expected a non-empty ", what, " dimension, got shape ", t.sizes());
}

}  // namespace vitk
