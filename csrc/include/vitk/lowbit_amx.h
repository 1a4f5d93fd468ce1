// The integer GEMM on AMX tiles (Sapphire Rapids and later Xeons), torch-free.
//
// One AMX TDPBUSD multiplies a 16 x 64-byte tile of unsigned activations by a 16-row tile of signed
// weights in VNNI order into 16 x 16 int32 sums: 16 k-quads of one 16-channel block of the blocked
// layout (vitk/lowbit_kernels.h) are exactly such a weight tile, 1 KiB at a 64-byte stride, so the
// weights the modules keep load as they are. A step of 2 x 2 tiles (32 rows x 32 channels; tiles 0-3
// the sums, 4-5 the rows, 6-7 the weights) does 4 TDPBUSD per 64 bytes of k: 8x the int8 products per
// instruction of a zmm vpdpbusd. int4 codes as the unsigned weight go through TDPBSUD instead.
//
// K that is not a multiple of 64: the last chunk's weight tile would run into the correction row and
// the next block, so the caller gives it as a zero-padded copy (tail_chunk); the activation tile reads
// whole 64-byte chunks, its bytes past the row's end (the next row's, or slack the caller allocates)
// meeting those zero weight rows, which keeps every sum exact.
//
// Linux hands out the tile registers per process on request (arch_prctl ARCH_REQ_XCOMP_PERM); without
// that grant, or with VITK_LOWBIT_AMX=0 in the environment, available() is false and the callers keep
// the vpdpbusd kernel. Each thread loads the tile configuration before its first tile and releases the
// tiles when done, so a context switch does not save 8 KiB of tile state afterwards.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define VITK_LOWBIT_AMX 1
#else
#define VITK_LOWBIT_AMX 0
#endif

namespace vitk {
namespace lowbit {
namespace amx {

constexpr int kTileRows = 16;      // rows of x per activation tile, k-quads per weight tile
constexpr int kChunkBytes = 64;    // bytes of k per tile step
constexpr int kStepRows = 32;      // rows per 2 x 2 step
constexpr int kStepBlocks = 2;     // 16-channel blocks per 2 x 2 step
constexpr int64_t kTailBytes = kTileRows * kChunkBytes;  // one zero-padded weight tile
constexpr int kStepInts = kStepRows * kStepBlocks * 16;   // the int32 sums of one 2 x 2 step

#if VITK_LOWBIT_AMX
inline bool os_grants_tiles() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 24) & 1) || !((d >> 25) & 1)) return false;  // AMX-TILE, AMX-INT8
  constexpr long kReqPerm = 0x1023, kXtileData = 18;
  return syscall(SYS_arch_prctl, kReqPerm, kXtileData) == 0;
}

inline bool available() {
  static const bool ok = [] {
    const char* env = std::getenv("VITK_LOWBIT_AMX");
    if (env && std::strcmp(env, "0") == 0) return false;
    return os_grants_tiles();
  }();
  return ok;
}

// Holds this thread's tile configuration for its lifetime: every tile 64 bytes wide, tiles 6 and 7 (the
// weight side) 16 rows and tiles 0-5 (sums, activations) `rows` rows: a tile product costs a cycle per
// activation row, so a call of a few rows configures only those.
class TileScope {
 public:
  explicit TileScope(int rows = kTileRows) {
    struct alignas(64) {
      uint8_t palette, start_row, reserved[14];
      uint16_t colsb[16];
      uint8_t rows[16];
    } cfg;
    std::memset(&cfg, 0, sizeof(cfg));
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = kChunkBytes;
      cfg.rows[t] = static_cast<uint8_t>(t < 6 ? rows : kTileRows);
    }
    _tile_loadconfig(&cfg);
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// The zero-padded copy of a block's last, partial chunk of k-quads (KQ % 16 of them), or nothing to do
// when KQ is a multiple of 16.
inline void tail_chunk(const int8_t* block, int64_t KQ, int8_t* tail) {
  const int64_t full = KQ / kTileRows, left = KQ - full * kTileRows;
  std::memset(tail, 0, kTailBytes);
  std::memcpy(tail, block + full * kTailBytes, left * kChunkBytes);
}

// Tiles 0-3 += 32 rows of a (row stride lda) times blocks w0 and w1 over their chunks [c0, c1) of 16
// k-quads, starting from resume (sums stored by store_sums) or from zero. Chunk `full` = KQ / 16, when
// it exists, is partial and comes from the zero-padded copies tail0 and tail1. The sums stay in the
// tiles until store_sums, so the caller can run the previous step's epilogue while these execute.
template <bool weight_unsigned>
inline void accumulate_2x2(const uint8_t* a, int64_t lda, const int8_t* w0, const int8_t* w1, const int8_t* tail0,
                           const int8_t* tail1, int64_t c0, int64_t c1, int64_t full, const int32_t* resume) {
  constexpr int64_t ld = kStepBlocks * 16 * sizeof(int32_t);
  if (resume) {
    _tile_loadd(0, resume, ld);
    _tile_loadd(1, resume + 16, ld);
    _tile_loadd(2, resume + 16 * 32, ld);
    _tile_loadd(3, resume + 16 * 32 + 16, ld);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  const uint8_t* a1 = a + kTileRows * lda;
  for (int64_t c = c0; c < c1; ++c) {
    const bool whole = c < full;
    // Each product is issued as soon as its two tiles are loaded.
    _tile_loadd(4, a + c * kChunkBytes, lda);
    _tile_loadd(6, whole ? w0 + c * kTailBytes : tail0, kChunkBytes);
    if constexpr (weight_unsigned) _tile_dpbsud(0, 4, 6); else _tile_dpbusd(0, 4, 6);
    _tile_loadd(7, whole ? w1 + c * kTailBytes : tail1, kChunkBytes);
    if constexpr (weight_unsigned) _tile_dpbsud(1, 4, 7); else _tile_dpbusd(1, 4, 7);
    _tile_loadd(5, a1 + c * kChunkBytes, lda);
    if constexpr (weight_unsigned) _tile_dpbsud(2, 5, 6); else _tile_dpbusd(2, 5, 6);
    if constexpr (weight_unsigned) _tile_dpbsud(3, 5, 7); else _tile_dpbusd(3, 5, 7);
  }
}

// sums[32][32] (row-major int32) = tiles 0-3.
inline void store_sums(int32_t* sums) {
  constexpr int64_t ld = kStepBlocks * 16 * sizeof(int32_t);
  _tile_stored(0, sums, ld);
  _tile_stored(1, sums + 16, ld);
  _tile_stored(2, sums + 16 * 32, ld);
  _tile_stored(3, sums + 16 * 32 + 16, ld);
}
// For int4_int8_linear on a few rows the roles swap: the weights are the unsigned activation-side tile
// (16 output channels x 64 values of k, unpacked from their rows of 4-bit codes on the fly) and x the
// signed weight-side tile, so each 4-bit row is read once and never decoded into the blocked layout.
//
// x's rows (at most 16, signed codes, row stride lda, each padded with zeros to a multiple of 4 bytes)
// as such tiles: chunk c, k-quad r holds x[m][64c + 4r + i] at byte 4m + i; rows past M and k past K 0.
inline void rows_as_weight_tiles(const uint8_t* a, int64_t lda, int M, int64_t K, uint8_t* tiles) {
  const int64_t KQ = (K + 3) / 4, chunks = (K + kChunkBytes - 1) / kChunkBytes;
  std::memset(tiles, 0, chunks * kTailBytes);
  for (int m = 0; m < M; ++m)
    for (int64_t q = 0; q < KQ; ++q) std::memcpy(tiles + q * kChunkBytes + 4 * m, a + m * lda + 4 * q, 4);
}

// 16 rows of 4-bit codes (rows[j] pointing at the chunk's first packed byte, `bytes` <= 32 of them
// valid) as a 16 x 64 tile of the unsigned codes (the nibble xor 8: the signed code + 8), low nibble
// first. k past the valid bytes becomes 8, which meets the zero x there.
inline void unpack_code_tile(const uint8_t* const* rows, int bytes, uint8_t* tile) {
  const __mmask32 mask = bytes >= 32 ? ~__mmask32(0) : (__mmask32(1) << bytes) - 1;
  const __m512i low = _mm512_set1_epi16(0x000F), high = _mm512_set1_epi16(0x0F00), eight = _mm512_set1_epi8(8);
  for (int j = 0; j < kTileRows; ++j) {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(mask, rows[j]));
    const __m512i v = _mm512_or_si512(_mm512_and_si512(w, low), _mm512_and_si512(_mm512_slli_epi16(w, 4), high));
    _mm512_store_si512(reinterpret_cast<void*>(tile + j * kChunkBytes), _mm512_xor_si512(v, eight));
  }
}
// A 16 x 16 matrix of dwords (r[j] = row j) transposed in registers: for h = 8, 4, 2, 1 the off-diagonal
// h x h blocks of every 2h x 2h block swap (each stage swaps bit h of a row and column index where they
// differ, so after all four every (row, column) has become (column, row)).
inline void transpose_dwords(__m512i* r) {
  for (int h = 8; h >= 1; h /= 2) {
    alignas(64) int32_t lo[16], hi[16];
    for (int l = 0; l < 16; ++l) {
      lo[l] = (l & h) ? 16 + l - h : l;
      hi[l] = (l & h) ? 16 + l : l + h;
    }
    const __m512i ilo = _mm512_load_si512(lo), ihi = _mm512_load_si512(hi);
    for (int i = 0; i < 16; ++i) {
      if (i & h) continue;
      const __m512i a = r[i], b = r[i + h];
      r[i] = _mm512_permutex2var_epi32(a, ilo, b);
      r[i + h] = _mm512_permutex2var_epi32(a, ihi, b);
    }
  }
}

// lowbit::block_int4_codes in registers: the blocked unsigned operand of rows [n0, n0 + 16) of 4-bit codes
// (row_bytes = K / 2 per row), a 16-row x 64-k tile at a time unpacked (unpack_code_tile) and transposed
// into 16 k-quad rows. Rows past N repeat row N - 1 and k past K hold 8 (the code of zero): both meet
// zeros (rows that are never stored, x's zero pad), so the sums are those of the zero-filled blocks.
inline void block_int4_codes_fast(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t N, int64_t K, uint8_t* blk) {
  const int64_t KQ = (K + 3) / 4, chunks = (K + kChunkBytes - 1) / kChunkBytes;
  const uint8_t* rows[kTileRows];
  alignas(64) uint8_t tile[kTailBytes];
  for (int64_t c = 0; c < chunks; ++c) {
    for (int j = 0; j < kTileRows; ++j) rows[j] = w + std::min<int64_t>(n0 + j, N - 1) * row_bytes + c * 32;
    unpack_code_tile(rows, static_cast<int>(std::min<int64_t>(32, row_bytes - c * 32)), tile);
    __m512i r[kTileRows];
    for (int j = 0; j < kTileRows; ++j) r[j] = _mm512_load_si512(reinterpret_cast<const void*>(tile + j * kChunkBytes));
    transpose_dwords(r);
    const int64_t quads = std::min<int64_t>(kTileRows, KQ - c * kTileRows);
    for (int q = 0; q < quads; ++q)
      _mm512_storeu_si512(reinterpret_cast<void*>(blk + (c * kTileRows + q) * kChunkBytes), r[q]);
  }
  _mm512_storeu_si512(reinterpret_cast<void*>(blk + KQ * kChunkBytes), _mm512_set1_epi32(1));
}
#else
inline bool available() { return false; }
#endif

}  // namespace amx
}  // namespace lowbit
}  // namespace vitk
