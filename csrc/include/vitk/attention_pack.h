// The CPU attention core, layer 4: packing. Row gathers from strided tensors of any float dtype
// into the padded fp32 layouts of attention_core.h, as rows or transposed (16 x 16 register
// transposes on AVX-512). Torch-free.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "vitk/attention_simd.h"

namespace vitk {
namespace attn {

// ------------------------------------------------------------------------------ packing helpers

// Row gathers from strided tensors into the fp32 layouts above; `src(i)` is a pointer to row i's
// first element (nullptr for an absent row, which packs as zeros), sd the element stride along d.

template <typename T, class RowPtr>
inline void pack_rows(int64_t n, int64_t d, int64_t sd, RowPtr src, float mult, float* dst, int64_t ld) {
  for (int64_t i = 0; i < n; ++i) {
    const T* r = src(i);
    float* o = dst + i * ld;
    if (r == nullptr) {
      std::fill(o, o + d, 0.f);
    } else if (sd == 1) {
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(r[c]) * mult;
    } else {
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(r[c * sd]) * mult;
    }
  }
}

#ifdef __AVX512F__
// In-register transpose of a 16 x 16 fp32 block: r[i] holds row i on entry and column i on exit.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}
#endif

// Transposed: dst[c][i] = row i, element c, for i < n. dst columns up to n rounded to 16 must exist
// and be zero past n (the AVX-512 path writes zeros there, the portable one leaves them alone).
// Blocks of 16 rows x 16 elements go through registers (a 16 x 16 transpose), so every store is a
// whole 16-float run of a destination row.
template <typename T, class RowPtr>
inline void pack_cols(int64_t n, int64_t d, int64_t sd, RowPtr src, float* dst, int64_t ld) {
#ifdef __AVX512F__
  alignas(64) float tmp[16 * 16];
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const int64_t in = std::min<int64_t>(16, n - i0);
    const T* rp[16];
    for (int64_t i = 0; i < 16; ++i) rp[i] = i < in ? src(i0 + i) : nullptr;
    for (int64_t c0 = 0; c0 < d; c0 += 16) {
      const int64_t cn = std::min<int64_t>(16, d - c0);
      const __mmask16 cm = simd::tail_mask(cn);
      __m512 r[16];
      for (int64_t i = 0; i < 16; ++i) {
        const T* row = rp[i];
        if (row == nullptr) {
          r[i] = _mm512_setzero_ps();
        } else if (std::is_same<T, float>::value && sd == 1) {
          r[i] = _mm512_maskz_loadu_ps(cm, reinterpret_cast<const float*>(row) + c0);
        } else {
          float* t = tmp + i * 16;
          for (int64_t c = 0; c < 16; ++c) t[c] = c < cn ? static_cast<float>(row[(c0 + c) * sd]) : 0.f;
          r[i] = _mm512_load_ps(t);
        }
      }
      transpose16(r);
      for (int64_t c = 0; c < cn; ++c) _mm512_storeu_ps(dst + (c0 + c) * ld + i0, r[c]);
    }
  }
#else
  for (int64_t i = 0; i < n; ++i) {
    const T* r = src(i);
    float* o = dst + i;
    if (r == nullptr) {
      for (int64_t c = 0; c < d; ++c) o[c * ld] = 0.f;
    } else if (sd == 1) {
      for (int64_t c = 0; c < d; ++c) o[c * ld] = static_cast<float>(r[c]);
    } else {
      for (int64_t c = 0; c < d; ++c) o[c * ld] = static_cast<float>(r[c * sd]);
    }
  }
#endif
}

}  // namespace attn
}  // namespace vitk
