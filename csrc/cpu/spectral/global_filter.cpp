// CPU kernels of global_filter (GFNet's GlobalFilter) and its backward.
//
// y = irfft2(rfft2(x) * w) with norm="ortho", on channels-last x [B, H, W, C]. ViT grids (7, 14, 28,
// 56) are small and not powers of two, so each transform is a DFT of small dense factors (a dense
// DFT for a prime side, two passes of N1- and N2-point DFTs for N = N1 N2, see FactoredDft): a real
// DFT along W to the K = W/2 + 1 non-negative frequencies, a complex DFT along H, the product with the
// filter, and the two inverses. Every pass sums "twiddle * input row" over the C channels of a token
// (along W) or the K x C values of a spectrum row (along H), which are contiguous: they are the SIMD
// dimension, taken 32 lanes at a time with the sums in registers, and one image's spectra (H x K x C
// complex values) stay in cache between the stages. fp32 accumulation for fp32 / fp16 / bf16.
//
// The operator is linear in x with a real impulse response whose spectrum is w made Hermitian by
// the inverse real transform, so its adjoint is the same operator with conj(w): grad_x is this
// forward with the imaginary part of w negated. grad_w[u, k] = m_k * conj-free products of the two
// spectra, rfft2(grad_y) and rfft2(x), summed over the batch, where m_k = 2 for the columns the
// real inverse counts twice (all but k = 0 and, W even, k = W/2).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <vector>

#include "vitk/checks.h"
#include "vitk/registration.h"
#include "vitk/spectral.h"

namespace vitk {
namespace cpu {
namespace {

constexpr std::initializer_list<at::ScalarType> kFloatTypes = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};

// The orthonormal complex DFT of length N over rows of M contiguous lanes, O[o] = N^(-1/2) sum_n
// exp(sign 2 pi i o n / N) I[n], in two passes of small dense DFTs (Cooley-Tukey, decimation in time,
// N = N1 N2 with N1 the largest factor <= sqrt(N)):
//   T[o1][n2] = sum_{n1} exp(sign 2 pi i n1 o1 / N1) I[N2 n1 + n2]
//   O[o1 + N1 o2] = N^(-1/2) sum_{n2} exp(sign 2 pi i n2 (o1 + N1 o2) / N) T[o1][n2]
// which is N (N1 + N2) complex multiply-adds per lane instead of N^2: 56 = 7 x 8 does 3.7x fewer,
// 28 = 4 x 7 2.5x, 14 = 2 x 7 1.6x; a prime N (7) is the dense DFT. Only the inputs n < n_in are
// read (the rest are zero) and the outputs o < n_out formed; a real input passes Ii = null, and
// Oi = null asks for the real part of the output alone.
template <typename acc_t>
struct FactoredDft {
  int64_t N, N1 = 1, N2;
  std::vector<acc_t> c, s;  // cos and sin of 2 pi j / N
  explicit FactoredDft(int64_t n) : N(n), N2(n) {
    for (int64_t f = 2; f * f <= n; ++f)
      if (n % f == 0) N1 = f;
    N2 = n / N1;
    c.resize(static_cast<size_t>(n));
    s.resize(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) {
      const double a = 2.0 * M_PI * static_cast<double>(j) / static_cast<double>(n);
      c[j] = static_cast<acc_t>(std::cos(a));
      s[j] = static_cast<acc_t>(std::sin(a));
    }
  }

  // Lanes per chunk: two 64-byte vectors. The passes run chunk by chunk, so a chunk's N1 x N2
  // intermediate stays in L1 and every output lane is summed in registers and stored once.
  static constexpr int64_t kChunk = 128 / static_cast<int64_t>(sizeof(acc_t));

  void run(const acc_t* Ir, const acc_t* Ii, int64_t M, acc_t sign, int64_t n_in, int64_t n_out, acc_t* Or,
           acc_t* Oi) const {
    static thread_local std::vector<acc_t> scratch;
    scratch.resize(static_cast<size_t>(2 * N * kChunk));
    for (int64_t m0 = 0; m0 < M; m0 += kChunk) {
      if (M - m0 >= kChunk)
        chunk<kChunk>(Ir, Ii, M, m0, kChunk, sign, n_in, n_out, Or, Oi, scratch.data());
      else
        chunk<0>(Ir, Ii, M, m0, M - m0, sign, n_in, n_out, Or, Oi, scratch.data());
    }
  }

 private:
  // (ar, ai)[0:L) += (cc + i ss)(r + i im)[0:L) (im null: a real input); ai is skipped when null.
  template <int64_t FIXED>
  static void term(acc_t cc, acc_t ss, const acc_t* __restrict r, const acc_t* __restrict im, int64_t width,
                   acc_t* __restrict ar, acc_t* __restrict ai) {
    const int64_t L = FIXED ? FIXED : width;
    if (im == nullptr) {
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        ar[l] += cc * r[l];
        ai[l] += ss * r[l];
      }
    } else if (ai == nullptr) {
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) ar[l] += cc * r[l] - ss * im[l];
    } else {
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        ar[l] += cc * r[l] - ss * im[l];
        ai[l] += cc * im[l] + ss * r[l];
      }
    }
  }

  template <int64_t FIXED>
  void chunk(const acc_t* Ir, const acc_t* Ii, int64_t M, int64_t m0, int64_t width, acc_t sign, int64_t n_in,
             int64_t n_out, acc_t* Or, acc_t* Oi, acc_t* T) const {
    const int64_t L = FIXED ? FIXED : width;
    acc_t ar[kChunk], ai[kChunk];
    if (N1 > 1) {  // T[o1 N2 + n2] = (re [kChunk], im [kChunk]) of pass 1
      for (int64_t o1 = 0; o1 < N1; ++o1)
        for (int64_t n2 = 0; n2 < N2; ++n2) {
          std::fill(ar, ar + kChunk, acc_t(0));
          std::fill(ai, ai + kChunk, acc_t(0));
          for (int64_t n1 = 0; n1 < N1 && N2 * n1 + n2 < n_in; ++n1) {
            const int64_t j = (n1 * o1 % N1) * N2, n = N2 * n1 + n2;
            term<FIXED>(c[j], sign * s[j], Ir + n * M + m0, Ii ? Ii + n * M + m0 : nullptr, width, ar, ai);
          }
          acc_t* t = T + (o1 * N2 + n2) * 2 * kChunk;
          std::copy(ar, ar + L, t);
          std::copy(ai, ai + L, t + kChunk);
        }
    }
    const acc_t scale = acc_t(1) / std::sqrt(static_cast<acc_t>(N));
    const int64_t t_rows = N1 > 1 ? N2 : std::min(N2, n_in);  // a dense DFT reads only the inputs
    for (int64_t o = 0; o < n_out; ++o) {
      std::fill(ar, ar + kChunk, acc_t(0));
      std::fill(ai, ai + kChunk, acc_t(0));
      const int64_t o1 = o % N1;
      for (int64_t n2 = 0; n2 < t_rows; ++n2) {
        const int64_t j = n2 * o % N, t = o1 * N2 + n2;
        const acc_t* r = N1 > 1 ? T + t * 2 * kChunk : Ir + t * M + m0;
        const acc_t* im = N1 > 1 ? r + kChunk : (Ii ? Ii + t * M + m0 : nullptr);
        term<FIXED>(scale * c[j], scale * sign * s[j], r, im, width, ar, Oi ? ai : nullptr);
      }
      std::copy(ar, ar + L, Or + o * M + m0);
      if (Oi != nullptr) std::copy(ai, ai + L, Oi + o * M + m0);
    }
  }
};

template <typename acc_t>
struct Plan {
  int64_t H, W, K, C;
  FactoredDft<acc_t> dft_w, dft_h;
  Plan(int64_t H_, int64_t W_, int64_t C_) : H(H_), W(W_), K(W_ / 2 + 1), C(C_), dft_w(W_), dft_h(H_) {}
  size_t spectrum() const { return static_cast<size_t>(H * K * C); }

  // (Yr, Yi) [H(u)][K][C] = rfft2 of one image x [H][W][C] (acc_t, contiguous), via scratch (Xr, Xi):
  // the real DFT along W (the first K outputs of a complex DFT of a real input), then along H.
  void forward(const acc_t* x, acc_t* Xr, acc_t* Xi, acc_t* Yr, acc_t* Yi) const {
    for (int64_t h = 0; h < H; ++h)
      dft_w.run(x + h * W * C, nullptr, C, acc_t(-1), W, K, Xr + h * K * C, Xi + h * K * C);
    dft_h.run(Xr, Xi, K * C, acc_t(-1), H, H, Yr, Yi);
  }

  // One image y [H][W][C] = irfft2 of (Zr, Zi) [H(u)][K][C], via scratch (Vr, Vi): the inverse along
  // H, then the real inverse along W, the real part of a complex inverse DFT of the K columns, each but
  // k = 0 and the Nyquist column counted twice (they stand for their conjugates).
  void inverse(const acc_t* Zr, const acc_t* Zi, acc_t* Vr, acc_t* Vi, acc_t* y) const {
    dft_h.run(Zr, Zi, K * C, acc_t(1), H, H, Vr, Vi);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t k = 0; k < K; ++k) {
        const acc_t m = (k == 0 || 2 * k == W) ? acc_t(1) : acc_t(2);
        acc_t* vr = Vr + (h * K + k) * C;
        acc_t* vi = Vi + (h * K + k) * C;
        for (int64_t c = 0; c < C; ++c) {
          vr[c] *= m;
          vi[c] *= m;
        }
      }
    for (int64_t h = 0; h < H; ++h)
      dft_w.run(Vr + h * K * C, Vi + h * K * C, C, acc_t(1), K, W, y + h * W * C, nullptr);
  }
};

template <typename scalar_t, typename acc_t>
void load_image(const scalar_t* x, const int64_t* st, int64_t H, int64_t W, int64_t C, acc_t* dst) {
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w) {
      const scalar_t* p = x + h * st[1] + w * st[2];
      acc_t* d = dst + (h * W + w) * C;
      for (int64_t c = 0; c < C; ++c) d[c] = static_cast<acc_t>(p[c * st[3]]);
    }
}

// The filter as (wr, wi) [H][K][C] in acc_t; conj negates wi (the adjoint's filter).
template <typename acc_t>
void load_filter(const at::Tensor& weight, bool conj, std::vector<acc_t>& wr, std::vector<acc_t>& wi) {
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.numel() / 2;
  wr.resize(static_cast<size_t>(n));
  wi.resize(static_cast<size_t>(n));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "global_filter_weight", [&] {
    const scalar_t* p = w.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      wr[i] = static_cast<acc_t>(p[2 * i]);
      wi[i] = static_cast<acc_t>(p[2 * i + 1]) * (conj ? acc_t(-1) : acc_t(1));
    }
  });
}

template <typename scalar_t>
at::Tensor apply_filter(const at::Tensor& x, const at::Tensor& weight, bool conj) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  at::Tensor out = at::empty({B, H, W, C}, x.options());
  if (out.numel() == 0) return out;
  const Plan<acc_t> plan(H, W, C);
  std::vector<acc_t> wr, wi;
  load_filter(weight, conj, wr, wi);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t* st = x.strides().data();
  const size_t n = plan.spectrum();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> img(static_cast<size_t>(H * W * C)), s(4 * n);
    acc_t *Ar = s.data(), *Ai = Ar + n, *Yr = Ai + n, *Yi = Yr + n;
    for (int64_t b = b0; b < b1; ++b) {
      load_image(xp + b * st[0], st, H, W, C, img.data());
      plan.forward(img.data(), Ar, Ai, Yr, Yi);
      for (size_t i = 0; i < n; ++i) {
        const acc_t r = Yr[i], im = Yi[i];
        Yr[i] = r * wr[i] - im * wi[i];
        Yi[i] = r * wi[i] + im * wr[i];
      }
      plan.inverse(Yr, Yi, Ar, Ai, img.data());
      scalar_t* dst = op + b * H * W * C;
      for (int64_t i = 0; i < H * W * C; ++i) dst[i] = static_cast<scalar_t>(img[i]);
    }
  });
  return out;
}

// grad_w [H, K, C, 2] = sum over images of m_k * (conj-free products of the spectra of g and x).
template <typename scalar_t>
at::Tensor filter_grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const Plan<acc_t> plan(H, W, C);
  const size_t n = plan.spectrum();
  const int64_t K = plan.K;
  const int threads = at::get_num_threads();
  std::vector<acc_t> partial(static_cast<size_t>(threads) * 2 * n, acc_t(0));
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const int64_t* xs = x.strides().data();
  const int64_t* gs = g.strides().data();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    acc_t* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * 2 * n;
    std::vector<acc_t> img(static_cast<size_t>(H * W * C)), s(6 * n);
    acc_t *Tr = s.data(), *Ti = Tr + n, *Xr = Ti + n, *Xi = Xr + n, *Gr = Xi + n, *Gi = Gr + n;
    for (int64_t b = b0; b < b1; ++b) {
      load_image(xp + b * xs[0], xs, H, W, C, img.data());
      plan.forward(img.data(), Tr, Ti, Xr, Xi);
      load_image(gp + b * gs[0], gs, H, W, C, img.data());
      plan.forward(img.data(), Tr, Ti, Gr, Gi);
      for (int64_t u = 0; u < H; ++u)
        for (int64_t k = 0; k < K; ++k) {
          const acc_t m = (k == 0 || 2 * k == W) ? acc_t(1) : acc_t(2);
          const int64_t o = (u * K + k) * C;
          for (int64_t c = 0; c < C; ++c) {
            // dL/dZ = m * rfft2(g); Z = X w, so dL/dwr = Re(dZ) Xr + Im(dZ) Xi, dL/dwi = Im(dZ) Xr - Re(dZ) Xi.
            const acc_t gr = m * Gr[o + c], gi = m * Gi[o + c], xr = Xr[o + c], xi = Xi[o + c];
            acc[o + c] += gr * xr + gi * xi;
            acc[n + o + c] += gi * xr - gr * xi;
          }
        }
    }
  });
  at::Tensor out = at::empty({H, K, C, 2}, weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* p = out.mutable_data_ptr<acc_t>();
  for (size_t i = 0; i < n; ++i) {
    acc_t r = 0, im = 0;
    for (int t = 0; t < threads; ++t) {
      r += partial[static_cast<size_t>(t) * 2 * n + i];
      im += partial[static_cast<size_t>(t) * 2 * n + n + i];
    }
    p[2 * i] = r;
    p[2 * i + 1] = im;
  }
  out = out.to(weight.scalar_type());
  return out;
}

void check_global_filter(const at::Tensor& x, const at::Tensor& weight, const char* x_name) {
  check_dtype_in(x, x_name, kFloatTypes);
  check_device_type(x, x_name, c10::DeviceType::CPU);
  TORCH_CHECK_VALUE(x.dim() == 4, x_name, ": expected 4 dimensions [B, H, W, C], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) > 0 && x.size(2) > 0, x_name, ": expected non-empty H and W, got shape ", x.sizes());
  check_dtype_in(weight, "weight", kFloatTypes);
  check_same_device(x, x_name, weight, "weight");
  const int64_t H = x.size(1), W = x.size(2), C = x.size(3);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == H && weight.size(1) == W / 2 + 1 && weight.size(2) == C &&
                        weight.size(3) == 2,
                    "weight: expected shape [H, W // 2 + 1, C, 2] = [", H, ", ", W / 2 + 1, ", ", C, ", 2], got ",
                    weight.sizes());
}

}  // namespace

at::Tensor global_filter(const at::Tensor& x, const at::Tensor& weight) {
  check_global_filter(x, weight, "x");
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "global_filter",
                                         [&] { return apply_filter<scalar_t>(x, weight, false); });
}

std::tuple<at::Tensor, at::Tensor> global_filter_backward(const at::Tensor& grad_output, const at::Tensor& x,
                                                          const at::Tensor& weight, bool x_grad, bool weight_grad) {
  check_global_filter(x, weight, "x");
  check_dtype_in(grad_output, "grad_output", kFloatTypes);
  check_same_dtype(x, "x", grad_output, "grad_output");
  TORCH_CHECK_VALUE(grad_output.sizes() == x.sizes(), "grad_output: expected shape ", x.sizes(), ", got ",
                    grad_output.sizes());
  at::Tensor gx, gw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "global_filter_backward", [&] {
    gx = x_grad ? apply_filter<scalar_t>(grad_output, weight, true) : at::empty({0}, x.options());
    gw = weight_grad ? filter_grad<scalar_t>(grad_output, x, weight) : at::empty({0}, weight.options());
  });
  return {gx, gw};
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "global_filter", vitk::Backend::kCpu, &vitk::cpu::global_filter);
  VITK_IMPL(m, "global_filter_backward", vitk::Backend::kCpu, &vitk::cpu::global_filter_backward);
}
