// Mixed-radix FFTs whose "points" are vectors of lanes: one transform runs on many independent
// sequences at once (the channels of a channels-last image), so every butterfly is a vector operation
// and nothing is transposed.
//
// The schedule is Stockham's autosort form (Govindaraju et al., "High performance discrete Fourier
// transforms on graphics processors", 2008), which works for any product of radices: with Ns the
// product of the radices already done, stage j in [0, N/R) reads the R points j + r N/R, multiplies
// the r-th by exp(sign 2 pi i r (j mod Ns) / (Ns R)), takes their R-point DFT and writes it to
// (j / Ns) Ns R + (j mod Ns) + r Ns of the other buffer. Radices 4 and 2 are butterflies with +-1
// and +-i; odd primes use the symmetric form (sums and differences of a_r and a_{R-r}), which halves
// the multiplications of the dense R-point DFT; 3, 5 and 7 are unrolled, larger primes run the same
// form in a loop. The ViT grids 7, 14, 28 and 56 are 7, 2x7, 4x7 and 4x2x7.
//
// Transforms are unnormalized: forward sums with exp(-2 pi i ...), inverse with exp(+2 pi i ...).
// Twiddles come from double-precision cos and sin. A NaN or an infinity spreads only within its own
// lane, never to another one.
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace vitk {
namespace cpu {
namespace spectral_fft {

// 32 bytes of lanes: one AVX register (two SSE ones on baseline x86-64 builds).
template <typename T>
struct Lanes {
  typedef T vec __attribute__((vector_size(32)));
  static constexpr int64_t kWidth = 32 / static_cast<int64_t>(sizeof(T));
};

template <typename T>
using vec_t = typename Lanes<T>::vec;

// One complex point: the real and the imaginary part of kWidth lanes.
template <typename T>
struct Cv {
  vec_t<T> re, im;
};

template <typename T>
inline Cv<T> cv_add(const Cv<T>& a, const Cv<T>& b) {
  return {a.re + b.re, a.im + b.im};
}
template <typename T>
inline Cv<T> cv_sub(const Cv<T>& a, const Cv<T>& b) {
  return {a.re - b.re, a.im - b.im};
}
// a * (c + i s), with the scalar twiddle broadcast over the lanes.
template <typename T>
inline Cv<T> cv_rot(const Cv<T>& a, T c, T s) {
  return {a.re * c - a.im * s, a.re * s + a.im * c};
}
// a * (sign i): +i for sign > 0, -i otherwise; exact, a swap and a negation.
template <bool Inverse, typename T>
inline Cv<T> cv_i(const Cv<T>& a) {
  if (Inverse) return {-a.im, a.re};
  return {a.im, -a.re};
}

template <typename T>
class LaneFft {
 public:
  explicit LaneFft(int64_t n) : n_(n) {
    int64_t rest = n, Ns = 1;
    auto add = [&](int64_t R) {
      Stage st;
      st.R = R;
      st.Ns = Ns;
      st.c.resize(static_cast<size_t>(Ns * R));
      st.s.resize(static_cast<size_t>(Ns * R));
      for (int64_t k = 0; k < Ns; ++k)
        for (int64_t r = 0; r < R; ++r) {
          const double a = 2.0 * M_PI * static_cast<double>(r * k) / static_cast<double>(Ns * R);
          st.c[k * R + r] = static_cast<T>(std::cos(a));
          st.s[k * R + r] = static_cast<T>(std::sin(a));
        }
      if (R % 2 == 1) {  // the odd R-point DFT: cos and sin of 2 pi j / R
        st.dc.resize(static_cast<size_t>(R));
        st.ds.resize(static_cast<size_t>(R));
        for (int64_t j = 0; j < R; ++j) {
          const double a = 2.0 * M_PI * static_cast<double>(j) / static_cast<double>(R);
          st.dc[j] = static_cast<T>(std::cos(a));
          st.ds[j] = static_cast<T>(std::sin(a));
        }
      }
      stages_.push_back(std::move(st));
      Ns *= R;
      rest /= R;
    };
    while (rest % 4 == 0) add(4);
    while (rest % 2 == 0) add(2);
    for (int64_t p = 3; rest > 1; p += 2)
      while (rest % p == 0) add(p);
  }

  int64_t size() const { return n_; }

  // Transforms a[0, n) using b[0, n) as the other buffer; returns whichever holds the result.
  template <bool Inverse>
  Cv<T>* run(Cv<T>* a, Cv<T>* b) const {
    for (const Stage& st : stages_) {
      switch (st.R) {
        case 2: stage<Inverse, 2>(st, a, b); break;
        case 3: stage<Inverse, 3>(st, a, b); break;
        case 4: stage<Inverse, 4>(st, a, b); break;
        case 5: stage<Inverse, 5>(st, a, b); break;
        case 7: stage<Inverse, 7>(st, a, b); break;
        default: stage_loop<Inverse>(st, a, b); break;
      }
      std::swap(a, b);
    }
    return a;
  }

 private:
  struct Stage {
    int64_t R, Ns;
    std::vector<T> c, s;    // [Ns][R]: cos and sin of 2 pi r k / (Ns R)
    std::vector<T> dc, ds;  // [R], odd primes only
  };

  // The R-point DFT of v in place, R in {2, 3, 4, 5, 7}; (dc, ds) the odd primes' tables.
  template <bool Inverse, int R>
  static void dft(Cv<T>* v, const T* dc, const T* ds) {
    if (R == 2) {
      const Cv<T> a = v[0], b = v[1];
      v[0] = cv_add(a, b);
      v[1] = cv_sub(a, b);
    } else if (R == 4) {
      const Cv<T> s02 = cv_add(v[0], v[2]), d02 = cv_sub(v[0], v[2]);
      const Cv<T> s13 = cv_add(v[1], v[3]), d13 = cv_i<Inverse>(cv_sub(v[1], v[3]));
      v[0] = cv_add(s02, s13);
      v[1] = cv_add(d02, d13);
      v[2] = cv_sub(s02, s13);
      v[3] = cv_sub(d02, d13);
    } else {  // odd prime: X_q = a0 + sum_r cos(2 pi q r / R) s_r +- i sum_r sin(2 pi q r / R) d_r
      constexpr int P = (R - 1) / 2;
      Cv<T> s[P], d[P];
      Cv<T> x0 = v[0];
      for (int r = 1; r <= P; ++r) {
        s[r - 1] = cv_add(v[r], v[R - r]);
        d[r - 1] = cv_sub(v[r], v[R - r]);
        x0 = cv_add(x0, s[r - 1]);
      }
      for (int q = 1; q <= P; ++q) {
        Cv<T> a = v[0], b = {vec_t<T>{}, vec_t<T>{}};
        for (int r = 1; r <= P; ++r) {
          const int j = (q * r) % R;
          a.re += dc[j] * s[r - 1].re;
          a.im += dc[j] * s[r - 1].im;
          b.re += ds[j] * d[r - 1].re;
          b.im += ds[j] * d[r - 1].im;
        }
        const Cv<T> ib = cv_i<Inverse>(b);
        v[q] = cv_add(a, ib);
        v[R - q] = cv_sub(a, ib);
      }
      v[0] = x0;
    }
  }

  template <bool Inverse, int R>
  void stage(const Stage& st, const Cv<T>* __restrict in, Cv<T>* __restrict out) const {
    const int64_t Ns = st.Ns, stride = n_ / R;
    for (int64_t j0 = 0; j0 < stride; j0 += Ns)
      for (int64_t k = 0; k < Ns; ++k) {
        Cv<T> v[R];
        v[0] = in[j0 + k];
        const T* c = st.c.data() + k * R;
        const T* s = st.s.data() + k * R;
        for (int r = 1; r < R; ++r) v[r] = cv_rot(in[j0 + k + r * stride], c[r], Inverse ? s[r] : -s[r]);
        dft<Inverse, R>(v, st.dc.data(), st.ds.data());
        Cv<T>* o = out + j0 * R + k;
        for (int r = 0; r < R; ++r) o[r * Ns] = v[r];
      }
  }

  // Any odd prime R: the same symmetric form with the R-point tables, in loops.
  template <bool Inverse>
  void stage_loop(const Stage& st, const Cv<T>* __restrict in, Cv<T>* __restrict out) const {
    const int64_t R = st.R, Ns = st.Ns, stride = n_ / R, P = (R - 1) / 2;
    static thread_local std::vector<Cv<T>> tmp;
    tmp.resize(static_cast<size_t>(2 * R));
    Cv<T>* v = tmp.data();
    Cv<T>* sd = v + R;  // s_r at [0, P), d_r at [P, 2P)
    for (int64_t j0 = 0; j0 < stride; j0 += Ns)
      for (int64_t k = 0; k < Ns; ++k) {
        const T* c = st.c.data() + k * R;
        const T* s = st.s.data() + k * R;
        v[0] = in[j0 + k];
        for (int64_t r = 1; r < R; ++r) v[r] = cv_rot(in[j0 + k + r * stride], c[r], Inverse ? s[r] : -s[r]);
        Cv<T> x0 = v[0];
        for (int64_t r = 1; r <= P; ++r) {
          sd[r - 1] = cv_add(v[r], v[R - r]);
          sd[P + r - 1] = cv_sub(v[r], v[R - r]);
          x0 = cv_add(x0, sd[r - 1]);
        }
        Cv<T>* o = out + j0 * R + k;
        o[0] = x0;
        for (int64_t q = 1; q <= P; ++q) {
          Cv<T> a = v[0], b = {vec_t<T>{}, vec_t<T>{}};
          for (int64_t r = 1; r <= P; ++r) {
            const int64_t j = (q * r) % R;
            a.re += st.dc[j] * sd[r - 1].re;
            a.im += st.dc[j] * sd[r - 1].im;
            b.re += st.ds[j] * sd[P + r - 1].re;
            b.im += st.ds[j] * sd[P + r - 1].im;
          }
          const Cv<T> ib = cv_i<Inverse>(b);
          o[q * Ns] = cv_add(a, ib);
          o[(R - q) * Ns] = cv_sub(a, ib);
        }
      }
  }

  int64_t n_;
  std::vector<Stage> stages_;
};

}  // namespace spectral_fft
}  // namespace cpu
}  // namespace vitk
