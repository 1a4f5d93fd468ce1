// CPU kernel of svt_spectral_mix: SVT's whole spectral layer (DTCWT, lowpass weighting, complex
// block MLP over the six highpass orientations, inverse DTCWT) on channels-last x [B, H, W, C].
//
// The unit of work is one image: its C planes are analysed one by one (vitk/dtcwt_plane.h), a cache
// line's worth of channels at a time staged planar, the weighted lowpass kept per channel and the
// highpass written position-major ([6 h w][C], real and imaginary apart) into a per-thread buffer,
// so each position's channel vector is contiguous for the MLP, which then runs in place, block by
// block: for the common block sizes (8, 16, 32) a few positions at a time share each weight row's
// loads, with both layers' accumulators in registers. The synthesis reads that buffer back per
// channel group and writes the output a group at a time into [H, W, C]. x is read once and the
// output written once; the [B, C, 6, H/2, W/2, 2] highpass never exists, only one image's share of
// it (C * 6 * H/2 * W/2 * 2 values, about 2.4 MB at SVT-S stage 1), which stays in the core's cache
// hierarchy.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "vitk/checks.h"
#include "vitk/dtcwt_plane.h"
#include "vitk/registration.h"
#include "vitk/spectral.h"

namespace vitk {
namespace cpu {
namespace {

constexpr std::initializer_list<at::ScalarType> kFloatTypes = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};

void check_param(const at::Tensor& t, const char* name, const at::Tensor& x, at::IntArrayRef shape,
                 const char* layout) {
  check_dtype_in(t, name, kFloatTypes);
  check_same_device(x, "x", t, name);
  TORCH_CHECK_VALUE(t.sizes() == shape, name, ": expected shape ", layout, " = ", shape, ", got ", t.sizes());
}

// A parameter as a contiguous acc_t copy (they are small: C * H * W at most).
template <typename acc_t>
std::vector<acc_t> to_acc(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  std::vector<acc_t> out(static_cast<size_t>(c.numel()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "svt_param", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<acc_t>(p[i]);
  });
  return out;
}

// One complex block layer on the channel vectors (zr, zi) of P positions (row stride ld), block n:
// (yr + i yi) = (zr + i zi)(Wr + i Wi) + (br + i bi) over the block's BS channels, ReLU'd on both
// parts when `relu`. Each weight row is loaded once for the P positions and the P * 2 * BS
// accumulators (64 floats for the P chosen below) stay in registers.
template <int BS, int P, typename acc_t>
inline void complex_layer_tile(const acc_t* zr, const acc_t* zi, int64_t ld, const acc_t* wr, const acc_t* wi,
                               const acc_t* br, const acc_t* bi, bool relu, acc_t* yr, acc_t* yi, int64_t ldy) {
  acc_t ar[P][BS], ai[P][BS];
  for (int p = 0; p < P; ++p) {
#pragma omp simd
    for (int k = 0; k < BS; ++k) {
      ar[p][k] = br[k];
      ai[p][k] = bi[k];
    }
  }
  for (int d = 0; d < BS; ++d) {
    const acc_t* __restrict r = wr + d * BS;
    const acc_t* __restrict i = wi + d * BS;
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      const acc_t a = zr[p * ld + d], b = zi[p * ld + d];
#pragma omp simd
      for (int k = 0; k < BS; ++k) {
        ar[p][k] += a * r[k] - b * i[k];
        ai[p][k] += a * i[k] + b * r[k];
      }
    }
  }
  for (int p = 0; p < P; ++p) {
#pragma omp simd
    for (int k = 0; k < BS; ++k) {
      // max(v, 0) written so that a NaN stays NaN, as torch.relu keeps it.
      yr[p * ldy + k] = relu && ar[p][k] < acc_t(0) ? acc_t(0) : ar[p][k];
      yi[p * ldy + k] = relu && ai[p][k] < acc_t(0) ? acc_t(0) : ai[p][k];
    }
  }
}

// The same for one position and a block size known only at run time.
template <typename acc_t>
inline void complex_layer(const acc_t* zr, const acc_t* zi, const acc_t* wr, const acc_t* wi, const acc_t* br,
                          const acc_t* bi, int64_t bs, bool relu, acc_t* __restrict yr, acc_t* __restrict yi) {
#pragma omp simd
  for (int64_t k = 0; k < bs; ++k) {
    yr[k] = br[k];
    yi[k] = bi[k];
  }
  for (int64_t d = 0; d < bs; ++d) {
    const acc_t a = zr[d], b = zi[d];
    const acc_t* __restrict r = wr + d * bs;
    const acc_t* __restrict i = wi + d * bs;
#pragma omp simd
    for (int64_t k = 0; k < bs; ++k) {
      yr[k] += a * r[k] - b * i[k];
      yi[k] += a * i[k] + b * r[k];
    }
  }
  if (!relu) return;
  for (int64_t k = 0; k < bs; ++k) {
    yr[k] = yr[k] < acc_t(0) ? acc_t(0) : yr[k];
    yi[k] = yi[k] < acc_t(0) ? acc_t(0) : yi[k];
  }
}

// The block MLP of SVT over npos positions of (zr, zi) [npos, C], in place: per block n, layer 1,
// ReLU, layer 2. w1, b1, w2, b2 hold the real parts followed by the imaginary parts.
template <int BS, typename acc_t>
void block_mlp_tiles(acc_t* zr, acc_t* zi, int64_t npos, int64_t C, int64_t nb, const acc_t* w1, const acc_t* b1,
                     const acc_t* w2, const acc_t* b2) {
  constexpr int P = BS >= 32 ? 1 : 32 / BS;
  const int64_t wstride = nb * BS * BS, bstride = nb * BS;
  acc_t hr[P * BS], hi[P * BS];
  const auto run = [&](auto tile, int64_t p, int64_t n) {
    constexpr int Q = decltype(tile)::value;
    const int64_t wo = n * BS * BS, bo = n * BS;
    acc_t* pr = zr + p * C + n * BS;
    acc_t* pi = zi + p * C + n * BS;
    complex_layer_tile<BS, Q>(pr, pi, C, w1 + wo, w1 + wstride + wo, b1 + bo, b1 + bstride + bo, true, hr, hi, BS);
    complex_layer_tile<BS, Q>(hr, hi, BS, w2 + wo, w2 + wstride + wo, b2 + bo, b2 + bstride + bo, false, pr, pi, C);
  };
  int64_t p = 0;
  for (; p + P <= npos; p += P)
    for (int64_t n = 0; n < nb; ++n) run(std::integral_constant<int, P>{}, p, n);
  for (; p < npos; ++p)
    for (int64_t n = 0; n < nb; ++n) run(std::integral_constant<int, 1>{}, p, n);
}

template <typename acc_t>
void block_mlp(acc_t* zr, acc_t* zi, int64_t npos, int64_t C, int64_t nb, int64_t bs, const acc_t* w1,
               const acc_t* b1, const acc_t* w2, const acc_t* b2) {
  switch (bs) {
    case 8: return block_mlp_tiles<8>(zr, zi, npos, C, nb, w1, b1, w2, b2);
    case 16: return block_mlp_tiles<16>(zr, zi, npos, C, nb, w1, b1, w2, b2);
    case 32: return block_mlp_tiles<32>(zr, zi, npos, C, nb, w1, b1, w2, b2);
    default: break;
  }
  const int64_t wstride = nb * bs * bs, bstride = nb * bs;
  std::vector<acc_t> hr(static_cast<size_t>(bs)), hi(static_cast<size_t>(bs));
  for (int64_t p = 0; p < npos; ++p) {
    acc_t* pr = zr + p * C;
    acc_t* pi = zi + p * C;
    for (int64_t n = 0; n < nb; ++n) {
      const int64_t wo = n * bs * bs, bo = n * bs;
      complex_layer(pr + n * bs, pi + n * bs, w1 + wo, w1 + wstride + wo, b1 + bo, b1 + bstride + bo, bs, true,
                    hr.data(), hi.data());
      complex_layer(hr.data(), hi.data(), w2 + wo, w2 + wstride + wo, b2 + bo, b2 + bstride + bo, bs, false,
                    pr + n * bs, pi + n * bs);
    }
  }
}

template <typename scalar_t>
at::Tensor svt_impl(const at::Tensor& x, const at::Tensor& weight_ll, const at::Tensor& weight_1,
                    const at::Tensor& bias_1, const at::Tensor& weight_2, const at::Tensor& bias_2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t nb = weight_1.size(1), bs = weight_1.size(2), h = H / 2, w = W / 2, npos = 6 * h * w;
  at::Tensor out = at::empty({B, H, W, C}, x.options());
  if (out.numel() == 0) return out;
  const std::vector<acc_t> wll = to_acc<acc_t>(weight_ll), w1 = to_acc<acc_t>(weight_1), b1 = to_acc<acc_t>(bias_1),
                           w2 = to_acc<acc_t>(weight_2), b2 = to_acc<acc_t>(bias_2);
  const auto fwd = dtcwt::analysis_bank<acc_t>();
  const auto inv = dtcwt::synthesis_bank<acc_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t sB = x.stride(0), sH = x.stride(1), sW = x.stride(2), sC = x.stride(3);
  // Channels go through the plane transforms in groups of one cache line's worth, staged planar, so
  // that x, the highpass and the output are each touched a line at a time instead of one strided
  // value per channel (which made every channel walk the whole image and highpass again).
  constexpr int64_t G = 64 / static_cast<int64_t>(sizeof(acc_t));
  const int64_t HW = H * W;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1_) {
    dtcwt::Scratch<acc_t> s;
    std::vector<acc_t> low(static_cast<size_t>(C * HW)), zr(static_cast<size_t>(npos * C)),
        zi(static_cast<size_t>(npos * C)), plane(static_cast<size_t>(G * HW)), hp(static_cast<size_t>(G * npos * 2));
    for (int64_t b = b0; b < b1_; ++b) {
      const scalar_t* img = xp + b * sB;
      scalar_t* dst = op + b * HW * C;
      for (int64_t c0 = 0; c0 < C; c0 += G) {
        const int64_t g = std::min(G, C - c0);
        for (int64_t r = 0; r < H; ++r)
          for (int64_t j = 0; j < W; ++j) {
            const scalar_t* src = img + r * sH + j * sW + c0 * sC;
            for (int64_t l = 0; l < g; ++l) plane[l * HW + r * W + j] = static_cast<acc_t>(src[l * sC]);
          }
        for (int64_t l = 0; l < g; ++l) {
          const acc_t* xc = plane.data() + l * HW;
          acc_t* lc = low.data() + (c0 + l) * HW;
          const acc_t* wc = wll.data() + (c0 + l) * HW;
          acc_t* hc = hp.data() + l * npos * 2;
          dtcwt::analysis(
              H, W, fwd, s, [&](int64_t r, acc_t* row) { std::copy(xc + r * W, xc + (r + 1) * W, row); },
              [&](int64_t r, const acc_t* row) {
                for (int64_t j = 0; j < W; ++j) lc[r * W + j] = row[j] * wc[r * W + j];
              },
              [&](int o, int64_t i, const acc_t* row) { std::copy(row, row + 2 * w, hc + (o * h + i) * w * 2); });
        }
        for (int64_t q = 0; q < npos; ++q)
          for (int64_t l = 0; l < g; ++l) {
            zr[q * C + c0 + l] = hp[l * npos * 2 + 2 * q];
            zi[q * C + c0 + l] = hp[l * npos * 2 + 2 * q + 1];
          }
      }
      block_mlp(zr.data(), zi.data(), npos, C, nb, bs, w1.data(), b1.data(), w2.data(), b2.data());
      for (int64_t c0 = 0; c0 < C; c0 += G) {
        const int64_t g = std::min(G, C - c0);
        for (int64_t q = 0; q < npos; ++q)
          for (int64_t l = 0; l < g; ++l) {
            hp[l * npos * 2 + 2 * q] = zr[q * C + c0 + l];
            hp[l * npos * 2 + 2 * q + 1] = zi[q * C + c0 + l];
          }
        for (int64_t l = 0; l < g; ++l) {
          const acc_t* lc = low.data() + (c0 + l) * HW;
          const acc_t* hc = hp.data() + l * npos * 2;
          acc_t* yc = plane.data() + l * HW;
          dtcwt::synthesis(
              H, W, inv, s, [&](int64_t r, acc_t* row) { std::copy(lc + r * W, lc + (r + 1) * W, row); },
              [&](int o, int64_t i, acc_t* row) {
                const acc_t* src = hc + (o * h + i) * w * 2;
                std::copy(src, src + 2 * w, row);
              },
              [&](int64_t r, const acc_t* row) { std::copy(row, row + W, yc + r * W); });
        }
        for (int64_t r = 0; r < H; ++r)
          for (int64_t j = 0; j < W; ++j) {
            scalar_t* d = dst + (r * W + j) * C + c0;
            for (int64_t l = 0; l < g; ++l) d[l] = static_cast<scalar_t>(plane[l * HW + r * W + j]);
          }
      }
    }
  });
  return out;
}

}  // namespace

void check_svt_arguments(const at::Tensor& x, const at::Tensor& weight_ll, const at::Tensor& weight_1,
                         const at::Tensor& bias_1, const at::Tensor& weight_2, const at::Tensor& bias_2) {
  check_dtype_in(x, "x", kFloatTypes);
  check_device_type(x, "x", c10::DeviceType::CPU);
  TORCH_CHECK_VALUE(x.dim() == 4, "x: expected 4 dimensions [B, H, W, C], got shape ", x.sizes());
  const int64_t H = x.size(1), W = x.size(2), C = x.size(3);
  TORCH_CHECK_VALUE(H > 0 && W > 0 && H % 2 == 0 && W % 2 == 0,
                    "x: expected even, non-zero H and W (weight_ll is sized for the even grid), got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(weight_1.dim() == 4, "weight_1: expected 4 dimensions [2, nb, bs, bs], got shape ",
                    weight_1.sizes());
  const int64_t nb = weight_1.size(1), bs = weight_1.size(2);
  TORCH_CHECK_VALUE(nb * bs == C && nb > 0, "weight_1: expected nb * bs = C = ", C, ", got shape ",
                    weight_1.sizes());
  check_param(weight_ll, "weight_ll", x, {C, H, W}, "[C, H, W]");
  check_param(weight_1, "weight_1", x, {2, nb, bs, bs}, "[2, nb, bs, bs]");
  check_param(bias_1, "bias_1", x, {2, nb, bs}, "[2, nb, bs]");
  check_param(weight_2, "weight_2", x, {2, nb, bs, bs}, "[2, nb, bs, bs]");
  check_param(bias_2, "bias_2", x, {2, nb, bs}, "[2, nb, bs]");
}

at::Tensor svt_spectral_mix(const at::Tensor& x, const at::Tensor& weight_ll, const at::Tensor& weight_1,
                            const at::Tensor& bias_1, const at::Tensor& weight_2, const at::Tensor& bias_2) {
  check_svt_arguments(x, weight_ll, weight_1, bias_1, weight_2, bias_2);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "svt_spectral_mix", [&] {
    return svt_impl<scalar_t>(x, weight_ll, weight_1, bias_1, weight_2, bias_2);
  });
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "svt_spectral_mix", vitk::Backend::kCpu, &vitk::cpu::svt_spectral_mix);
}
