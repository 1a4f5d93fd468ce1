// CPU kernel of quantized attention (RepQ-ViT's log√2 softmax quantizer, the log2 quantizer, AdaLog's
// learned base): out = P̂ v̂ with int8 q̂, k̂, v̂ and P̂ the log-grid quantization of softmax(scale q̂ k̂ᵀ).
// Semantics: vitkernels/reference/quant_attention.py.
//
// Fused, with no N×N tensor: a task is a block of kBlockQ queries of one (image, head); it keeps one
// row of logits per query (O(N) per thread) and makes two passes over the keys.
//
// Pass 1 computes the logits with real int8 dot products and takes each row's max m and softmax
// denominator l. The codes are c = clamp(round(x / s) + z, -128, 127), computed in double as the
// reference does, so they are the reference's codes bit for bit. With AVX-512 VNNI, vpdpbusd multiplies
// unsigned by signed bytes: the query codes are stored as cq + 128 (unsigned) and the keys as signed
// codes in the operand layout [key block of 16][dim quad][16 keys][4 dims], and the +128 is taken
// back by subtracting 128 Σ_t ck_t per key. The zero points expand as
//   Σ (cq - zq)(ck - zk) = Σ cq ck - zk Σ cq - zq Σ ck + d zq zk,
// all in int32 (exact for d <= kMaxHeadDim), then one float multiply by scale·s_q·s_k gives the logit.
// Without VNNI the same integer sums run in portable code.
//
// Pass 2 needs no exponential and no logarithm per element: with P = e^(x - m) / l,
//   c = round(-log(P / δ) / log(base)) = round((m - x) / log(base) + (log l + log δ) / log(base))
// is one fused multiply-add and a round per key. P̂ = δ base^-c is read from a table of 2^bits values
// (a register permute for up to 32 codes, a gather beyond), and out += P̂ v̂ runs over the keys whose
// P̂ is non-zero only (with 4-bit codes most keys of a 197-token row fall below the grid). This direct
// form does as many multiply-adds as accumulating v̂ per code (one add per key) and combining the
// 2^bits sums once (one multiply-add per code used), minus that combine and the per-code bookkeeping,
// and it measured faster (one thread, batch 8, N = 197, d = 64, bench/quant_attention.py's cases,
// timed before the packing was vectorized, with this pass 2 unchanged since), direct vs per-code
// 19.1 vs 21.9 ms (DeiT-S, 6 heads, 4-bit log√2), 37.5 vs 42.7 ms (ViT-B, 12 heads,
// 4-bit), 45.9 vs 58-68 ms (ViT-B, 8-bit log2, where up to 256 codes are in use).
//
// NaN in q, k or v propagates as in the eager simulation (the int8 codes cannot hold it, so it is
// tracked as flags): a NaN query makes its row NaN, a NaN key its whole head, a NaN value its column.
#include "vitk/quant_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vitk/attention_simd.h"
#include "vitk/checks.h"
#include "vitk/registration.h"
#include "vitk/tiling.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define VITK_QATTN_VNNI 1
#endif

namespace vitk {
namespace cpu {
namespace {

constexpr int64_t kBlockQ = 32;          // queries per task
constexpr int64_t kMaxHeadDim = 32768;   // d * 255 * 255 stays inside int32
// P underflows to exactly 0 in the float64 simulation below e^-745.13 (the smallest double).
constexpr float kUnderflow = 745.13f;

struct Problem {
  int64_t B, N, Nk, H, d, dv, d4, nkb, ldn, ldv;
  float alpha;                 // scale * q_scale * k_scale
  int32_t zq, zk;
  int L;                       // 2^bits codes
  float inv_ln_base;
  double ln_delta;
  std::vector<float> table;    // δ base^-c, padded to a multiple of 16 with zeros
};

// clamp(round(x / s) + z, -128, 127), in double as the reference evaluates it; NaN sets *nan.
inline int32_t code8(double x, double s, int32_t z, bool* nan) {
  if (std::isnan(x)) {
    *nan = true;
    return 0;
  }
  const double r = std::nearbyint(x / s) + z;
  return static_cast<int32_t>(std::min(127.0, std::max(-128.0, r)));
}

// Codes of one row of n values (element stride `stride`) into out[0, n); returns whether any is NaN.
// fp32 rows of unit stride are read in place, others converted into `buf` first. x / s is evaluated in
// double, 8 lanes at a time, as x * (1 / s), which is within 1 ulp of the quotient: it rounds to the
// same integer unless the quotient lies within 2^-30 of a half-integer, and such vectors (rare) are
// divided exactly, so the codes are the reference's bit for bit. (Quotients beyond +-2048 clamp to
// the same code either way.)
template <typename T>
bool row_codes(const T* x, int64_t stride, int64_t n, double s, int32_t z, float* buf, int32_t* out) {
  const float* xf;
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) {
      xf = x;
    } else {
      for (int64_t t = 0; t < n; ++t) buf[t] = x[t * stride];
      xf = buf;
    }
  } else {
    for (int64_t t = 0; t < n; ++t) buf[t] = static_cast<float>(x[t * stride]);
    xf = buf;
  }
#ifdef __AVX512F__
  const __m512d sv = _mm512_set1_pd(s), inv = _mm512_set1_pd(1.0 / s), zv = _mm512_set1_pd(z);
  const __m512d half = _mm512_set1_pd(0.5), tie = _mm512_set1_pd(0x1p-30), big = _mm512_set1_pd(2048.0);
  const __m512d lo = _mm512_set1_pd(-128.0), hi = _mm512_set1_pd(127.0);
  __mmask8 nan = 0;
  for (int64_t t = 0; t < n; t += 8) {
    const __mmask8 in = n - t >= 8 ? __mmask8(0xFF) : __mmask8((1u << (n - t)) - 1u);
    const __m512d xd = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(in, xf + t));
    nan |= _mm512_mask_cmp_pd_mask(in, xd, xd, _CMP_UNORD_Q);
    __m512d q = _mm512_mul_pd(xd, inv);
    const __m512d frac = _mm512_sub_pd(_mm512_sub_pd(q, _mm512_roundscale_pd(q, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)),
                                       half);
    if (_mm512_cmp_pd_mask(_mm512_abs_pd(frac), tie, _CMP_LT_OQ) & _mm512_cmp_pd_mask(_mm512_abs_pd(q), big, _CMP_LT_OQ))
      q = _mm512_div_pd(xd, sv);
    __m512d r = _mm512_roundscale_pd(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_pd(_mm512_max_pd(_mm512_add_pd(r, zv), lo), hi);   // NaN lanes become -128 (flagged)
    _mm256_mask_storeu_epi32(out + t, in, _mm512_cvtpd_epi32(r));
  }
  return nan != 0;
#else
  bool nan = false;
  for (int64_t t = 0; t < n; ++t) out[t] = code8(static_cast<double>(xf[t]), s, z, &nan);
  return nan;
#endif
}

// Prefetch the row `ahead` rows past `row` (rows `stride` elements apart, n elements of T each): the
// rows of one head are 3 * heads * d elements apart in a packed qkv projection, too far for the
// hardware prefetcher to follow within a (image, head)'s pass.
template <typename T>
inline void prefetch_row(const T* row, int64_t stride, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row + 4 * stride);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off);
}

// The keys and values of one (image, head), packed once per thread while its tasks stay on them.
struct KV {
  std::vector<int8_t> kc;      // [nkb][d4][16][4]
  std::vector<int32_t> kfix;   // per key: -128 Σ ck - zq Σ ck + d zq zk (the correction of the raw dot)
  std::vector<float> v;        // [Nk][ldv] dequantized values
  std::vector<float> vnan;     // [ldv]: NaN in columns that hold a NaN value, else 0
  bool knan = false;
  std::vector<float> buf;      // one row, converted to fp32
  std::vector<int32_t> codes;  // its codes
};

struct Workspace {
  KV kv;
  int64_t problem = -1;
  std::vector<uint8_t> qc;     // [kBlockQ][d4 * 4], codes + 128
  std::vector<int32_t> qfix;   // per query: -zk Σ cq
  std::vector<char> qnan;
  std::vector<float> s;        // [kBlockQ][ldn] logits, then P̂
  std::vector<int32_t> idx;    // non-zero P̂ of one row
  std::vector<float> w;
  std::vector<float> acc;      // [ldv]
};

template <typename T>
void pack_kv(const Problem& p, const T* k, const T* v, at::IntArrayRef ks, at::IntArrayRef vs, int64_t b,
             int64_t h, double sk, int32_t zk, double sv, int32_t zv, KV& kv) {
  kv.kc.assign(p.nkb * p.d4 * 64, 0);
  kv.kfix.assign(p.ldn, 0);
  kv.v.assign(p.Nk * p.ldv, 0.f);
  kv.vnan.assign(p.ldv, 0.f);
  kv.knan = false;
  kv.buf.resize(std::max(p.d, p.dv));
  kv.codes.resize(std::max(p.d, p.dv));
  for (int64_t j = 0; j < p.Nk; ++j) {
    const T* kr = k + b * ks[0] + j * ks[1] + h * ks[2];
    const T* vr = v + b * vs[0] + j * vs[1] + h * vs[2];
    if (j + 4 < p.Nk && ks[3] == 1 && vs[3] == 1) {
      prefetch_row(kr, ks[1], p.d);
      prefetch_row(vr, vs[1], p.dv);
    }
    int8_t* blk = kv.kc.data() + (j / 16) * p.d4 * 64 + (j % 16) * 4;
    int32_t sum = 0;
    kv.knan |= row_codes(kr, ks[3], p.d, sk, zk, kv.buf.data(), kv.codes.data());
    for (int64_t t = 0; t < p.d; ++t) {
      const int32_t c = kv.codes[t];
      blk[(t / 4) * 64 + (t % 4)] = static_cast<int8_t>(c);
      sum += c;
    }
#ifdef VITK_QATTN_VNNI
    kv.kfix[j] = -128 * sum - p.zq * sum + static_cast<int32_t>(p.d) * p.zq * zk;
#else
    kv.kfix[j] = -p.zq * sum + static_cast<int32_t>(p.d) * p.zq * zk;
#endif
    float* vo = kv.v.data() + j * p.ldv;
    const bool vnan = row_codes(vr, vs[3], p.dv, sv, zv, kv.buf.data(), kv.codes.data());
    for (int64_t t = 0; t < p.dv; ++t) vo[t] = static_cast<float>(sv * (kv.codes[t] - zv));
    if (vnan)
      for (int64_t t = 0; t < p.dv; ++t)
        if (std::isnan(static_cast<float>(vr[t * vs[3]]))) kv.vnan[t] = std::numeric_limits<float>::quiet_NaN();
  }
}

// Logits of rows [0, m) of the block against every key: s[i * ldn + j].
void scores(const Problem& p, const Workspace& ws, const KV& kv, int64_t m, float* s) {
  const int64_t dq = p.d4 * 4;
#ifdef VITK_QATTN_VNNI
  const __m512 alpha = _mm512_set1_ps(p.alpha);
  int64_t i = 0;
  for (; i < m; i += 4) {
    const int64_t r = std::min<int64_t>(4, m - i);
    const uint8_t* q0 = ws.qc.data() + i * dq;
    for (int64_t kb = 0; kb < p.nkb; ++kb) {
      const int8_t* kp = kv.kc.data() + kb * p.d4 * 64;
      __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t g = 0; g < p.d4; ++g) {
        const __m512i kw = _mm512_loadu_si512(kp + g * 64);
        int32_t w[4];
        for (int64_t rr = 0; rr < 4; ++rr)
          std::memcpy(&w[rr], q0 + std::min<int64_t>(rr, r - 1) * dq + g * 4, 4);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(w[0]), kw);
        a1 = _mm512_dpbusd_epi32(a1, _mm512_set1_epi32(w[1]), kw);
        a2 = _mm512_dpbusd_epi32(a2, _mm512_set1_epi32(w[2]), kw);
        a3 = _mm512_dpbusd_epi32(a3, _mm512_set1_epi32(w[3]), kw);
      }
      const __m512i fix = _mm512_loadu_si512(kv.kfix.data() + kb * 16);
      const __m512i acc[4] = {a0, a1, a2, a3};
      for (int64_t rr = 0; rr < r; ++rr) {
        const __m512i t = _mm512_add_epi32(_mm512_add_epi32(acc[rr], fix), _mm512_set1_epi32(ws.qfix[i + rr]));
        _mm512_storeu_ps(s + (i + rr) * p.ldn + kb * 16, _mm512_mul_ps(_mm512_cvtepi32_ps(t), alpha));
      }
    }
  }
#else
  for (int64_t i = 0; i < m; ++i) {
    const uint8_t* qr = ws.qc.data() + i * dq;
    for (int64_t kb = 0; kb < p.nkb; ++kb) {
      const int8_t* kp = kv.kc.data() + kb * p.d4 * 64;
      int32_t acc[16] = {};
      for (int64_t g = 0; g < p.d4; ++g)
        for (int l = 0; l < 16; ++l)
          for (int e = 0; e < 4; ++e)
            acc[l] += (static_cast<int32_t>(qr[g * 4 + e]) - 128) * kp[g * 64 + l * 4 + e];
      for (int l = 0; l < 16; ++l)
        s[i * p.ldn + kb * 16 + l] =
            static_cast<float>(acc[l] + kv.kfix[kb * 16 + l] + ws.qfix[i]) * p.alpha;
    }
  }
#endif
}

// Σ_j e^(x_j - mx) over j < n.
inline float exp_sum(const float* x, int64_t n, float mx) {
#ifdef __AVX512F__
  using namespace attn::simd;
  const vf mv = set1(mx);
  vf sum = zero();
  for (int64_t j = 0; j < n; j += attn::kLanes) sum = add(sum, exp(sub(load_or_neginf(x + j, n - j), mv)));
  return hsum(sum);
#else
  float acc[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) acc[l] += attn::simd::exp1(x[j + l] - mx);
  for (; j < n; ++j) acc[0] += attn::simd::exp1(x[j] - mx);
  float r = 0.f;
  for (int l = 0; l < 16; ++l) r += acc[l];
  return r;
#endif
}

// x[j] (j < n) becomes P̂_j; returns the number of non-zero P̂, whose keys and weights go to idx / w.
int64_t quantize_row(const Problem& p, float* x, int64_t n, float mx, float l, int32_t* idx, float* w) {
  const float r = p.inv_ln_base;
  const float k0 = static_cast<float>((std::log(static_cast<double>(l)) + p.ln_delta) * p.inv_ln_base);
  int64_t cnt = 0;
#ifdef __AVX512F__
  const __m512 mv = _mm512_set1_ps(mx), rv = _mm512_set1_ps(r), kv = _mm512_set1_ps(k0);
  const __m512 lim = _mm512_set1_ps(static_cast<float>(p.L)), under = _mm512_set1_ps(kUnderflow);
  const __m512 t0 = _mm512_loadu_ps(p.table.data());
  const __m512 t1 = p.L > 16 ? _mm512_loadu_ps(p.table.data() + 16) : t0;
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 in = attn::simd::tail_mask(n - j);
    const __m512 gap = _mm512_sub_ps(mv, _mm512_maskz_loadu_ps(in, x + j));
    __m512 c = _mm512_roundscale_ps(_mm512_fmadd_ps(gap, rv, kv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    c = _mm512_max_ps(c, _mm512_setzero_ps());
    const __mmask16 keep = in & _mm512_cmp_ps_mask(c, lim, _CMP_LT_OQ) & _mm512_cmp_ps_mask(gap, under, _CMP_LT_OQ);
    const __m512i ci = _mm512_cvtps_epi32(_mm512_maskz_mov_ps(keep, c));
    __m512 wv;
    if (p.L <= 32)
      wv = _mm512_permutex2var_ps(t0, ci, t1);
    else
      wv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), keep, ci, p.table.data(), 4);
    wv = _mm512_maskz_mov_ps(keep, wv);
    _mm512_mask_storeu_ps(x + j, in, wv);
    // Compress in registers and store whole vectors (idx and w have 16 floats of slack): the memory
    // form of vpcompress is microcoded and several times slower.
    _mm512_storeu_si512(idx + cnt, _mm512_maskz_compress_epi32(keep, _mm512_add_epi32(lane, _mm512_set1_epi32(
                                                                             static_cast<int32_t>(j)))));
    _mm512_storeu_ps(w + cnt, _mm512_maskz_compress_ps(keep, wv));
    cnt += __builtin_popcount(keep);
  }
#else
  for (int64_t j = 0; j < n; ++j) {
    const float gap = mx - x[j];
    float c = std::nearbyint(gap * r + k0);
    c = std::max(c, 0.f);
    float wj = 0.f;
    if (c < static_cast<float>(p.L) && gap < kUnderflow) {
      wj = p.table[static_cast<int>(c)];
      idx[cnt] = static_cast<int32_t>(j);
      w[cnt++] = wj;
    }
    x[j] = wj;
  }
#endif
  return cnt;
}

// acc[0, ldv) = Σ_n w[n] v[idx[n]].
void accumulate(const float* v, int64_t ldv, const int32_t* idx, const float* w, int64_t cnt, float* acc) {
#ifdef __AVX512F__
  int64_t c0 = 0;
  for (; c0 + 64 <= ldv; c0 += 64) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t n = 0; n < cnt; ++n) {
      const float* vr = v + idx[n] * ldv + c0;
      const __m512 wv = _mm512_set1_ps(w[n]);
      a0 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(vr), a0);
      a1 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(vr + 16), a1);
      a2 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(vr + 32), a2);
      a3 = _mm512_fmadd_ps(wv, _mm512_loadu_ps(vr + 48), a3);
    }
    _mm512_storeu_ps(acc + c0, a0);
    _mm512_storeu_ps(acc + c0 + 16, a1);
    _mm512_storeu_ps(acc + c0 + 32, a2);
    _mm512_storeu_ps(acc + c0 + 48, a3);
  }
  for (; c0 < ldv; c0 += 16) {
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t n = 0; n < cnt; ++n) a0 = _mm512_fmadd_ps(_mm512_set1_ps(w[n]), _mm512_loadu_ps(v + idx[n] * ldv + c0), a0);
    _mm512_storeu_ps(acc + c0, a0);
  }
#else
  std::fill(acc, acc + ldv, 0.f);
  for (int64_t n = 0; n < cnt; ++n) {
    const float* vr = v + idx[n] * ldv;
    for (int64_t c = 0; c < ldv; ++c) acc[c] += w[n] * vr[c];
  }
#endif
}

template <typename T>
void run(const Problem& p, const T* q, const T* k, const T* v, at::IntArrayRef qs, at::IntArrayRef ks,
         at::IntArrayRef vs, double sq, double sk, double sv, int32_t zv, T* out) {
  const int64_t nqb = (p.N + kBlockQ - 1) / kBlockQ;
  const int64_t dq = p.d4 * 4;
  const float qnan_v = std::numeric_limits<float>::quiet_NaN();
  at::parallel_for(0, p.B * p.H * nqb, 1, [&](int64_t begin, int64_t end) {
    Workspace ws;
    ws.qc.resize(kBlockQ * dq);
    ws.qfix.resize(kBlockQ);
    ws.qnan.resize(kBlockQ);
    ws.s.resize(kBlockQ * p.ldn);
    ws.idx.resize(p.ldn + 16);
    ws.w.resize(p.ldn + 16);
    ws.acc.resize(p.ldv);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t prob = task / nqb, qb = task % nqb;
      const int64_t b = prob / p.H, h = prob % p.H;
      if (prob != ws.problem) {
        pack_kv(p, k, v, ks, vs, b, h, sk, p.zk, sv, zv, ws.kv);
        ws.problem = prob;
      }
      const int64_t i0 = qb * kBlockQ, m = std::min(kBlockQ, p.N - i0);
      for (int64_t i = 0; i < m; ++i) {
        const T* qr = q + b * qs[0] + (i0 + i) * qs[1] + h * qs[2];
        if (i + 4 < m && qs[3] == 1) prefetch_row(qr, qs[1], p.d);
        uint8_t* qo = ws.qc.data() + i * dq;
        const bool nan = row_codes(qr, qs[3], p.d, sq, p.zq, ws.kv.buf.data(), ws.kv.codes.data());
        int32_t sum = 0;
        for (int64_t t = 0; t < p.d; ++t) {
          const int32_t c = ws.kv.codes[t];
          qo[t] = static_cast<uint8_t>(c + 128);
          sum += c;
        }
        for (int64_t t = p.d; t < dq; ++t) qo[t] = 128;
        ws.qfix[i] = -p.zk * sum;
        ws.qnan[i] = nan;
      }
      scores(p, ws, ws.kv, m, ws.s.data());
      for (int64_t i = 0; i < m; ++i) {
        float* x = ws.s.data() + i * p.ldn;
        const float mx = attn::simd::row_max(x, p.Nk);
        const float l = exp_sum(x, p.Nk, mx);
        const int64_t cnt = quantize_row(p, x, p.Nk, mx, l, ws.idx.data(), ws.w.data());
        accumulate(ws.kv.v.data(), p.ldv, ws.idx.data(), ws.w.data(), cnt, ws.acc.data());
        const float rownan = (ws.qnan[i] || ws.kv.knan) ? qnan_v : 0.f;
        T* o = out + ((b * p.N + i0 + i) * p.H + h) * p.dv;
        for (int64_t t = 0; t < p.dv; ++t) o[t] = static_cast<T>(ws.acc[t] + ws.kv.vnan[t] + rownan);
      }
    }
  });
}

void check_positive(double x, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(x) && x > 0, name, ": expected a positive finite value, got ", x);
}

void check_zero(int64_t z, const char* name) {
  TORCH_CHECK_VALUE(z >= -128 && z <= 127, name, ": expected an int8 zero point in [-128, 127], got ", z);
}

}  // namespace

at::Tensor quant_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double q_scale,
                           double k_scale, double v_scale, int64_t q_zero, int64_t k_zero, int64_t v_zero,
                           int64_t attn_bits, double attn_base, double attn_delta, std::optional<double> scale) {
  const at::Tensor* tensors[] = {&q, &k, &v};
  const char* names[] = {"q", "k", "v"};
  for (int i = 0; i < 3; ++i) {
    check_dtype_in(*tensors[i], names[i], {at::kFloat, at::kBFloat16, at::kHalf});
    check_same_device(q, "q", *tensors[i], names[i]);
    check_same_dtype(q, "q", *tensors[i], names[i]);
    TORCH_CHECK_VALUE(tensors[i]->dim() == 4, names[i], ": expected 4 dimensions [B, N, heads, head_dim], got shape ",
                      tensors[i]->sizes());
  }
  check_device_type(q, "q", c10::DeviceType::CPU);
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), d = q.size(3);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(2) == H && k.size(3) == d, "k: expected shape [", B, ", Nk, ", H, ", ",
                    d, "] (q's batch, heads and head_dim), got ", k.sizes());
  TORCH_CHECK_VALUE(k.size(1) >= 1, "k: expected at least one key, got shape ", k.sizes());
  TORCH_CHECK_VALUE(v.size(0) == B && v.size(1) == k.size(1) && v.size(2) == H, "v: expected shape [", B, ", ",
                    k.size(1), ", ", H, ", head_dim_v] (k's batch, keys and heads), got ", v.sizes());
  check_nonempty_dim(q, "q", 3, "head_dim");
  check_nonempty_dim(v, "v", 3, "head_dim");
  TORCH_CHECK_VALUE(d <= kMaxHeadDim, "q: expected head_dim <= ", kMaxHeadDim, " (the int32 accumulator's range), got ",
                    d);
  check_positive(q_scale, "q_scale");
  check_positive(k_scale, "k_scale");
  check_positive(v_scale, "v_scale");
  check_zero(q_zero, "q_zero");
  check_zero(k_zero, "k_zero");
  check_zero(v_zero, "v_zero");
  TORCH_CHECK_VALUE(attn_bits >= 1 && attn_bits <= 8, "attn_bits: expected 1 to 8 bits, got ", attn_bits);
  TORCH_CHECK_VALUE(std::isfinite(attn_base) && attn_base > 1, "attn_base: expected a finite base > 1, got ",
                    attn_base);
  check_positive(attn_delta, "attn_delta");
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d));
  check_positive(sc, "scale");

  Problem p;
  p.B = B, p.N = N, p.Nk = k.size(1), p.H = H, p.d = d, p.dv = v.size(3);
  p.d4 = (d + 3) / 4, p.nkb = (p.Nk + 15) / 16, p.ldn = p.nkb * 16, p.ldv = round_up(p.dv, 16);
  p.alpha = static_cast<float>(sc * q_scale * k_scale);
  p.zq = static_cast<int32_t>(q_zero), p.zk = static_cast<int32_t>(k_zero);
  p.L = 1 << attn_bits;
  p.inv_ln_base = static_cast<float>(1.0 / std::log(attn_base));
  p.ln_delta = std::log(attn_delta);
  p.table.assign(std::max(p.L, 32), 0.f);
  for (int c = 0; c < p.L; ++c) p.table[c] = static_cast<float>(attn_delta * std::pow(attn_base, -c));

  at::Tensor out = at::empty({B, N, H, p.dv}, q.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "quant_attention", [&] {
    run<scalar_t>(p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                  q.strides(), k.strides(), v.strides(), q_scale, k_scale, v_scale, static_cast<int32_t>(v_zero),
                  out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

TORCH_LIBRARY_IMPL(vitk, CPU, m) { VITK_IMPL(m, "quant_attention", vitk::Backend::kCpu, &vitk::cpu::quant_attention); }

}  // namespace cpu
}  // namespace vitk
