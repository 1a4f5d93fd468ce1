// CPU kernels of global_filter (GFNet's GlobalFilter) and its backward.
//
// y = irfft2(rfft2(x) * w) with norm="ortho", on channels-last x [B, H, W, C]. The channels of a token
// are contiguous, so they are the SIMD lanes: every transform is a mixed-radix FFT whose points are
// vectors of channels (spectral_fft.h), and nothing is transposed. Work is split into tasks of one
// image and a group of channel vectors, sized so that the group's spectrum stays in L2:
//   1. each row: the real FFT along W to the K = W/2 + 1 non-negative frequencies. For even W it is
//      a W/2-point complex FFT of (even samples) + i (odd samples), then split into the two halves'
//      spectra and recombined (the standard half-length real transform), so no lane pairs with
//      another channel and a NaN stays in its channel;
//   2. each spectrum column: the complex FFT along H, the product with the filter, the inverse FFT,
//      all on one column held in L1;
//   3. each row: the inverse real FFT along W (the imaginary parts of the k = 0 and Nyquist columns
//      dropped, as irfft does), written in the input's dtype.
// Transforms are unnormalized; the ortho scale 1 / (H W) is folded into the filter. fp32 for fp32,
// fp16 and bf16 inputs, fp64 for fp64.
//
// Measured against the previous kernel (two passes of small dense DFTs per transform, the dense-DFT
// plan), 1 thread, 2 images of 64 channels, fp32: 0.056 -> 0.043 ms at 4 x 4, 0.097 -> 0.072 at 7 x 7,
// 0.44 -> 0.097 at 14 x 14, 1.72 -> 0.47 at 28 x 28, 7.6 -> 2.3 at 56 x 56. The FFT wins on every grid,
// so there is no crossover and no dense path.
//
// A non-finite value makes its whole channel NaN: each task adds 0 * (every input of the channel)
// to every output of it, which the transforms would otherwise do only for most positions. That is
// what the reference (torch.fft) and the Triton kernel's dense DFTs give for a NaN, which they
// spread over the plane.
//
// The operator is linear in x with a real impulse response whose spectrum is w made Hermitian by
// the inverse real transform, so its adjoint is the same operator with conj(w): grad_x is this
// forward with the imaginary part of w negated. grad_w[u, k] = m_k * conj-free products of the two
// spectra, rfft2(grad_y) and rfft2(x), summed over the batch, where m_k = 2 for the columns the
// real inverse counts twice (all but k = 0 and, W even, k = W/2). The backward does both from one
// forward transform of grad_y per task.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vitk/checks.h"
#include "vitk/registration.h"
#include "vitk/spectral.h"
#include "vitk/spectral_fft.h"
#include "vitk/tiling.h"

namespace vitk {
namespace cpu {
namespace {

using spectral_fft::Cv;
using spectral_fft::LaneFft;
using spectral_fft::Lanes;
using spectral_fft::vec_t;

constexpr std::initializer_list<at::ScalarType> kFloatTypes = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};

// A task's spectra stay under this many bytes (L2 is 1 MiB per core on the machines we measure).
constexpr int64_t kSpectrumBudget = 384 << 10;

template <typename T>
struct Plan {
  static constexpr int64_t V = Lanes<T>::kWidth;
  int64_t B, H, W, K, C, nvec, G = 1, groups = 1;
  bool half;  // W even: the real FFT along W runs as a W/2-point complex one
  LaneFft<T> fft_w, fft_h;
  std::vector<T> tc, ts;  // cos and sin of 2 pi k / W for k <= W / 2: the half-length split's twiddles

  // spectra: how many [H][K][G] spectra a task holds at once.
  Plan(int64_t B_, int64_t H_, int64_t W_, int64_t C_, int64_t spectra)
      : B(B_), H(H_), W(W_), K(W_ / 2 + 1), C(C_), nvec(ceil_div(C_, V)), half(W_ % 2 == 0),
        fft_w(W_ % 2 == 0 ? W_ / 2 : W_), fft_h(H_) {
    for (int64_t k = 0; k <= W / 2; ++k) {
      const double a = 2.0 * M_PI * static_cast<double>(k) / static_cast<double>(W);
      tc.push_back(static_cast<T>(std::cos(a)));
      ts.push_back(static_cast<T>(std::sin(a)));
    }
    if (nvec == 0) return;
    const int64_t per_vec = H * K * static_cast<int64_t>(sizeof(Cv<T>)) * spectra;
    const int64_t gmax = std::max<int64_t>(1, kSpectrumBudget / per_vec);
    groups = ceil_div(nvec, gmax);
    const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());  // enough tasks to balance
    if (B > 0 && B * groups < want) groups = std::min(nvec, std::max(groups, ceil_div(want, B)));
    G = ceil_div(nvec, groups);
    groups = ceil_div(nvec, G);
  }
  int64_t row_len() const { return std::max(H, fft_w.size()); }
};

template <typename T, typename scalar_t>
inline vec_t<T> load_lanes(const scalar_t* p, int64_t stride, int64_t n) {
  vec_t<T> v = {};
  if (std::is_same<T, scalar_t>::value && stride == 1 && n == Lanes<T>::kWidth) {
    std::memcpy(&v, p, sizeof(v));
  } else if (stride == 1 && n == Lanes<T>::kWidth) {
    for (int64_t l = 0; l < Lanes<T>::kWidth; ++l) v[l] = static_cast<T>(p[l]);
  } else {
    for (int64_t l = 0; l < n; ++l) v[l] = static_cast<T>(p[l * stride]);
  }
  return v;
}

template <typename T, typename scalar_t>
inline void store_lanes(scalar_t* p, const vec_t<T>& v, int64_t n) {
  if (std::is_same<T, scalar_t>::value && n == Lanes<T>::kWidth) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (int64_t l = 0; l < n; ++l) p[l] = static_cast<scalar_t>(v[l]);
  }
}

// One task: image b's channel vectors [v0, v0 + nv), with S [H][K][nv] its spectrum.
template <typename T>
struct Task {
  const Plan<T>& p;
  int64_t b, v0, nv;
  Cv<T>* a;  // two row buffers of p.row_len() points
  Cv<T>* t;
  int64_t lanes(int64_t v) const { return std::min(Plan<T>::V, p.C - (v0 + v) * Plan<T>::V); }

  // S = the real FFT along W of every row of image x (strides st), each input's 0 * value added to
  // poison[v] so that a non-finite one reaches its channel's outputs.
  template <typename scalar_t>
  void rows_forward(const scalar_t* x, const int64_t* st, Cv<T>* S, vec_t<T>* poison) const {
    const int64_t W = p.W, K = p.K;
    for (int64_t h = 0; h < p.H; ++h)
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t n = lanes(v);
        const scalar_t* row = x + b * st[0] + h * st[1] + (v0 + v) * Plan<T>::V * st[3];
        vec_t<T> pz = {};
        Cv<T>* out = S + h * K * nv + v;
        if (p.half) {
          const int64_t M = W / 2;
          for (int64_t m = 0; m < M; ++m) {
            a[m] = {load_lanes<T>(row + 2 * m * st[2], st[3], n), load_lanes<T>(row + (2 * m + 1) * st[2], st[3], n)};
            pz += a[m].re * T(0) + a[m].im * T(0);
          }
          const Cv<T>* Z = p.fft_w.template run<false>(a, t);
          for (int64_t k = 0; k <= M; ++k) {  // X_k = E_k + e^(-2 pi i k / W) O_k from Z_k and conj(Z_(M-k))
            const Cv<T>& zk = Z[k == M ? 0 : k];
            const Cv<T>& zm = Z[k == 0 ? 0 : M - k];
            const Cv<T> sum = {zk.re + zm.re, zk.im - zm.im}, dif = {zk.re - zm.re, zk.im + zm.im};
            const Cv<T> odd = spectral_fft::cv_rot(Cv<T>{dif.im, -dif.re}, p.tc[k], -p.ts[k]);  // -i dif
            out[k * nv] = {T(0.5) * (sum.re + odd.re), T(0.5) * (sum.im + odd.im)};
          }
        } else {
          for (int64_t w = 0; w < W; ++w) {
            a[w] = {load_lanes<T>(row + w * st[2], st[3], n), vec_t<T>{}};
            pz += a[w].re * T(0);
          }
          const Cv<T>* Z = p.fft_w.template run<false>(a, t);
          for (int64_t k = 0; k < K; ++k) out[k * nv] = Z[k];
        }
        poison[v] += pz;
      }
  }

  // The complex FFT along H of spectrum column (k, v) of S: returns the buffer holding it.
  Cv<T>* column_forward(const Cv<T>* S, int64_t k, int64_t v, Cv<T>* buf, Cv<T>* other) const {
    const int64_t stride = p.K * nv;
    for (int64_t u = 0; u < p.H; ++u) buf[u] = S[u * stride + k * nv + v];
    return p.fft_h.template run<false>(buf, other);
  }

  // The inverse FFT along H of col (in buf or other), written back to column (k, v) of S.
  void column_inverse(Cv<T>* col, Cv<T>* other, Cv<T>* S, int64_t k, int64_t v) const {
    const Cv<T>* r = p.fft_h.template run<true>(col, other);
    const int64_t stride = p.K * nv;
    for (int64_t u = 0; u < p.H; ++u) S[u * stride + k * nv + v] = r[u];
  }

  // out (contiguous [B, H, W, C]) = the inverse real FFT along W of every row of S, plus poison.
  template <typename scalar_t>
  void rows_inverse(const Cv<T>* S, const vec_t<T>* poison, scalar_t* out) const {
    const int64_t W = p.W, K = p.K, C = p.C;
    for (int64_t h = 0; h < p.H; ++h)
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t n = lanes(v);
        const Cv<T>* in = S + h * K * nv + v;
        scalar_t* row = out + ((b * p.H + h) * W) * C + (v0 + v) * Plan<T>::V;
        if (p.half) {  // z_k = (X_k + conj X_(M-k)) + i e^(2 pi i k / W) (X_k - conj X_(M-k))
          const int64_t M = W / 2;
          for (int64_t k = 0; k < M; ++k) {
            Cv<T> xk = in[k * nv], xm = in[(M - k) * nv];
            if (k == 0) xk.im = xm.im = vec_t<T>{};  // irfft ignores Im X_0 and Im X_(W/2)
            const Cv<T> sum = {xk.re + xm.re, xk.im - xm.im}, dif = {xk.re - xm.re, xk.im + xm.im};
            const Cv<T> odd = spectral_fft::cv_rot(dif, p.tc[k], p.ts[k]);
            a[k] = {sum.re - odd.im, sum.im + odd.re};
          }
          const Cv<T>* z = p.fft_w.template run<true>(a, t);
          for (int64_t m = 0; m < M; ++m) {
            store_lanes<T>(row + 2 * m * C, z[m].re + poison[v], n);
            store_lanes<T>(row + (2 * m + 1) * C, z[m].im + poison[v], n);
          }
        } else {
          a[0] = {in[0].re, vec_t<T>{}};
          for (int64_t k = 1; k < K; ++k) {
            a[k] = in[k * nv];
            a[W - k] = {in[k * nv].re, -in[k * nv].im};
          }
          const Cv<T>* z = p.fft_w.template run<true>(a, t);
          for (int64_t w = 0; w < W; ++w) store_lanes<T>(row + w * C, z[w].re + poison[v], n);
        }
      }
  }
};

// The filter as [H][K][nvec] points scaled by 1 / (H W) (conj: the adjoint's), and per channel vector
// 0 * every filter value (a non-finite one poisons its channel).
template <typename T>
void load_filter(const at::Tensor& weight, const Plan<T>& p, bool conj, std::vector<Cv<T>>& F,
                 std::vector<vec_t<T>>& poison) {
  const at::Tensor w = weight.contiguous();
  const int64_t V = Plan<T>::V, HK = p.H * p.K;
  F.assign(static_cast<size_t>(HK * p.nvec), Cv<T>{});
  poison.assign(static_cast<size_t>(p.nvec), vec_t<T>{});
  const T scale = T(1) / static_cast<T>(p.H * p.W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "global_filter_weight", [&] {
    const scalar_t* src = w.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < HK; ++i)
      for (int64_t c = 0; c < p.C; ++c) {
        const T re = static_cast<T>(src[2 * (i * p.C + c)]), im = static_cast<T>(src[2 * (i * p.C + c) + 1]);
        Cv<T>& f = F[i * p.nvec + c / V];
        f.re[c % V] = scale * re;
        f.im[c % V] = scale * (conj ? -im : im);
        poison[c / V][c % V] += re * T(0) + im * T(0);
      }
  });
}

// Runs body(task, S) over every (image, channel group) task, with per-thread buffers.
template <typename T, typename Body>
void for_each_task(const Plan<T>& p, int64_t spectra, const Body& body) {
  if (p.nvec == 0) return;
  at::parallel_for(0, p.B * p.groups, 1, [&](int64_t t0, int64_t t1) {
    std::vector<Cv<T>> S(static_cast<size_t>(spectra * p.H * p.K * p.G)), rows(static_cast<size_t>(2 * p.row_len()));
    for (int64_t i = t0; i < t1; ++i) {
      const int64_t b = i / p.groups, v0 = (i % p.groups) * p.G;
      Task<T> task{p, b, v0, std::min(p.G, p.nvec - v0), rows.data(), rows.data() + p.row_len()};
      body(task, S.data());
    }
  });
}

template <typename scalar_t>
at::Tensor apply_filter(const at::Tensor& x, const at::Tensor& weight, bool conj) {
  using T = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  at::Tensor out = at::empty({B, H, W, C}, x.options());
  if (out.numel() == 0) return out;
  const Plan<T> plan(B, H, W, C, 1);
  std::vector<Cv<T>> F;
  std::vector<vec_t<T>> fpoison;
  load_filter(weight, plan, conj, F, fpoison);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t* st = x.strides().data();
  for_each_task(plan, 1, [&](const Task<T>& task, Cv<T>* S) {
    std::vector<vec_t<T>> poison(fpoison.begin() + task.v0, fpoison.begin() + task.v0 + task.nv);
    task.rows_forward(xp, st, S, poison.data());
    for (int64_t k = 0; k < plan.K; ++k)
      for (int64_t v = 0; v < task.nv; ++v) {
        Cv<T>* col = task.column_forward(S, k, v, task.a, task.t);
        Cv<T>* other = col == task.a ? task.t : task.a;
        const Cv<T>* f = F.data() + k * plan.nvec + task.v0 + v;
        for (int64_t u = 0; u < H; ++u) {
          const Cv<T>& fu = f[u * plan.K * plan.nvec];
          col[u] = {col[u].re * fu.re - col[u].im * fu.im, col[u].re * fu.im + col[u].im * fu.re};
        }
        task.column_inverse(col, other, S, k, v);
      }
    task.rows_inverse(S, poison.data(), op);
  });
  return out;
}

// The backward from one forward transform of grad_output per task: grad_x = the forward with
// conj(w); grad_w [H, K, C, 2] = sum over images of m_k * (products of the spectra of g and x).
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                                            bool x_grad, bool weight_grad) {
  using T = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const Plan<T> plan(B, H, W, C, weight_grad ? 2 : 1);
  const int64_t K = plan.K, HK = H * K, nvec = plan.nvec;
  at::Tensor gx = x_grad ? at::empty({B, H, W, C}, x.options()) : at::empty({0}, x.options());
  std::vector<Cv<T>> F;
  std::vector<vec_t<T>> fpoison;
  load_filter(weight, plan, true, F, fpoison);
  const int threads = at::get_num_threads();
  // Per-thread sums of the filter gradient [H][K][nvec] and of the poison of x and g per channel.
  std::vector<Cv<T>> partial(weight_grad ? static_cast<size_t>(threads * HK * nvec) : 0, Cv<T>{});
  std::vector<vec_t<T>> partial_poison(weight_grad ? static_cast<size_t>(threads * nvec) : 0, vec_t<T>{});
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  scalar_t* gxp = x_grad ? gx.mutable_data_ptr<scalar_t>() : nullptr;
  if (B > 0 && (x_grad || weight_grad))
    for_each_task(plan, weight_grad ? 2 : 1, [&](const Task<T>& task, Cv<T>* S) {
      const int64_t nv = task.nv, tid = at::get_thread_num();
      Cv<T>* Sx = S + HK * plan.G;
      std::vector<vec_t<T>> pg(static_cast<size_t>(nv), vec_t<T>{}), px(static_cast<size_t>(nv), vec_t<T>{});
      task.rows_forward(gp, g.strides().data(), S, pg.data());
      if (weight_grad) task.rows_forward(xp, x.strides().data(), Sx, px.data());
      std::vector<Cv<T>> xcol(weight_grad ? static_cast<size_t>(2 * H) : 0);
      for (int64_t k = 0; k < K; ++k) {
        const T m = (k == 0 || 2 * k == W) ? T(1) : T(2);
        for (int64_t v = 0; v < nv; ++v) {
          Cv<T>* col = task.column_forward(S, k, v, task.a, task.t);
          Cv<T>* other = col == task.a ? task.t : task.a;
          if (weight_grad) {
            const Cv<T>* X = task.column_forward(Sx, k, v, xcol.data(), xcol.data() + H);
            Cv<T>* acc = partial.data() + (tid * HK + k) * nvec + task.v0 + v;
            for (int64_t u = 0; u < H; ++u) {  // dL/dZ = m G; Z = X w
              Cv<T>& s = acc[u * K * nvec];
              s.re += m * (col[u].re * X[u].re + col[u].im * X[u].im);
              s.im += m * (col[u].im * X[u].re - col[u].re * X[u].im);
            }
          }
          if (x_grad) {
            const Cv<T>* f = F.data() + k * nvec + task.v0 + v;
            for (int64_t u = 0; u < H; ++u) {
              const Cv<T>& fu = f[u * K * nvec];
              col[u] = {col[u].re * fu.re - col[u].im * fu.im, col[u].re * fu.im + col[u].im * fu.re};
            }
            task.column_inverse(col, other, S, k, v);
          }
        }
      }
      if (weight_grad)
        for (int64_t v = 0; v < nv; ++v) partial_poison[tid * nvec + task.v0 + v] += pg[v] + px[v];
      if (x_grad) {
        for (int64_t v = 0; v < nv; ++v) pg[v] += fpoison[task.v0 + v];
        task.rows_inverse(S, pg.data(), gxp);
      }
    });
  at::Tensor gw = at::empty({0}, weight.options());
  if (weight_grad) {
    at::Tensor acc = at::empty({H, K, C, 2}, weight.options().dtype(c10::CppTypeToScalarType<T>::value));
    T* dst = acc.mutable_data_ptr<T>();
    const T scale = T(1) / static_cast<T>(H * W);  // the ortho spectra are the unnormalized ones / sqrt(H W)
    const int64_t V = Plan<T>::V;
    for (int64_t i = 0; i < HK; ++i)
      for (int64_t c = 0; c < C; ++c) {
        T re = 0, im = 0, bad = 0;
        for (int t = 0; t < threads; ++t) {
          re += partial[(t * HK + i) * nvec + c / V].re[c % V];
          im += partial[(t * HK + i) * nvec + c / V].im[c % V];
          bad += partial_poison[t * nvec + c / V][c % V];
        }
        dst[2 * (i * C + c)] = scale * re + bad;
        dst[2 * (i * C + c) + 1] = scale * im + bad;
      }
    gw = acc.to(weight.scalar_type());
  }
  return {gx, gw};
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
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "global_filter_backward",
                                         [&] { return backward<scalar_t>(grad_output, x, weight, x_grad, weight_grad); });
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "global_filter", vitk::Backend::kCpu, &vitk::cpu::global_filter);
  VITK_IMPL(m, "global_filter_backward", vitk::Backend::kCpu, &vitk::cpu::global_filter_backward);
}
