// CPU kernels of the one-level 2-D dual-tree complex wavelet transform and of its inverse, with
// their adjoints (the backward passes): every op is one analysis or synthesis bank per image plane
// (vitk/dtcwt_plane.h), parallel over the B * C planes, each plane's intermediates held in a
// per-thread buffer that stays in cache at ViT sizes. Inputs are read through their strides (any
// layout, channels-last included) and converted to the accumulation type row by row: fp32 for fp32,
// fp16 and bf16, fp64 for fp64.
#include "vitk/spectral.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "vitk/checks.h"
#include "vitk/dtcwt_plane.h"
#include "vitk/registration.h"

namespace vitk {
namespace cpu {
namespace {

constexpr std::initializer_list<at::ScalarType> kFloatTypes = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};

void check_image(const at::Tensor& t, const char* name) {
  check_dtype_in(t, name, kFloatTypes);
  check_device_type(t, name, c10::DeviceType::CPU);
  TORCH_CHECK_VALUE(t.dim() == 4, name, ": expected 4 dimensions [B, C, H, W], got shape ", t.sizes());
}

// highpass [B, C, 6, h, w, 2] for a lowpass-shaped [B, C, 2h, 2w] reference of `ref_name`.
void check_highpass(const at::Tensor& hp, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_dtype_in(hp, name, kFloatTypes);
  check_same_device(ref, ref_name, hp, name);
  check_same_dtype(ref, ref_name, hp, name);
  TORCH_CHECK_VALUE(hp.dim() == 6, name, ": expected 6 dimensions [B, C, 6, H/2, W/2, 2], got shape ", hp.sizes());
  TORCH_CHECK_VALUE(hp.size(2) == 6, name, ": expected 6 orientations in dimension 2, got shape ", hp.sizes());
  TORCH_CHECK_VALUE(hp.size(5) == 2, name, ": expected a last dimension of 2 (real, imaginary), got shape ",
                    hp.sizes());
  const int64_t H = ref.size(2), W = ref.size(3);
  TORCH_CHECK_VALUE(H % 2 == 0 && W % 2 == 0, ref_name, ": expected even H and W, got shape ", ref.sizes());
  TORCH_CHECK_VALUE(hp.size(0) == ref.size(0) && hp.size(1) == ref.size(1) && hp.size(3) == H / 2 &&
                        hp.size(4) == W / 2,
                    name, ": expected shape [", ref.size(0), ", ", ref.size(1), ", 6, ", H / 2, ", ", W / 2,
                    ", 2] to match ", ref_name, " ", ref.sizes(), ", got ", hp.sizes());
}

// Row r of a strided plane (W values at stride sw) into acc_t.
template <typename scalar_t, typename acc_t>
inline void load(const scalar_t* src, int64_t n, int64_t stride, acc_t* dst) {
  if (stride == 1) {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j * stride]);
  }
}

template <typename scalar_t, typename acc_t>
inline void store(const acc_t* src, int64_t n, scalar_t* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

// Row i of orientation o of a strided highpass plane (strides s[2..5]) as W = 2w interleaved values.
template <typename scalar_t, typename acc_t>
inline void load_band(const scalar_t* plane, const int64_t* s, int o, int64_t i, int64_t w, acc_t* dst) {
  const scalar_t* src = plane + o * s[2] + i * s[3];
  if (s[4] == 2 && s[5] == 1) {
    load(src, 2 * w, 1, dst);
    return;
  }
  for (int64_t j = 0; j < w; ++j) {
    dst[2 * j] = static_cast<acc_t>(src[j * s[4]]);
    dst[2 * j + 1] = static_cast<acc_t>(src[j * s[4] + s[5]]);
  }
}

// Analysis of every plane of x [B, C, H, W] (odd sides padded by repeating the last row / column),
// with `bank`, into lowpass [B, C, H', W'] and highpass [B, C, 6, H'/2, W'/2, 2].
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> analyse(const at::Tensor& x, bool synthesis_filters) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t He = H + H % 2, We = W + W % 2, h = He / 2, w = We / 2;
  at::Tensor low = at::empty({B, C, He, We}, x.options());
  at::Tensor high = at::empty({B, C, 6, h, w, 2}, x.options());
  if (low.numel() == 0) return {low, high};
  const auto bank = synthesis_filters ? dtcwt::synthesis_bank<acc_t>() : dtcwt::analysis_bank<acc_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* lp = low.mutable_data_ptr<scalar_t>();
  scalar_t* hp = high.mutable_data_ptr<scalar_t>();
  const int64_t sB = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  at::parallel_for(0, B * C, 1, [&](int64_t p0, int64_t p1) {
    dtcwt::Scratch<acc_t> s;
    for (int64_t p = p0; p < p1; ++p) {
      const scalar_t* src = xp + (p / C) * sB + (p % C) * sC;
      scalar_t* lo_out = lp + p * He * We;
      scalar_t* hi_out = hp + p * 6 * h * w * 2;
      dtcwt::analysis(
          He, We, bank, s,
          [&](int64_t r, acc_t* dst) {
            load(src + std::min(r, H - 1) * sH, W, sW, dst);
            if (W < We) dst[W] = dst[W - 1];
          },
          [&](int64_t r, const acc_t* row) { store(row, We, lo_out + r * We); },
          [&](int o, int64_t i, const acc_t* row) { store(row, We, hi_out + (o * h + i) * We); });
    }
  });
  return {low, high};
}

// Synthesis of every plane from lowpass [B, C, H, W] and highpass [B, C, 6, H/2, W/2, 2] into
// [B, C, out_h, out_w], where out_h is H or H - 1 (the adjoint of the odd-size padding: the last
// synthesized row is added into the one before it), and the same for out_w.
template <typename scalar_t>
at::Tensor synthesise(const at::Tensor& low, const at::Tensor& high, int64_t out_h, int64_t out_w,
                      bool synthesis_filters) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = low.size(0), C = low.size(1), H = low.size(2), W = low.size(3), w = W / 2;
  at::Tensor out = at::empty({B, C, out_h, out_w}, low.options());
  if (out.numel() == 0) return out;
  const auto bank = synthesis_filters ? dtcwt::synthesis_bank<acc_t>() : dtcwt::analysis_bank<acc_t>();
  const scalar_t* lp = low.const_data_ptr<scalar_t>();
  const scalar_t* hp = high.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t* ls = low.strides().data();
  const int64_t* hs = high.strides().data();
  const bool fold_rows = out_h < H, fold_cols = out_w < W;
  at::parallel_for(0, B * C, 1, [&](int64_t p0, int64_t p1) {
    dtcwt::Scratch<acc_t> s;
    std::vector<acc_t> pending(static_cast<size_t>(W));
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / C, c = p % C;
      const scalar_t* lsrc = lp + b * ls[0] + c * ls[1];
      const scalar_t* hsrc = hp + b * hs[0] + c * hs[1];
      scalar_t* dst = op + p * out_h * out_w;
      dtcwt::synthesis(
          H, W, bank, s, [&](int64_t r, acc_t* row) { load(lsrc + r * ls[2], W, ls[3], row); },
          [&](int o, int64_t i, acc_t* row) { load_band(hsrc, hs, o, i, w, row); },
          [&](int64_t r, const acc_t* row) {
            acc_t* t = pending.data();
            if (fold_rows && r == H - 2) {  // held until the padded row H - 1 is added to it
              std::copy(row, row + W, t);
              return;
            }
            if (fold_rows && r == H - 1) {
              for (int64_t j = 0; j < W; ++j) t[j] += row[j];
              row = t;
              r = H - 2;
            }
            scalar_t* d = dst + r * out_w;
            for (int64_t j = 0; j < out_w; ++j) d[j] = static_cast<scalar_t>(row[j]);
            if (fold_cols) d[out_w - 1] = static_cast<scalar_t>(row[out_w - 1] + row[W - 1]);
          });
    }
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dtcwt2d(const at::Tensor& x) {
  check_image(x, "x");
  TORCH_CHECK_VALUE(x.size(2) > 0 && x.size(3) > 0, "x: expected non-empty H and W, got shape ", x.sizes());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dtcwt2d",
                                         [&] { return analyse<scalar_t>(x, false); });
}

std::tuple<at::Tensor, at::Tensor> idtcwt2d_backward(const at::Tensor& grad_output) {
  check_image(grad_output, "grad_output");
  TORCH_CHECK_VALUE(grad_output.size(2) % 2 == 0 && grad_output.size(3) % 2 == 0,
                    "grad_output: expected even H and W, got shape ", grad_output.sizes());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "idtcwt2d_backward",
                                         [&] { return analyse<scalar_t>(grad_output, true); });
}

at::Tensor idtcwt2d(const at::Tensor& lowpass, const at::Tensor& highpass) {
  check_image(lowpass, "lowpass");
  check_highpass(highpass, "highpass", lowpass, "lowpass");
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lowpass.scalar_type(), "idtcwt2d", [&] {
    return synthesise<scalar_t>(lowpass, highpass, lowpass.size(2), lowpass.size(3), true);
  });
}

at::Tensor dtcwt2d_backward(const at::Tensor& grad_lowpass, const at::Tensor& grad_highpass,
                            c10::SymIntArrayRef input_size) {
  check_image(grad_lowpass, "grad_lowpass");
  check_highpass(grad_highpass, "grad_highpass", grad_lowpass, "grad_lowpass");
  TORCH_CHECK_VALUE(input_size.size() == 2, "input_size: expected [H, W], got ", input_size);
  const int64_t H = input_size[0].guard_int(__FILE__, __LINE__);
  const int64_t W = input_size[1].guard_int(__FILE__, __LINE__);
  TORCH_CHECK_VALUE(H > 0 && W > 0 && H + H % 2 == grad_lowpass.size(2) && W + W % 2 == grad_lowpass.size(3),
                    "input_size: expected sizes that round up to grad_lowpass's ", grad_lowpass.sizes().slice(2),
                    ", got ", input_size);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_lowpass.scalar_type(), "dtcwt2d_backward",
                                         [&] { return synthesise<scalar_t>(grad_lowpass, grad_highpass, H, W, false); });
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "dtcwt2d", vitk::Backend::kCpu, &vitk::cpu::dtcwt2d);
  VITK_IMPL(m, "dtcwt2d_backward", vitk::Backend::kCpu, &vitk::cpu::dtcwt2d_backward);
  VITK_IMPL(m, "idtcwt2d", vitk::Backend::kCpu, &vitk::cpu::idtcwt2d);
  VITK_IMPL(m, "idtcwt2d_backward", vitk::Backend::kCpu, &vitk::cpu::idtcwt2d_backward);
}
