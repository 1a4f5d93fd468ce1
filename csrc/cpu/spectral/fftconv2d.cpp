// CPU kernels of fftconv2d (Multi-Dimensional Hyena's 2-D long convolution) and its backward.
//
// y[b, c, i, j] = sum_{a <= i, q <= j} k[c, a, q] u[b, c, i - a, j - q] + D[c] u[b, c, i, j]: the linear
// (zero-padded) convolution anchored at the top-left corner that Hyena computes with a 2H x 2W FFT.
// On ViT grids (14 x 14, 28 x 28) the direct sum is cheaper than any transform: it costs
// (H(H+1)/2)(W(W+1)/2) multiply-adds per plane (11 k at 14 x 14, 165 k at 28 x 28) against about
// 55 k and 430 k for the real DFTs of a 2H - 1 x 2W - 1 zero-padded grid done as dense products, and
// it is exact (no transform round-off) and keeps a NaN where it belongs (in the outputs below and to
// the right of it, where the FFT spreads it over the plane). Measured, see bench/spectral.py.
//
// The kernel works on a block of L channels at a time, channels innermost (one 64-byte vector), so
// every multiply-add is a vector FMA with the filter tap shared by T adjacent outputs of a row held
// in registers. The backward is the same kernel twice over:
//   grad_u = flip(conv(flip(g), k)) + D g           (the correlation with k, run on flipped planes)
//   grad_k = sum_b flip(conv(u_b, flip(g_b)))        (the correlation of g with u; the "filter" is g)
//   grad_D = sum_{b, i, j} g u                       (grad_k's lag (0, 0))
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "vitk/checks.h"
#include "vitk/registration.h"
#include "vitk/spectral.h"

namespace vitk {
namespace cpu {
namespace {

constexpr std::initializer_list<at::ScalarType> kFloatTypes = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};

// Channels per block: one 64-byte vector of the accumulation type.
template <typename acc_t>
constexpr int64_t lanes() {
  return 64 / static_cast<int64_t>(sizeof(acc_t));
}

// The block geometry of one H x W plane: outputs are computed T columns at a time, so rows are
// stored Wr = W rounded up to T wide (the extra columns are zero in the inputs, ignored in the output).
struct Geometry {
  int64_t H, W, T, Wr;
  Geometry(int64_t H_, int64_t W_) : H(H_), W(W_), T(W_ % 7 == 0 ? 7 : 8), Wr((W_ + T - 1) / T * T) {}
  int64_t plane(int64_t L) const { return H * Wr * L; }
};

// Y[i][j][0:L) = sum_{a <= i, q <= j} K[a][q][:] * X[i - a][j - q][:], on [H][Wr][L] buffers.
template <typename acc_t, int T>
void conv_block(const Geometry& g, const acc_t* __restrict X, const acc_t* __restrict K, acc_t* __restrict Y) {
  constexpr int64_t L = lanes<acc_t>();
  const int64_t H = g.H, Wr = g.Wr;
  for (int64_t i = 0; i < H; ++i)
    for (int64_t j0 = 0; j0 < Wr; j0 += T) {
      acc_t acc[T][L];
      for (int t = 0; t < T; ++t)
        for (int64_t l = 0; l < L; ++l) acc[t][l] = acc_t(0);
      for (int64_t a = 0; a <= i; ++a) {
        const acc_t* xr = X + ((i - a) * Wr + j0) * L;  // column j0 + t - q is xr[(t - q) * L]
        const acc_t* kr = K + a * Wr * L;
        // Taps every output of the block sees (q <= j0)...
        for (int64_t q = 0; q <= j0; ++q) {
          const acc_t* kq = kr + q * L;
          const acc_t* xq = xr - q * L;
#pragma GCC unroll 8
          for (int t = 0; t < T; ++t)
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) acc[t][l] += kq[l] * xq[t * L + l];
        }
        // ...and the last T - 1, which only the block's later outputs reach (q = j0 + d <= j0 + t).
#pragma GCC unroll 8
        for (int d = 1; d < T; ++d) {
          const acc_t* kq = kr + (j0 + d) * L;
          const acc_t* xq = xr - (j0 + d) * L;
#pragma GCC unroll 8
          for (int t = d; t < T; ++t)
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) acc[t][l] += kq[l] * xq[t * L + l];
        }
      }
      acc_t* yr = Y + (i * Wr + j0) * L;
      for (int t = 0; t < T; ++t)
        for (int64_t l = 0; l < L; ++l) yr[t * L + l] = acc[t][l];
    }
}

template <typename acc_t>
void conv(const Geometry& g, const acc_t* X, const acc_t* K, acc_t* Y) {
  if (g.T == 7)
    conv_block<acc_t, 7>(g, X, K, Y);
  else
    conv_block<acc_t, 8>(g, X, K, Y);
}

// A strided [*, C, H, W] plane set (base at batch b) as channels c0 .. c0 + L of an [H][Wr][L] buffer,
// flipped in both spatial axes when flip; channels past C and columns past W are zero.
template <typename scalar_t, typename acc_t>
void gather(const scalar_t* base, const int64_t* st, int64_t C, int64_t c0, const Geometry& g, bool flip,
            acc_t* dst) {
  constexpr int64_t L = lanes<acc_t>();
  std::fill(dst, dst + g.plane(L), acc_t(0));
  const int64_t n = std::min(L, C - c0);
  for (int64_t l = 0; l < n; ++l) {
    const scalar_t* p = base + (c0 + l) * st[0];
    for (int64_t i = 0; i < g.H; ++i)
      for (int64_t j = 0; j < g.W; ++j) {
        const int64_t si = flip ? g.H - 1 - i : i, sj = flip ? g.W - 1 - j : j;
        dst[(i * g.Wr + j) * L + l] = static_cast<acc_t>(p[si * st[1] + sj * st[2]]);
      }
  }
}

template <typename acc_t>
std::vector<acc_t> load_vector(const at::Tensor& t, int64_t n) {
  std::vector<acc_t> v(static_cast<size_t>(n));
  const at::Tensor c = t.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "fftconv2d_vector", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = static_cast<acc_t>(p[i]);
  });
  return v;
}

// Every channel block of k [C, H, W] (any float dtype), flipped when flip: [nblocks][H][Wr][L].
template <typename acc_t>
std::vector<acc_t> filter_blocks(const at::Tensor& k, const Geometry& g, bool flip) {
  constexpr int64_t L = lanes<acc_t>();
  const int64_t C = k.size(0), nblk = (C + L - 1) / L;
  std::vector<acc_t> out(static_cast<size_t>(nblk * g.plane(L)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "fftconv2d_filter", [&] {
    const scalar_t* p = k.const_data_ptr<scalar_t>();
    const int64_t* st = k.strides().data();
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) gather(p, st, C, blk * L, g, flip, out.data() + blk * g.plane(L));
    });
  });
  return out;
}

// out[b, c] = (flipped when flip) conv(src[b, c] (flipped when flip), k) + D[c] src[b, c], in src's dtype.
template <typename scalar_t>
at::Tensor conv_planes(const at::Tensor& src, const at::Tensor& k, const std::optional<at::Tensor>& D, bool flip) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t L = lanes<acc_t>();
  const int64_t B = src.size(0), C = src.size(1), H = src.size(2), W = src.size(3);
  at::Tensor out = at::empty({B, C, H, W}, src.options());
  if (out.numel() == 0) return out;
  const Geometry g(H, W);
  const std::vector<acc_t> kb = filter_blocks<acc_t>(k, g, false);
  const std::vector<acc_t> d = D.has_value() ? load_vector<acc_t>(*D, C) : std::vector<acc_t>();
  const int64_t nblk = (C + L - 1) / L;
  const scalar_t* sp = src.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t* st = src.strides().data();
  at::parallel_for(0, B * nblk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> X(static_cast<size_t>(g.plane(L))), Y(X.size());
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / nblk, blk = task % nblk, c0 = blk * L, n = std::min(L, C - c0);
      gather(sp + b * st[0], st + 1, C, c0, g, flip, X.data());
      conv(g, X.data(), kb.data() + blk * g.plane(L), Y.data());
      for (int64_t l = 0; l < n; ++l) {
        const acc_t dl = d.empty() ? acc_t(0) : d[static_cast<size_t>(c0 + l)];
        scalar_t* o = op + ((b * C) + c0 + l) * H * W;
        for (int64_t i = 0; i < H; ++i)
          for (int64_t j = 0; j < W; ++j) {
            const int64_t s = (i * g.Wr + j) * L + l;
            acc_t v = Y[s];
            if (!d.empty()) v += dl * X[s];
            o[flip ? (H - 1 - i) * W + (W - 1 - j) : i * W + j] = static_cast<scalar_t>(v);
          }
      }
    }
  });
  return out;
}

// grad_k [C, H, W] = sum_b flip(conv(u_b, flip(g_b))), in the accumulation type.
template <typename scalar_t>
at::Tensor filter_grad(const at::Tensor& g, const at::Tensor& u, const at::Tensor& k) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t L = lanes<acc_t>();
  const int64_t B = u.size(0), C = u.size(1), H = u.size(2), W = u.size(3);
  const Geometry geo(H, W);
  const int64_t nblk = (C + L - 1) / L;
  at::Tensor out = at::zeros({C, H, W}, k.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* op = out.mutable_data_ptr<acc_t>();
  const scalar_t* up = u.const_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const int64_t* us = u.strides().data();
  const int64_t* gs = g.strides().data();
  at::parallel_for(0, nblk, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> X(static_cast<size_t>(geo.plane(L))), G(X.size()), Y(X.size()), S(X.size());
    for (int64_t blk = k0; blk < k1; ++blk) {
      const int64_t c0 = blk * L, n = std::min(L, C - c0);
      std::fill(S.begin(), S.end(), acc_t(0));
      for (int64_t b = 0; b < B; ++b) {
        gather(up + b * us[0], us + 1, C, c0, geo, false, X.data());
        gather(gp + b * gs[0], gs + 1, C, c0, geo, true, G.data());
        conv(geo, X.data(), G.data(), Y.data());
        for (size_t i = 0; i < S.size(); ++i) S[i] += Y[i];
      }
      for (int64_t l = 0; l < n; ++l)
        for (int64_t i = 0; i < H; ++i)
          for (int64_t j = 0; j < W; ++j)
            op[((c0 + l) * H + (H - 1 - i)) * W + (W - 1 - j)] = S[(i * geo.Wr + j) * L + l];
    }
  });
  return out;
}

void check_fftconv2d(const at::Tensor& u, const at::Tensor& k, const std::optional<at::Tensor>& D) {
  check_dtype_in(u, "u", kFloatTypes);
  check_device_type(u, "u", c10::DeviceType::CPU);
  TORCH_CHECK_VALUE(u.dim() == 4, "u: expected 4 dimensions [B, C, H, W], got shape ", u.sizes());
  TORCH_CHECK_VALUE(u.size(2) > 0 && u.size(3) > 0, "u: expected non-empty H and W, got shape ", u.sizes());
  check_dtype_in(k, "k", kFloatTypes);
  check_same_device(u, "u", k, "k");
  const int64_t C = u.size(1), H = u.size(2), W = u.size(3);
  TORCH_CHECK_VALUE(k.dim() == 3 && k.size(0) == C && k.size(1) == H && k.size(2) == W,
                    "k: expected shape [C, H, W] = [", C, ", ", H, ", ", W, "], got ", k.sizes());
  if (D.has_value()) {
    check_dtype_in(*D, "D", kFloatTypes);
    check_same_device(u, "u", *D, "D");
    TORCH_CHECK_VALUE(D->dim() == 1 && D->size(0) == C, "D: expected shape [C] = [", C, "], got ", D->sizes());
  }
}

}  // namespace

at::Tensor fftconv2d(const at::Tensor& u, const at::Tensor& k, const std::optional<at::Tensor>& D) {
  check_fftconv2d(u, k, D);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "fftconv2d",
                                         [&] { return conv_planes<scalar_t>(u, k, D, false); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fftconv2d_backward(const at::Tensor& grad_output, const at::Tensor& u,
                                                                  const at::Tensor& k,
                                                                  const std::optional<at::Tensor>& D, bool u_grad,
                                                                  bool k_grad, bool D_grad) {
  check_fftconv2d(u, k, D);
  check_dtype_in(grad_output, "grad_output", kFloatTypes);
  check_same_dtype(u, "u", grad_output, "grad_output");
  check_same_device(u, "u", grad_output, "grad_output");
  TORCH_CHECK_VALUE(grad_output.sizes() == u.sizes(), "grad_output: expected shape ", u.sizes(), ", got ",
                    grad_output.sizes());
  at::Tensor gu, gk, gd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "fftconv2d_backward", [&] {
    gu = u_grad ? conv_planes<scalar_t>(grad_output, k, D, true) : at::empty({0}, u.options());
    D_grad = D_grad && D.has_value();
    // grad_D = sum g u is the (0, 0) lag of the correlation that gives grad_k.
    const at::Tensor corr = (k_grad || D_grad) ? filter_grad<scalar_t>(grad_output, u, k) : at::Tensor();
    gk = k_grad ? corr.to(k.scalar_type()) : at::empty({0}, k.options());
    gd = D_grad ? corr.select(1, 0).select(1, 0).clone(at::MemoryFormat::Contiguous).to(D->scalar_type())
                : at::empty({0}, D.has_value() ? D->options() : k.options());
  });
  return {gu, gk, gd};
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "fftconv2d", vitk::Backend::kCpu, &vitk::cpu::fftconv2d);
  VITK_IMPL(m, "fftconv2d_backward", vitk::Backend::kCpu, &vitk::cpu::fftconv2d_backward);
}
