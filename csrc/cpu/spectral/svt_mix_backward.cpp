// CPU kernel of svt_spectral_mix_backward: the gradients of SVT's spectral layer in three passes.
//
// 1. Parallel over (image, group of 16 fp32 channels) tasks, plane by plane: the forward analysis
//    of x is recomputed (its lowpass and highpass), and grad_output goes through the adjoint of the
//    inverse transform (the analysis bank run with the synthesis filters). The lowpass becomes its
//    product with its gradient (summed over images into grad_weight_ll at the end), and the gradient
//    weighted by weight_ll is kept for the synthesis. Both highpasses are staged planar per group,
//    then stored position-major as [B 6 h w][nb][re | im][bs] a position at a time, so that for
//    block n the 2 bs real numbers of every position form a strided [B 6 h w, 2 bs] matrix.
// 2. The complex block layer z (Wr + i Wi) + b is that matrix times the real [2 bs, 2 bs] form
//    [[Wr, Wi], [-Wi, Wr]], so each block's MLP backward (layer 1 recomputed, ReLU mask, both weight
//    gradients, the input gradient) is five matrix products over all positions at once, by at::mm.
//    Batching all images keeps these few and large: done per image, the backward took 3.1 s instead
//    of about 0.13 s at SVT-S stage 1 on two cores that other jobs shared, most of it in the small
//    products and the hand-offs between the OpenMP regions and the BLAS threads. The
//    highpass gradient replaces the recomputed highpass in place.
// 3. Parallel over the same tasks again: the adjoint of the forward analysis (the synthesis bank
//    with the analysis filters) gives grad_x, planar, copied once into channels-last [B, H, W, C]
//    (as x and grad_output are copied to planar before pass 1).
// Memory, beyond the outputs: planar copies of x and grad_output (and grad_x before its final copy),
// the lowpass and its weighted gradient (x's size each), and the two highpasses (3 x x's size each),
// in the accumulation type, and per thread one channel group's two staged highpasses; the
// [B, C, 6, h, w, 2] layout and its permuted copies never exist.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/permute.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "vitk/checks.h"
#include "vitk/dtcwt_plane.h"
#include "vitk/registration.h"
#include "vitk/spectral.h"
#include "vitk/tiling.h"

namespace vitk {
namespace cpu {
namespace {

// [2, nb, bs, bs] (real, imaginary) -> the real forms [nb, 2 bs, 2 bs] = [[Wr, Wi], [-Wi, Wr]].
at::Tensor real_form(const at::Tensor& w) {
  const at::Tensor re = w.select(0, 0), im = w.select(0, 1);
  return at::cat({at::cat({re, im}, 2), at::cat({-im, re}, 2)}, 1);
}

// The gradient of a real form back to [2, nb, bs, bs]: Wr appears twice, Wi once with each sign.
at::Tensor fold_real_form(const at::Tensor& g, int64_t bs) {
  const at::Tensor top = g.slice(1, 0, bs), bottom = g.slice(1, bs, 2 * bs);
  return at::stack({top.slice(2, 0, bs) + bottom.slice(2, bs, 2 * bs), top.slice(2, bs, 2 * bs) - bottom.slice(2, 0, bs)});
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> svt_backward_impl(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight_ll, const at::Tensor& weight_1,
    const at::Tensor& bias_1, const at::Tensor& weight_2, const at::Tensor& bias_2) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t nb = weight_1.size(1), bs = weight_1.size(2), h = H / 2, w = W / 2, npos = 6 * h * w;
  const at::Tensor w1 = real_form(weight_1.to(acc)), w2 = real_form(weight_2.to(acc));
  const at::Tensor b1 = bias_1.to(acc).permute({1, 0, 2}).reshape({nb, 2 * bs});
  const at::Tensor b2 = bias_2.to(acc).permute({1, 0, 2}).reshape({nb, 2 * bs});
  const at::Tensor wll = weight_ll.to(acc).contiguous();
  at::Tensor g_w1 = at::zeros({nb, 2 * bs, 2 * bs}, acc), g_w2 = at::zeros({nb, 2 * bs, 2 * bs}, acc);
  at::Tensor g_b1 = at::zeros({nb, 2 * bs}, acc), g_b2 = at::zeros({nb, 2 * bs}, acc);
  // Planes are read and written as contiguous rows: one transposing copy each way costs less than
  // reading every channel's rows at a stride of C (one cache line per value).
  const at::Tensor xt = x.permute({0, 3, 1, 2}).contiguous(), gt = grad.permute({0, 3, 1, 2}).contiguous();
  at::Tensor g_xt = at::empty({B, C, H, W}, x.options());
  // The lowpass (then its weighted gradient), the highpass z, the highpass gradient gy, all images.
  at::Tensor low = at::empty({B, C, H, W}, acc), z = at::empty({B * npos, nb, 2 * bs}, acc);
  at::Tensor gy = at::empty_like(z), glw = at::empty_like(low);
  const auto fwd = dtcwt::analysis_bank<acc_t>();
  const auto inv = dtcwt::synthesis_bank<acc_t>();
  const scalar_t* xp = xt.const_data_ptr<scalar_t>();
  const scalar_t* gp = gt.const_data_ptr<scalar_t>();
  scalar_t* gxp = g_xt.mutable_data_ptr<scalar_t>();
  acc_t* lowp = low.mutable_data_ptr<acc_t>();
  acc_t* zp = z.mutable_data_ptr<acc_t>();
  acc_t* gyp = gy.mutable_data_ptr<acc_t>();
  acc_t* glwp = glw.mutable_data_ptr<acc_t>();
  const acc_t* wllp = wll.const_data_ptr<acc_t>();
  // Position p of image b, channel c of a highpass buffer: block c / bs, real part, then bs further
  // the imaginary part.
  const auto slot = [&](int64_t b, int64_t p, int64_t c) { return ((b * npos + p) * nb + c / bs) * 2 * bs + c % bs; };
  // Tasks are (image, group of G channels): a group's highpass rows are staged planar and moved to
  // and from the position-major buffers a position at a time, G adjacent channels per move, so those
  // buffers are touched a line at a time rather than one value per channel.
  constexpr int64_t G = 64 / static_cast<int64_t>(sizeof(acc_t));
  const int64_t groups = ceil_div(C, G), band = npos * 2;
  const auto to_slots = [&](const acc_t* planar, int64_t b, int64_t c0, int64_t g, acc_t* buf) {
    for (int64_t p = 0; p < npos; ++p)
      for (int64_t l = 0; l < g; ++l) {
        acc_t* at_ = buf + slot(b, p, c0 + l);
        at_[0] = planar[l * band + 2 * p];
        at_[bs] = planar[l * band + 2 * p + 1];
      }
  };
  at::parallel_for(0, B * groups, 1, [&](int64_t t0, int64_t t1) {
    dtcwt::Scratch<acc_t> s;
    std::vector<acc_t> hz(static_cast<size_t>(G * band)), hg(static_cast<size_t>(G * band));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / groups, c0 = (t % groups) * G, g = std::min(G, C - c0);
      for (int64_t l = 0; l < g; ++l) {
        const int64_t c = c0 + l, q = b * C + c;
        acc_t* lc = lowp + q * H * W;
        const auto store_band = [&](acc_t* planar) {
          return [&, planar](int o, int64_t i, const acc_t* row) {
            std::copy(row, row + 2 * w, planar + l * band + (o * h + i) * w * 2);
          };
        };
        const auto load_from = [&](const scalar_t* plane) {
          return [&, plane](int64_t r, acc_t* row) {
            const scalar_t* src = plane + r * W;
            for (int64_t j = 0; j < W; ++j) row[j] = static_cast<acc_t>(src[j]);
          };
        };
        dtcwt::analysis(
            H, W, fwd, s, load_from(xp + q * H * W),
            [&](int64_t r, const acc_t* row) { std::copy(row, row + W, lc + r * W); }, store_band(hz.data()));
        const acc_t* wc = wllp + c * H * W;
        dtcwt::analysis(
            H, W, inv, s, load_from(gp + q * H * W),
            [&](int64_t r, const acc_t* row) {
              // The lowpass becomes its product with its gradient (summed over images into
              // grad_weight_ll below); the weighted gradient is what the synthesis reads.
              acc_t* lo = lc + r * W;
              acc_t* gl = glwp + q * H * W + r * W;
              for (int64_t j = 0; j < W; ++j) {
                gl[j] = row[j] * wc[r * W + j];
                lo[j] *= row[j];
              }
            },
            store_band(hg.data()));
      }
      to_slots(hz.data(), b, c0, g, zp);
      to_slots(hg.data(), b, c0, g, gyp);
    }
  });
  for (int64_t n = 0; n < nb; ++n) {
    at::Tensor zn = z.select(1, n), gyn = gy.select(1, n);
    const at::Tensor pre = at::addmm(b1[n], zn, w1[n]);
    g_w2[n].addmm_(at::relu(pre).t(), gyn);
    g_b2[n] += gyn.sum(0);
    // The ReLU's gradient as a product with its 0/1 mask, so a NaN gradient stays NaN where it is cut.
    const at::Tensor g_pre = at::mm(gyn, w2[n].t()).mul_(pre.gt(0));
    g_w1[n].addmm_(zn.t(), g_pre);
    g_b1[n] += g_pre.sum(0);
    zn.copy_(at::mm(g_pre, w1[n].t()));
  }
  at::parallel_for(0, B * groups, 1, [&](int64_t t0, int64_t t1) {
    dtcwt::Scratch<acc_t> s;
    std::vector<acc_t> hz(static_cast<size_t>(G * band));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / groups, c0 = (t % groups) * G, g = std::min(G, C - c0);
      for (int64_t p = 0; p < npos; ++p)
        for (int64_t l = 0; l < g; ++l) {
          const acc_t* at_ = zp + slot(b, p, c0 + l);
          hz[l * band + 2 * p] = at_[0];
          hz[l * band + 2 * p + 1] = at_[bs];
        }
      for (int64_t l = 0; l < g; ++l) {
        const int64_t q = b * C + c0 + l;
        const acc_t* gl = glwp + q * H * W;
        const acc_t* hc = hz.data() + l * band;
        scalar_t* dst = gxp + q * H * W;
        dtcwt::synthesis(
            H, W, fwd, s, [&](int64_t r, acc_t* row) { std::copy(gl + r * W, gl + (r + 1) * W, row); },
            [&](int o, int64_t i, acc_t* row) {
              const acc_t* src = hc + (o * h + i) * w * 2;
              std::copy(src, src + 2 * w, row);
            },
            [&](int64_t r, const acc_t* row) {
              scalar_t* d = dst + r * W;
              for (int64_t j = 0; j < W; ++j) d[j] = static_cast<scalar_t>(row[j]);
            });
      }
    }
  });
  const at::Tensor g_wll = low.sum(0);
  const auto bias_grad = [&](const at::Tensor& g, const at::Tensor& like) {
    return g.view({nb, 2, bs}).permute({1, 0, 2}).to(like.scalar_type()).contiguous();
  };
  return {g_xt.permute({0, 2, 3, 1}).contiguous(),
          g_wll.to(weight_ll.scalar_type()),
          fold_real_form(g_w1, bs).to(weight_1.scalar_type()),
          bias_grad(g_b1, bias_1),
          fold_real_form(g_w2, bs).to(weight_2.scalar_type()),
          bias_grad(g_b2, bias_2)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> svt_spectral_mix_backward(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& weight_ll, const at::Tensor& weight_1,
    const at::Tensor& bias_1, const at::Tensor& weight_2, const at::Tensor& bias_2) {
  check_svt_arguments(x, weight_ll, weight_1, bias_1, weight_2, bias_2);
  check_same_device(x, "x", grad_output, "grad_output");
  check_same_dtype(x, "x", grad_output, "grad_output");
  TORCH_CHECK_VALUE(grad_output.sizes() == x.sizes(), "grad_output: expected x's shape ", x.sizes(), ", got ",
                    grad_output.sizes());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "svt_spectral_mix_backward", [&] {
    return svt_backward_impl<scalar_t>(grad_output, x, weight_ll, weight_1, bias_1, weight_2, bias_2);
  });
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "svt_spectral_mix_backward", vitk::Backend::kCpu, &vitk::cpu::svt_spectral_mix_backward);
}
