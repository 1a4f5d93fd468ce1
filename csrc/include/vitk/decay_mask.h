// Shared pieces of the decay-masked CPU attention kernels (polyline_attention.cpp, PPMA whole / RMT,
// and axial_attention.cpp, PPMA chunk): reading and writing lines of [B, H, W, heads] decay tensors
// of any float dtype and any strides (a per-head constant arrives as an expand() with zero strides),
// the argument checks, and the runs the portable polyline modifier adds along image rows.
//
// Decays are read into double and summed into double prefix sums. The masks are differences of
// those prefix sums, which reach -1700 over 56 steps of -30 while the differences that matter (the
// near neighbours' decay, the keys that carry the softmax) can be 1e-3: fp32 prefix sums would
// round those away, so every difference is formed in double and only then rounded to fp32.
// Non-finite decays are kept out of the sums and counted (see split_nonfinite), so the masks are
// exact IEEE path sums: the diagonal is 0, and a cell off every path changes nothing.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/isfinite.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include "vitk/attention_core.h"
#include "vitk/checks.h"
#include "vitk/image_layout.h"

namespace vitk {
namespace cpu {
namespace decay {

// dst[x] = t.flat[offset + x * step] for x < n, as double (t: any float dtype, read in place).
inline void read_line(const at::Tensor& t, int64_t offset, int64_t step, int64_t n, double* dst) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "read_decay", [&] {
    const scalar_t* p = t.data_ptr<scalar_t>() + offset;
    for (int64_t x = 0; x < n; ++x) dst[x] = static_cast<double>(p[x * step]);
  });
}

// t.flat[offset + x * step] = src[x] for x < n, rounded to t's dtype.
inline void write_line(at::Tensor& t, int64_t offset, int64_t step, int64_t n, const double* src) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "write_decay_grad", [&] {
    scalar_t* p = t.data_ptr<scalar_t>() + offset;
    for (int64_t x = 0; x < n; ++x) p[x * step] = static_cast<scalar_t>(src[x]);
  });
}

// ------------------------------------------------------------------------------ non-finite decays

// A mask entry is the IEEE sum of the decays on its path: -inf there is a legal "no path" (-inf),
// NaN or both infinities give NaN, +inf gives +inf, and a cell off the path never matters. Prefix
// sums cannot carry that (-inf - -inf is NaN, and x[0] would enter every difference), so the prefix
// sums hold the finite decays only and the non-finite ones are counted instead: each is a code with
// a count of 1 in its class's field, the codes are prefix-summed like the values, and the code of a
// path (the difference of two prefix codes, or a sum of such) counts its -inf, +inf and NaN cells.
constexpr int kCodeBits = 21;
constexpr int64_t kCodeNegInf = 1, kCodePosInf = int64_t(1) << kCodeBits, kCodeNaN = int64_t(1) << (2 * kCodeBits);
constexpr int64_t kCodeField = kCodePosInf - 1;

// A non-finite decay is counted into the masks, not summed into them, so no gradient reaches it (in
// the reference too, where that count is not differentiable): its cell's gradient is 0, even where
// NaN rows make the gradients of the finite cells on their paths NaN.
inline void zero_nonfinite_grads(at::Tensor& grad, const at::Tensor& decay) {
  grad.masked_fill_(at::isfinite(decay).logical_not(), 0);
}

// Moves the non-finite entries of x[0, n) into code[0, n) (x becomes 0 there, code 0 elsewhere).
// Returns whether there was any; code is written only then.
inline bool split_nonfinite(double* x, int64_t* code, int64_t n) {
  int64_t first = 0;
  while (first < n && std::isfinite(x[first])) ++first;
  if (first == n) return false;
  std::fill(code, code + first, int64_t(0));
  for (int64_t j = first; j < n; ++j) {
    code[j] = std::isnan(x[j]) ? kCodeNaN : (std::isfinite(x[j]) ? 0 : (x[j] < 0 ? kCodeNegInf : kCodePosInf));
    if (code[j] != 0) x[j] = 0.0;
  }
  return true;
}

// The IEEE sum of a path's non-finite decays, from the path's code: 0 when it has none.
inline float path_special(int64_t code) {
  if (code == 0) return 0.f;
  const bool neg = (code & kCodeField) != 0, pos = ((code >> kCodeBits) & kCodeField) != 0;
  if ((code >> (2 * kCodeBits)) != 0 || (neg && pos)) return std::numeric_limits<float>::quiet_NaN();
  return neg ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
}

// Prefix sums in place, x[j] = x[0] + ... + x[j].
template <typename V>
inline void prefix_sum(V* x, int64_t n) {
  for (int64_t j = 1; j < n; ++j) x[j] += x[j - 1];
}

// Flat offset of element (b, i, j, h) and the strides of a [B, H, W, heads] tensor.
struct PlaneStrides {
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  explicit PlaneStrides(const at::Tensor& t) : s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  int64_t at(int64_t b, int64_t i, int64_t j, int64_t h) const { return b * s0 + i * s1 + j * s2 + h * s3; }
};

// The gradient of a decay from the gradient of its prefix sums: x[c] enters every prefix P[j], j >= c,
// so dx[c] = sum_{j >= c} dP[j]. The first element of a line never enters a segment sum (segments are
// (min, max]), and its contributions cancel exactly in theory; it is set to the exact 0.
inline void reverse_prefix(const double* dP, int64_t n, double* dx) {
  double acc = 0.0;
  for (int64_t c = n - 1; c >= 1; --c) {
    acc += dP[c];
    dx[c] = acc;
  }
  if (n > 0) dx[0] = 0.0;
}

// One query's row d[0, n) of dS in a decay gradient: y += d, z += e, and returns the sum of e, with
// e[x] = sgn(p1 - p[x]) d[x] (p: each key's position along the line the decay runs on; p1: the
// query's). d, y, z and p extend to n rounded up to 16 (the padding lanes of d are zero).
inline float signed_row_sums(const float* __restrict d, const int32_t* __restrict p, int32_t p1, int64_t n,
                             float* __restrict y, float* __restrict z) {
#ifdef __AVX512F__
  using namespace attn::simd;
  const __m512i p1v = _mm512_set1_epi32(p1);
  vf acc = zero();
  for (int64_t x = 0; x < n; x += attn::kLanes) {
    const vf dv = load(d + x);
    const __m512i pv = _mm512_loadu_si512(p + x);
    store(y + x, add(load(y + x), dv));
    vf e = _mm512_mask_sub_ps(dv, _mm512_cmpgt_epi32_mask(pv, p1v), zero(), dv);
    e = _mm512_maskz_mov_ps(static_cast<__mmask16>(~_mm512_cmpeq_epi32_mask(pv, p1v)), e);
    acc = add(acc, e);
    store(z + x, add(load(z + x), e));
  }
  return hsum(acc);
#else
  float tot = 0.f;
  for (int64_t x = 0; x < n; ++x) {
    y[x] += d[x];
    const float e = p[x] < p1 ? d[x] : (p[x] > p1 ? -d[x] : 0.f);
    z[x] += e;
    tot += e;
  }
  return tot;
#endif
}

// ------------------------------------------------------------------------------ checks

inline void check_decay(const at::Tensor& t, const char* name, const at::Tensor& q) {
  check_dtype_in(t, name, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
  check_same_device(q, "q", t, name);
  TORCH_CHECK_VALUE(t.sizes() == q.sizes().slice(0, 4), name, ": expected shape [B, H, W, heads] = ",
                    q.sizes().slice(0, 4), " (broadcast views with zero strides are fine), got ", t.sizes());
}

// grad_out / out of the backward: q's dtype and device, [B, H, W, heads, dv] (with `lead` leading
// dimensions first, e.g. the 2 halves of a symmetric polyline output).
inline void check_like_out(const at::Tensor& t, const char* name, const at::Tensor& q, const at::Tensor& v,
                           c10::optional<int64_t> lead = c10::nullopt) {
  std::vector<int64_t> shape;
  if (lead.has_value()) shape.push_back(*lead);
  for (int64_t d = 0; d < 4; ++d) shape.push_back(q.size(d));
  shape.push_back(v.size(4));
  check_like(t, name, q, shape);
}

inline void check_lse(const at::Tensor& lse, const at::Tensor& q, c10::optional<int64_t> lead = c10::nullopt) {
  std::vector<int64_t> shape;
  if (lead.has_value()) shape.push_back(*lead);
  for (int64_t d = 0; d < 4; ++d) shape.push_back(q.size(d));
  check_lse_like(lse, q, shape);
}

// ------------------------------------------------------------------------------ short runs

// The portable (non-AVX-512) path adds the polyline mask along runs of W keys, one image row each.
// (The AVX-512 path instead reads and writes each score vector once: runs start mid-vector, and
// masked read-modify-writes of overlapping vectors stall on store forwarding.)

// dst[x] += a[x] + b[x], x < n.
inline void add2_run(float* __restrict dst, const float* __restrict a, const float* __restrict b, int64_t n) {
  for (int64_t x = 0; x < n; ++x) dst[x] += a[x] + b[x];
}

// dst[x] += a[x], x < n.
inline void add_run(float* __restrict dst, const float* __restrict a, int64_t n) {
  for (int64_t x = 0; x < n; ++x) dst[x] += a[x];
}

}  // namespace decay
}  // namespace cpu
}  // namespace vitk
