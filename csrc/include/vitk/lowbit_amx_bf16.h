// Float GEMMs over 4-bit codes on AMX bf16 tiles (int4_linear, shift_linear), torch-free.
//
// Every code's value is exact in bf16: int4 codes are the integers -8..15 (the group's scale and zero
// point are applied to the fp32 sums of each group), shift codes are 0 and +-2^-e. x is fp32, so each
// row is split into bf16 parts whose sum is x exactly: x0 = bf16(x), x1 = bf16(x - x0), x2 = x - x0 - x1
// (each part holds the next 8 bits of x's 24-bit significand; a fp16 x needs two parts, a bf16 x one).
// Every product of a part and a code is then exact in fp32 and TDPBF16PS sums them in fp32: the result
// is a fp32-accumulated dot product of the exact x and the exact weight, as the fp32 kernels compute,
// with one tile instruction doing the work of 16 zmm fma's.
//
// The parts are exact only for |x| in [2^-90, 2^126): the tile unit and the conversions flush bf16
// denormals, x - x0 of an inf is NaN, and bf16(x) of the largest floats is inf. split_row reports rows
// with any non-finite value, any |x| >= 2^126, or a largest |x| in (0, 2^-90); the caller computes those
// rows with the fp32 kernels, so inf, NaN and extreme scales give exactly what they give there. Inside
// an accepted row, a value 2^24 times smaller than the row's largest (where a part underflows) moves the
// sum by less than fp32 rounding of the row's largest product.
//
// Weight tiles come from the packed rows per chunk of 32 values of k: TDPBF16PS wants k-pairs as rows
// and, in each, the pair of every output channel side by side, and a packed byte is exactly one such
// pair (low nibble the even k). A tile row is thus one byte of each of 16 channels, gathered by byte
// permutes and widened to two bf16 through a 32-entry word table (vpermw reads 5 index bits; entry i
// holds the value of code i & 15, so the low nibble needs no mask).
#pragma once

#include <cstdint>
#include <cstring>

#include "vitk/lowbit_amx.h"

#if VITK_LOWBIT_AMX && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define VITK_LOWBIT_AMX_BF16 1
#else
#define VITK_LOWBIT_AMX_BF16 0
#endif

namespace vitk {
namespace lowbit {
namespace amx {

constexpr int64_t kBf16Chunk = 32;          // values of k per tile step (64 bytes of bf16)
constexpr int64_t kBf16TileElems = 16 * 32;  // bf16 per tile
constexpr float kSplitMin = 0x1p-90f, kSplitMax = 0x1p126f;

#if VITK_LOWBIT_AMX_BF16
inline bool available_bf16() {
  static const bool ok = [] {
    if (!available()) return false;
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 22) & 1);  // AMX-BF16
  }();
  return ok;
}

inline __m512 bf16_to_f32(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

// Row x (K fp32 values) as P bf16 parts, zero-padded to Kp (a multiple of 32): value k of part p at
// dst + p * part_elems + (k / 32) * chunk_elems + k % 32, so that the caller chooses the layout (tile-
// major: each chunk of 16 rows one contiguous 1 KiB tile). With gsum, also the fp32 sum of each group
// of G values. Returns false when the row must take the fp32 path (see the header); dst is then partly
// written and must not be used.
template <int P>
inline bool split_row(const float* x, int64_t K, int64_t Kp, uint16_t* dst, int64_t part_elems, int64_t chunk_elems,
                      int64_t G, float* gsum) {
  __m512 amax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  const __m512 limit = _mm512_set1_ps(kSplitMax);
  for (int64_t k = 0; k < Kp; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : k < K ? __mmask16((1u << (K - k)) - 1) : __mmask16(0);
    __m512 r = _mm512_maskz_loadu_ps(m, x + k);
    const __m512 a = _mm512_abs_ps(r);
    bad |= _mm512_cmp_ps_mask(a, limit, _CMP_NLT_UQ);  // NaN, inf, >= 2^126
    amax = _mm512_max_ps(amax, a);
    uint16_t* at = dst + (k / kBf16Chunk) * chunk_elems + k % kBf16Chunk;
    for (int p = 0; p < P; ++p) {
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(r);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(at + p * part_elems), h);
      if (p + 1 < P) r = _mm512_sub_ps(r, bf16_to_f32(h));
    }
  }
  const float top = _mm512_reduce_max_ps(amax);
  if (bad || (top > 0.f && top < kSplitMin)) return false;
  if (gsum)
    for (int64_t g0 = 0; g0 < K; g0 += G) {
      __m512 s = _mm512_setzero_ps();
      const int64_t g1 = g0 + G < K ? g0 + G : K;
      for (int64_t k = g0; k < g1; k += 16) {
        const __mmask16 m = g1 - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (g1 - k)) - 1);
        s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(m, x + k));
      }
      gsum[g0 / G] = _mm512_reduce_add_ps(s);
    }
  return true;
}

// The word table of 16 code values (as fp32, each exact in bf16), repeated twice (see the header).
inline __m512i code_word_table(const float* values) {
  alignas(64) uint16_t t[32];
  for (int i = 0; i < 32; ++i) {
    uint32_t bits;
    std::memcpy(&bits, values + (i & 15), 4);
    t[i] = static_cast<uint16_t>(bits >> 16);
  }
  return _mm512_load_si512(t);
}

// The weight tile of chunk c for 16 output channels: rows[i] is channel i's packed row (16 bytes per
// chunk; `bytes` of them valid in this chunk, the rest read as code 0, whose value is 0). Tile row r,
// dword i: the two bf16 values of channel i's byte 16c + r.
inline void code_tile_bf16(const uint8_t* const* rows, int64_t c, int bytes, __m512i table, uint16_t* tile) {
  const __mmask16 valid = bytes >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << bytes) - 1);
  __m512i z[4];
  for (int q = 0; q < 4; ++q) {
    z[q] = _mm512_castsi128_si512(_mm_maskz_loadu_epi8(valid, rows[4 * q] + 16 * c));
    z[q] = _mm512_inserti32x4(z[q], _mm_maskz_loadu_epi8(valid, rows[4 * q + 1] + 16 * c), 1);
    z[q] = _mm512_inserti32x4(z[q], _mm_maskz_loadu_epi8(valid, rows[4 * q + 2] + 16 * c), 2);
    z[q] = _mm512_inserti32x4(z[q], _mm_maskz_loadu_epi8(valid, rows[4 * q + 3] + 16 * c), 3);
  }
  // Byte 4i and 4i + 2 of a row take channel (i mod 8)'s byte r from the pair (z0, z1) or (z2, z3),
  // which holds it at 16 (i mod 8) + r; bytes 4i + 1 and 4i + 3 stay zero.
  alignas(64) uint8_t base[64];
  for (int i = 0; i < 64; ++i) base[i] = static_cast<uint8_t>(16 * ((i / 4) % 8));
  const __m512i idx0 = _mm512_load_si512(base);
  const __mmask64 low = 0x0000000055555555ull, high = 0x5555555500000000ull;
  const __m512i shifts = _mm512_set1_epi32(4 << 16);  // even words keep the byte, odd words its high nibble
  for (int r = 0; r < 16; ++r) {
    const __m512i idx = _mm512_add_epi8(idx0, _mm512_set1_epi8(static_cast<char>(r)));
    const __m512i b = _mm512_or_si512(_mm512_maskz_permutex2var_epi8(low, z[0], idx, z[1]),
                                      _mm512_maskz_permutex2var_epi8(high, z[2], idx, z[3]));
    const __m512i w = _mm512_permutexvar_epi16(_mm512_srlv_epi16(b, shifts), table);
    _mm512_storeu_si512(reinterpret_cast<void*>(tile + r * 32), w);
  }
}

// Tiles 0..3 = 16 (R = 1) or 32 (R = 2) rows of x's P parts (tile-major: the tile of part p, chunk c
// of rows 0-15 at a0 + p * part_elems + c * kBf16TileElems, of rows 16-31 the same from a1) times the
// two weight tiles of each chunk in [c0, c1) (panel: two tiles per chunk). R = 2: tiles 0, 1 hold rows 0-15 against channel blocks 0, 1; tiles 2, 3 rows
// 16-31. R = 1: tiles 0, 1 hold the sums of parts 0 and 2 and tiles 2, 3 those of part 1, to be added
// (four chains of accumulation instead of two: a tile product waits for the previous one into its tile).
// between() runs after each chunk's products are issued: vector work placed there runs while they
// execute (work after a long run of tile products waits for them to retire, the reorder window being full).
template <int R, int P, class Between>
inline void bf16_products(const uint16_t* a0, const uint16_t* a1, int64_t part_elems, const uint16_t* panel,
                          int64_t c0, int64_t c1, Between&& between) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t c = c0; c < c1; ++c) {
    _tile_loadd(6, panel + 2 * c * kBf16TileElems, 64);
    _tile_loadd(7, panel + (2 * c + 1) * kBf16TileElems, 64);
    const uint16_t* ac = a0 + c * kBf16TileElems;
    if constexpr (R == 2) {
      const uint16_t* ac1 = a1 + c * kBf16TileElems;
#pragma GCC unroll 3
      for (int p = 0; p < P; ++p) {
        _tile_loadd(4, ac + p * part_elems, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, ac1 + p * part_elems, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    } else {
      _tile_loadd(4, ac, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (P >= 2) {
        _tile_loadd(5, ac + part_elems, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      if constexpr (P >= 3) {
        _tile_loadd(4, ac + 2 * part_elems, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
      }
    }
    between();
  }
}

// sums[32][32] (row-major fp32) = tiles 0..3 (R = 1: rows 16-31 hold the second set of sums).
inline void store_products(float* sums) {
  _tile_stored(0, sums, 128);
  _tile_stored(1, sums + 16, 128);
  _tile_stored(2, sums + 16 * 32, 128);
  _tile_stored(3, sums + 16 * 32 + 16, 128);
}
#else
inline bool available_bf16() { return false; }
#endif

}  // namespace amx
}  // namespace lowbit
}  // namespace vitk
