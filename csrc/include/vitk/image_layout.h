// The image layout every image-family CPU kernel reads (window, polyline, axial and Gaussian-mask
// attention): q, k [B, H, W, heads, dqk] and v [B, H, W, heads, dv], any strides. Their sizes, the
// checks of the three tensors, and a strided view that finds one token's head row in place (a
// packed qkv projection is read without a copy).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <utility>

#include "vitk/attention_driver.h"
#include "vitk/checks.h"

namespace vitk {
namespace cpu {

struct ImageDims {
  int64_t B = 0, H = 0, W = 0, nh = 0, dqk = 0, dv = 0;
};

inline ImageDims image_dims(const at::Tensor& q, const at::Tensor& v) {
  return ImageDims{q.size(0), q.size(1), q.size(2), q.size(3), q.size(4), v.size(4)};
}

// q, k, v of one image-layout op on the CPU: float dtypes, five dimensions, k shaped like q, v like
// q but for its head dim, and non-empty head dims.
inline void check_image_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}}) {
    check_dtype_in(t, name, {at::kFloat, at::kHalf, at::kBFloat16});
    check_device_type(t, name, c10::DeviceType::CPU);
    check_dim_in(t, name, 5, 5);
  }
  check_same_dtype(q, "q", k, "k");
  check_same_dtype(q, "q", v, "v");
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "k: expected the shape of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes().slice(0, 4) == q.sizes().slice(0, 4), "v: expected shape ", q.sizes().slice(0, 4),
                    " + [head_dim_v], got ", v.sizes());
  check_nonempty_dim(q, "q", 4, "head_dim");
  check_nonempty_dim(v, "v", 4, "head_dim");
}

// A [B, H, W, heads, d] tensor read in place: row(b, y, x, h) is one token's head row (the
// attention driver's strided rows, vitk/attention_driver.h).
template <typename T>
using TokenView = attn::Rows<T, 5>;

}  // namespace cpu
}  // namespace vitk
