// Integer linear layers: quantize_per_token, int8_linear, dynamic_int8_linear, int4_int8_linear.
//
// Every call first packs x: each row quantized (or, for int8_linear, its codes copied) into a
// contiguous byte row of ceil(K/4) * 4 bytes in the operand form the GEMM wants, with its scale and
// its zero-point correction. The GEMM (vitk/lowbit_kernels.h) then runs over tasks of 96 rows x 64
// output channels, in parallel over both, so a single token still spreads over every core (on AVX2
// without VNNI, rows and each task's weight blocks are first widened to int16; see int8_tile). On a CPU
// with AMX tiles, amx_gemm runs instead (vitk/lowbit_amx.h). Weights come blocked for VNNI:
// int8_linear / dynamic_int8_linear take the blocked layout the modules keep (vitkernels.lowbit.block_int8,
// packed once), or block a plain [N, K] w_q per call; int4_int8_linear decodes the 4-bit codes into
// blocks (per task's 64 channels, or all at once for the AMX kernel), or for at most 16 rows reads them
// in place (int4_rows_gemm, amx_int4_rows).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "common.h"
#include "vitk/lowbit.h"
#include "vitk/lowbit_amx.h"
#include "vitk/registration.h"

namespace vitk {
namespace cpu {
namespace {

using namespace lowbit_detail;
namespace lb = ::vitk::lowbit;

constexpr int64_t kTaskRows = 96;
constexpr int kMR = 6;   // rows per micro-tile
constexpr int kNR = 4;   // 16-channel blocks per micro-tile (a panel of 64 output channels)
constexpr int kRowDotRows = 8;    // rows per pass of the small-M int4 kernel
constexpr int64_t kSmallM = 16;   // int4_int8_linear up to this many rows: weights decoded in registers
// ... on AMX tiles above this many rows; below, the vpdpbusd row kernel was faster (1 row: 0.03 against
// 0.06 ms at 768 -> 3072; 4 rows: even).
constexpr int64_t kAmxInt4MinRows = 4;
constexpr int64_t kAmxRowBlockBytes = 1 << 20;  // packed x per AMX task: what one core's L2 holds
constexpr int64_t kAmxSliceChunks = 16;          // k per AMX slice: 1 KiB, a pair of blocks' 32 KiB in L1

// x packed for the GEMM: one byte row per token, plus its correction factor and scale. The rows are
// followed by zero slack: AMX tiles read 32 rows and whole 64-byte chunks of k at a time. Only the slack
// and each row's pad past K are zeroed here (zero-filling all of it cost as much as writing the rows):
// whoever packs a row writes its first K bytes.
struct PackedX {
  int64_t M = 0, KP = 0;
  std::unique_ptr<uint8_t[]> bytes;
  uint8_t* a = nullptr;
  std::vector<int32_t> rowc;
  std::vector<float> scale;
  void resize(int64_t m, int64_t K) {
    M = m;
    KP = lb::ceil_div(K, 4) * 4;
    const int64_t rows = M * KP, total = (M + lb::amx::kStepRows) * KP + lb::amx::kChunkBytes;
    bytes.reset(new uint8_t[total]);
    a = bytes.get();
    std::memset(a + rows, 0, total - rows);
    if (KP > K)
      for (int64_t m = 0; m < M; ++m) std::memset(a + m * KP + K, 0, KP - K);
    rowc.assign(M, 0);
    scale.assign(M, 0.f);
  }
};

// int8 codes to the biased uint8 operand in place, 8 bytes at a time (the byte loop was not vectorized,
// and cost int8_linear 5x its GEMM at K = 3072).
void flip_signs(uint8_t* a, int64_t K) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    uint64_t v;
    std::memcpy(&v, a + k, 8);
    v ^= 0x8080808080808080ull;
    std::memcpy(a + k, &v, 8);
  }
  for (; k < K; ++k) a[k] ^= 0x80;
}

enum class XForm { kSymmetric, kAsymmetric, kSigned };  // u8 = q + 128 | u8 codes | s8 (int4 weights)

// Quantizes every row of x straight into p's operand form (the codes of quantize_per_token, xor 0x80
// for the symmetric uint8 operand), with each row's scale and zero-point correction.
void quantize_rows(const at::Tensor& x, bool symmetric, XForm form, PackedX& p) {
  const int64_t K = x.size(-1);
  const std::vector<int64_t> off = row_offsets(x);
  p.resize(static_cast<int64_t>(off.size()), K);
  const bool fp32 = x.scalar_type() == at::kFloat;
  at::parallel_for(0, p.M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> row(fp32 ? 0 : K);
    for (int64_t m = m0; m < m1; ++m) {
      const float* r = fp32 ? x.const_data_ptr<float>() + off[m] : row.data();
      if (!fp32) load_row(x, off[m], K, row.data());
      uint8_t* a = p.a + m * p.KP;
      const lb::RowQuant rq = lb::quantize_row(r, K, symmetric, a, form == XForm::kSymmetric ? 0x80 : 0);
      int32_t rowc = form == XForm::kSymmetric ? 128 : rq.zero_point;
      if (form == XForm::kSigned) rowc = 8 * lb::signed_byte_sum(a, K);
      p.rowc[m] = rowc;
      p.scale[m] = rq.scale;
    }
  });
}

// Weights for the GEMM: all blocks ready in memory, or 4-bit codes decoded per panel.
struct IntWeights {
  const int8_t* blocked = nullptr;   // [NB][block_bytes]
  const uint8_t* codes = nullptr;    // [N][K/2] (int4_int8_linear)
};

// The blocks b0 .. b0 + nr - 1 of the weights: in memory already, or 4-bit codes decoded into `decoded`
// (when `decode`: the panel changed).
const int8_t* panel_blocks(const IntWeights& w, int64_t b0, int nr, int64_t N, int64_t K, bool decode,
                           std::vector<int8_t>& decoded) {
  const int64_t bb = lb::block_bytes(K);
  if (!w.codes) return w.blocked + b0 * bb;
  if (decode)
    for (int j = 0; j < nr; ++j)
      lb::block_int4_codes(w.codes, K / 2, (b0 + j) * lb::kBlockN, N, K,
                           reinterpret_cast<uint8_t*>(decoded.data() + j * bb));
  return decoded.data();
}

template <bool U>
void run_tile(int mr, int nr, const lb::IntRows& rows, const int8_t* w, int64_t bb, int64_t KQ, int64_t n0, int64_t N,
              const lb::Epilogue& ep) {
  with_tile<kMR, kNR>(mr, nr, [&]<int MR, int NR>() { lb::int8_tile<MR, NR, U>(rows, w, bb, KQ, n0, N, ep); });
}

#if VITK_LOWBIT_AMX
// The GEMM on AMX tiles (vitk/lowbit_amx.h): each 32-row step of a task takes the panel's blocks two at
// a time, and its int32 sums go through the vpdpbusd kernel's epilogue (finish_sums).
void amx_gemm(const PackedX& p, const IntWeights& w, int64_t N, int64_t K, const lb::Epilogue& ep, at::Tensor& out) {
  namespace amx = lb::amx;
  const OutRows dst(out);
  const int64_t M = p.M, KQ = lb::ceil_div(K, 4), bb = lb::block_bytes(K);
  const int64_t NB = lb::ceil_div(N, lb::kBlockN);
  const bool unsigned_w = w.codes != nullptr, ragged_k = KQ % amx::kTileRows != 0;
  const int64_t chunks = lb::ceil_div(KQ, amx::kTileRows), full = KQ / amx::kTileRows;
  // Tasks are (block of rows, panel), row-block-major, each block of packed x at most ~1 MiB: a thread
  // sweeps the panels with its rows held in L2 and reads each panel's weights once per block. (Panel-
  // major tasks, as the vpdpbusd kernel runs, streamed all of x from L3 for every panel: at K = 3072 the
  // tiles then idled three quarters of the time.)
  const int64_t panels = lb::ceil_div(NB, kNR);
  const int64_t max_rows = std::max<int64_t>(amx::kStepRows, kAmxRowBlockBytes / p.KP / amx::kStepRows * amx::kStepRows);
  const int64_t row_blocks = lb::ceil_div(M, max_rows);
  const int64_t block_rows = lb::ceil_div(lb::ceil_div(M, row_blocks), amx::kStepRows) * amx::kStepRows;
  // 4-bit codes are decoded into blocks once, up front (N * K bytes), not once per row block.
  // block_int4_codes_fast writes every byte of its blocks, so the buffer is not zero-filled first.
  std::unique_ptr<int8_t[]> decoded(unsigned_w ? new int8_t[NB * bb] : nullptr);
  if (unsigned_w)
    at::parallel_for(0, NB, 4, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        amx::block_int4_codes_fast(w.codes, K / 2, b * lb::kBlockN, N, K, reinterpret_cast<uint8_t*>(decoded.get() + b * bb));
    });
  const int8_t* blocks = unsigned_w ? decoded.get() : w.blocked;
  const bool stream = stream_rows(dst, M);
  at::parallel_for(0, row_blocks * panels, 1, [&](int64_t t0, int64_t t1) {
    amx::TileScope scope;
    std::vector<int8_t> tails(ragged_k ? kNR * amx::kTailBytes : 0);
    alignas(64) int32_t sums[2][amx::kStepInts];
    std::vector<int32_t> spill(chunks > kAmxSliceChunks ? block_rows / amx::kStepRows * amx::kStepInts : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t panel = t % panels, m0 = t / panels * block_rows, m1 = std::min(M, m0 + block_rows);
      if (m0 >= m1) continue;
      const int64_t b0 = panel * kNR;
      const int nr = static_cast<int>(std::min<int64_t>(kNR, NB - b0));
      const int8_t* wb = blocks + b0 * bb;
      if (ragged_k)
        for (int j = 0; j < nr; ++j) amx::tail_chunk(wb + j * bb, KQ, tails.data() + j * amx::kTailBytes);
      const int8_t* tail = tails.data();  // unused unless ragged_k
      const int32_t* rowc = p.rowc.data();
      const float* rscale = p.scale.data();
      const int64_t n0 = b0 * lb::kBlockN;
      // The epilogue of one step (its sums in buffer `buf`): rows [m, m + rows) x blocks j0..j1.
      auto epilogue = [&](const int32_t* buf, int64_t m, int rows, int j0, int j1) {
        for (int j = j0; j <= j1; ++j) {
          const __m512i colc = _mm512_loadu_si512(reinterpret_cast<const void*>(wb + j * bb + KQ * lb::kQuadBytes));
          const int64_t nj = n0 + j * lb::kBlockN;
          const int valid = static_cast<int>(std::min<int64_t>(lb::kBlockN, N - nj));
          for (int i = 0; i < rows; ++i) {
            const __m512i s = _mm512_load_si512(buf + i * amx::kStepBlocks * lb::kBlockN + (j - j0) * lb::kBlockN);
            const lb::v16f v = lb::finish_sums(s, rowc[m + i], colc, rscale[m + i], ep, nj, valid);
            store16(dst, stream, m + i, nj, reinterpret_cast<const float*>(&v), valid);
          }
        }
      };
      // Software-pipelined: step s's products run on the tiles while step s-1's epilogue runs on the
      // vector units, reading sums stored a step earlier (a vector load right after a tile store waits
      // for it: done in line, the epilogue took as long as the products).
      struct Pending {
        int64_t m = -1;
        int rows = 0, j0 = 0, j1 = 0;
      } pending;
      int cur = 0;
      // Pairs of blocks outermost and k in slices of kAmxSliceChunks: a pair's slice of weights stays in
      // L1 while the task's rows stream past it (the partial sums of unfinished slices wait in `spill`).
      for (int j0 = 0; j0 < nr; j0 += amx::kStepBlocks) {
        // An odd last block pairs with itself; its second copy of sums is not read.
        const int j1 = std::min(j0 + 1, nr - 1);
        const int8_t *w0 = wb + j0 * bb, *w1 = wb + j1 * bb;
        const int8_t *t0 = tail + j0 * amx::kTailBytes, *t1 = tail + j1 * amx::kTailBytes;
        for (int64_t c0 = 0; c0 < chunks; c0 += kAmxSliceChunks) {
          const int64_t c1 = std::min(chunks, c0 + kAmxSliceChunks);
          for (int64_t m = m0, s = 0; m < m1; m += amx::kStepRows, ++s) {
            const uint8_t* a = p.a + m * p.KP;
            int32_t* part = spill.data() + s * amx::kStepInts;
            const int32_t* resume = c0 > 0 ? part : nullptr;
            if (unsigned_w)
              amx::accumulate_2x2<true>(a, p.KP, w0, w1, t0, t1, c0, c1, full, resume);
            else
              amx::accumulate_2x2<false>(a, p.KP, w0, w1, t0, t1, c0, c1, full, resume);
            if (c1 < chunks) {
              amx::store_sums(part);
              continue;
            }
            if (pending.m >= 0) epilogue(sums[cur ^ 1], pending.m, pending.rows, pending.j0, pending.j1);
            amx::store_sums(sums[cur]);
            pending = {m, static_cast<int>(std::min<int64_t>(amx::kStepRows, m1 - m)), j0, j1};
            cur ^= 1;
          }
        }
      }
      if (pending.m >= 0) epilogue(sums[cur ^ 1], pending.m, pending.rows, pending.j0, pending.j1);
    }
    _mm_sfence();
  });
}

// int4_int8_linear for 5 to 16 rows on AMX tiles (lb::amx::unpack_code_tile): tasks of 64 output
// channels, four 16 x 16 sums (channels x rows) per task, each chunk's code tiles unpacked while the
// previous chunk's products run; the sums are transposed back to rows in the epilogue.
void amx_int4_rows(const PackedX& p, const uint8_t* codes, int64_t N, int64_t K, const lb::Epilogue& ep,
                   at::Tensor& out) {
  namespace amx = lb::amx;
  constexpr int kGroups = 4;  // 16-channel groups per task: sum tiles 0-3
  const OutRows dst(out);
  const int M = static_cast<int>(p.M);
  const int64_t chunks = lb::ceil_div(K, amx::kChunkBytes), row_bytes = K / 2;
  std::vector<uint8_t> xt(chunks * amx::kTailBytes);
  amx::rows_as_weight_tiles(p.a, p.KP, M, K, xt.data());
  const int64_t groups = lb::ceil_div(N, lb::kBlockN);
  at::parallel_for(0, lb::ceil_div(groups, kGroups), 1, [&](int64_t t0, int64_t t1) {
    amx::TileScope scope;
    alignas(64) uint8_t codes_tile[2][kGroups][amx::kTailBytes];
    alignas(64) int32_t sums[kGroups][lb::kBlockN * lb::kBlockN];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g0 = t * kGroups;
      const int ng = static_cast<int>(std::min<int64_t>(kGroups, groups - g0));
      const uint8_t* rows[kGroups][amx::kTileRows];
      for (int g = 0; g < kGroups; ++g)
        for (int j = 0; j < amx::kTileRows; ++j)  // channels past N (and groups past ng) repeat the last one
          rows[g][j] = codes + std::min<int64_t>((g0 + g) * lb::kBlockN + j, N - 1) * row_bytes;
      auto unpack = [&](int64_t c, int slot) {
        const int bytes = static_cast<int>(std::min<int64_t>(32, row_bytes - c * 32));
        for (int g = 0; g < kGroups; ++g) {
          const uint8_t* at_c[amx::kTileRows];
          for (int j = 0; j < amx::kTileRows; ++j) at_c[j] = rows[g][j] + c * 32;
          amx::unpack_code_tile(at_c, bytes, codes_tile[slot][g]);
        }
      };
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      unpack(0, 0);
      for (int64_t c = 0; c < chunks; ++c) {
        const int slot = static_cast<int>(c & 1);
        if (c + 1 < chunks) unpack(c + 1, slot ^ 1);
        _tile_loadd(7, xt.data() + c * amx::kTailBytes, amx::kChunkBytes);
        _tile_loadd(4, codes_tile[slot][0], amx::kChunkBytes);
        _tile_dpbusd(0, 4, 7);
        _tile_loadd(5, codes_tile[slot][1], amx::kChunkBytes);
        _tile_dpbusd(1, 5, 7);
        _tile_loadd(6, codes_tile[slot][2], amx::kChunkBytes);
        _tile_dpbusd(2, 6, 7);
        _tile_loadd(4, codes_tile[slot][3], amx::kChunkBytes);
        _tile_dpbusd(3, 4, 7);
      }
      _tile_stored(0, sums[0], amx::kChunkBytes);
      _tile_stored(1, sums[1], amx::kChunkBytes);
      _tile_stored(2, sums[2], amx::kChunkBytes);
      _tile_stored(3, sums[3], amx::kChunkBytes);
      for (int g = 0; g < ng; ++g) {
        const int64_t n0 = (g0 + g) * lb::kBlockN;
        const int valid = static_cast<int>(std::min<int64_t>(lb::kBlockN, N - n0));
        const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                  _mm512_set1_epi32(lb::kBlockN));
        for (int m = 0; m < M; ++m) {
          // Row m's 16 channel sums are column m of the channels x rows tile.
          const __m512i s = _mm512_i32gather_epi32(_mm512_add_epi32(column, _mm512_set1_epi32(m)), sums[g], 4);
          const lb::v16f v = lb::finish_sums(s, p.rowc[m], _mm512_set1_epi32(1), p.scale[m], ep, n0, valid);
          store(dst, m, n0, reinterpret_cast<const float*>(&v), valid);
        }
      }
    }
  });
}
#endif

void int_gemm(const PackedX& p, const IntWeights& w, int64_t N, int64_t K, const lb::Epilogue& ep, at::Tensor& out) {
#if VITK_LOWBIT_AMX
  if (lb::amx::available()) {
    amx_gemm(p, w, N, K, ep, out);
    return;
  }
#endif
  const OutRows dst(out);
  const int64_t M = p.M, KQ = lb::ceil_div(K, 4), bb = lb::block_bytes(K);
  const int64_t NB = lb::ceil_div(N, lb::kBlockN);
  const bool unsigned_w = w.codes != nullptr;
#if VITK_LOWBIT_WIDE
  // The AVX2 kernel's int16 operands: every packed row widened once, each panel's blocks per task.
  const int64_t wbb = lb::wide_block_bytes(K);
  std::vector<int16_t> a16(M * p.KP);
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) lb::widen_row(p.a + m * p.KP, p.KP, unsigned_w, a16.data() + m * p.KP);
  });
#else
  const int64_t wbb = 0;
#endif
  for_each_panel_task(lb::ceil_div(NB, kNR), M, kTaskRows, [&]() {
    return [&, decoded = std::vector<int8_t>(unsigned_w ? kNR * bb : 0),
            wide = std::vector<int16_t>(kNR * wbb / 2)](int64_t panel, int64_t m0, int64_t m1,
                                                        bool new_panel) mutable {
      alignas(64) float stage[kMR][kNR * lb::kBlockN];
      const int64_t b0 = panel * kNR;
      const int nr = static_cast<int>(std::min<int64_t>(kNR, NB - b0));
      const int8_t* wb = panel_blocks(w, b0, nr, N, K, new_panel, decoded);
      int64_t stride = bb;
#if VITK_LOWBIT_WIDE
      if (new_panel)
        for (int j = 0; j < nr; ++j) lb::widen_block(wb + j * bb, KQ, unsigned_w, wide.data() + j * wbb / 2);
      wb = reinterpret_cast<const int8_t*>(wide.data());
      stride = wbb;
#endif
      const int64_t n0 = b0 * lb::kBlockN, ncols = std::min<int64_t>(nr * lb::kBlockN, N - n0);
      // fp32 outputs of whole blocks go from the tile's registers straight to the output rows; the
      // staging copy was a tenth of a Swin-T K = 96 layer's time.
      const bool in_place = dst.type == at::kFloat && ncols == nr * lb::kBlockN;
      for (int64_t m = m0; m < m1; m += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
        lb::IntRows rows;
        for (int i = 0; i < mr; ++i) {
          rows.a[i] = p.a + (m + i) * p.KP;
#if VITK_LOWBIT_WIDE
          rows.a16[i] = a16.data() + (m + i) * p.KP;
#endif
          rows.rowc[i] = p.rowc[m + i];
          rows.scale[i] = p.scale[m + i];
          rows.out[i] = in_place ? static_cast<float*>(dst.base) + (m + i) * dst.ld + n0 : stage[i];
        }
        if (unsigned_w)
          run_tile<true>(mr, nr, rows, wb, stride, KQ, n0, N, ep);
        else
          run_tile<false>(mr, nr, rows, wb, stride, KQ, n0, N, ep);
        if (!in_place)
          for (int i = 0; i < mr; ++i) store(dst, m + i, n0, stage[i], ncols);
      }
    };
  });
}

#if VITK_LOWBIT_VNNI || defined(__AVX2__)
// int4_int8_linear for a few rows: each packed weight row is read once and expanded in registers
// (lb::int4_row_dot, or int4_row_dot_avx2 with x deinterleaved by 32), over tasks of 16 output channels.
#if VITK_LOWBIT_VNNI
constexpr int64_t kInt4Lanes = 64;
#else
constexpr int64_t kInt4Lanes = 32;
#endif
void int4_rows_gemm(const PackedX& p, const uint8_t* codes, int64_t N, int64_t K, const lb::Epilogue& ep,
                    at::Tensor& out) {
  const OutRows dst(out);
  const int64_t M = p.M;
  std::vector<int8_t> xd(M * K);
  for (int64_t m = 0; m < M; ++m)
    lb::deinterleave(reinterpret_cast<const int8_t*>(p.a + m * p.KP), K, kInt4Lanes, xd.data() + m * K);
  at::parallel_for(0, lb::ceil_div(N, lb::kBlockN), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * lb::kBlockN;
      const int valid = static_cast<int>(std::min<int64_t>(lb::kBlockN, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += kRowDotRows) {
        const int mt = static_cast<int>(std::min<int64_t>(kRowDotRows, M - m0));
        const int8_t* xr[kRowDotRows];
        for (int i = 0; i < mt; ++i) xr[i] = xd.data() + (m0 + i) * K;
        int32_t acc[lb::kBlockN][kRowDotRows];
        for (int j = 0; j < valid; ++j)
          with_rows<1, kRowDotRows>(mt, [&]<int MT>() {
#if VITK_LOWBIT_VNNI
            lb::int4_row_dot<MT>(xr, codes + (n0 + j) * (K / 2), K, acc[j]);
#else
            lb::int4_row_dot_avx2<MT>(xr, codes + (n0 + j) * (K / 2), K, acc[j]);
#endif
          });
        for (int i = 0; i < mt; ++i) {
          lb::v16f v = lb::splat(0.f);
          for (int j = 0; j < valid; ++j) v[j] = static_cast<float>(acc[j][i] - p.rowc[m0 + i]);
          v = lb::finish(v, p.scale[m0 + i], ep, n0, valid);
          store(dst, m0 + i, n0, reinterpret_cast<const float*>(&v), valid);
        }
      }
    }
  });
}
#endif

// w_q as blocks: the blocked layout as given, or a plain [N, K] matrix blocked now into `storage`.
const int8_t* blocked_weights(const at::Tensor& w_q, int64_t N, int64_t K, const at::Tensor& x, at::Tensor& storage) {
  check_dtype_in(w_q, "w_q", {at::kChar});
  check_same_device(x, "x", w_q, "w_q");
  const int64_t NB = lb::ceil_div(N, lb::kBlockN), KQ = lb::ceil_div(K, 4);
  if (w_q.dim() == 3) {
    TORCH_CHECK_VALUE(w_q.size(0) == NB && w_q.size(1) == KQ + 1 && w_q.size(2) == lb::kQuadBytes,
                      "w_q: expected the blocked layout [ceil(N/16), ceil(K/4) + 1, 64] = [", NB, ", ", KQ + 1,
                      ", 64] for N=", N, " and K=", K, ", got ", w_q.sizes());
    storage = w_q.contiguous();
    return storage.const_data_ptr<int8_t>();
  }
  TORCH_CHECK_VALUE(w_q.dim() == 2, "w_q: expected shape [N, K] or the blocked layout [ceil(N/16), ceil(K/4) + 1, 64], "
                    "got ", w_q.sizes());
  TORCH_CHECK_VALUE(w_q.size(0) == N && w_q.size(1) == K, "w_q: expected shape [N, K] = [", N, ", ", K,
                    "] (N from w_scale, K from x), got ", w_q.sizes());
  const at::Tensor w = w_q.stride(1) == 1 ? w_q : w_q.contiguous();
  storage = at::empty({NB, KQ + 1, lb::kQuadBytes}, w_q.options());
  const int8_t* src = w.const_data_ptr<int8_t>();
  int8_t* dst = storage.mutable_data_ptr<int8_t>();
  const int64_t bb = lb::block_bytes(K), rs = w.stride(0);
  at::parallel_for(0, NB, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) lb::block_int8(src, rs, b * lb::kBlockN, N, K, dst + b * bb);
  });
  return dst;
}

int64_t check_w_scale(const at::Tensor& w_scale, const at::Tensor& x) {
  check_dtype_in(w_scale, "w_scale", {at::kFloat});
  check_same_device(x, "x", w_scale, "w_scale");
  TORCH_CHECK_VALUE(w_scale.dim() == 1, "w_scale: expected shape [N], got ", w_scale.sizes());
  return w_scale.size(0);
}

void check_k(int64_t K, const char* name) {
  TORCH_CHECK_VALUE(K <= lb::kMaxK, name, ": expected at most ", lb::kMaxK,
                    " columns K (the int32 accumulator's range), got K=", K);
}

at::Tensor run_int(const at::Tensor& x, const PackedX& p, const IntWeights& w, const at::Tensor& w_scale,
                   const std::optional<at::Tensor>& bias, Act act, at::ScalarType out_dtype) {
  const int64_t N = w_scale.size(0), K = x.size(-1);
  const at::Tensor ws = w_scale.contiguous();
  const at::Tensor b = channel_vector(bias, "bias", N, x);
  at::Tensor out = at::empty(out_shape(x, N), x.options().dtype(out_dtype));
  if (p.M == 0 || N == 0) return out;
  const lb::Epilogue ep{ws.const_data_ptr<float>(), ptr_or_null(b), act};
#if VITK_LOWBIT_VNNI || defined(__AVX2__)
  if (w.codes && p.M <= kSmallM) {
#if VITK_LOWBIT_AMX
    if (p.M > kAmxInt4MinRows && lb::amx::available()) {
      amx_int4_rows(p, w.codes, N, K, ep, out);
      return out;
    }
#endif
    int4_rows_gemm(p, w.codes, N, K, ep, out);
    return out;
  }
#endif
  int_gemm(p, w, N, K, ep, out);
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x_in, bool symmetric) {
  const at::Tensor x = rows_of(x_in, "x", {at::kFloat, at::kBFloat16, at::kHalf});
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(symmetric ? at::kChar : at::kByte));
  at::Tensor scale = at::empty(lead, x.options().dtype(at::kFloat));
  at::Tensor zp = at::empty(lead, x.options().dtype(at::kInt));
  const int64_t K = x.size(-1);
  const std::vector<int64_t> off = row_offsets(x);
  uint8_t* qp = static_cast<uint8_t*>(q.mutable_data_ptr());
  float* sp = scale.mutable_data_ptr<float>();
  int32_t* zpp = zp.mutable_data_ptr<int32_t>();
  at::parallel_for(0, static_cast<int64_t>(off.size()), 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> row(K);
    for (int64_t m = m0; m < m1; ++m) {
      load_row(x, off[m], K, row.data());
      const lb::RowQuant rq = lb::quantize_row(row.data(), K, symmetric, qp + m * K);
      sp[m] = rq.scale;
      zpp[m] = rq.zero_point;
    }
  });
  return {q, scale, zp};
}

at::Tensor int8_linear(const at::Tensor& x_q_in, const at::Tensor& x_scale, const std::optional<at::Tensor>& x_zero_point,
                       const at::Tensor& w_q, const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                       c10::string_view activation, std::optional<at::ScalarType> out_dtype) {
  const at::Tensor x_q = rows_of(x_q_in, "x_q", {at::kChar, at::kByte});
  const Act act = parse_activation(activation);
  const at::ScalarType od = out_dtype.value_or(at::kFloat);
  TORCH_CHECK_VALUE(od == at::kFloat || od == at::kBFloat16 || od == at::kHalf,
                    "out_dtype: expected one of Float, BFloat16, Half, got ", od);
  const auto lead = x_q.sizes().slice(0, x_q.dim() - 1);
  check_dtype_in(x_scale, "x_scale", {at::kFloat});
  check_same_device(x_q, "x_q", x_scale, "x_scale");
  TORCH_CHECK_VALUE(x_scale.sizes() == lead, "x_scale: expected shape x_q.shape[:-1] = ", lead, ", got ",
                    x_scale.sizes());
  const bool has_zp = x_zero_point.has_value() && x_zero_point->defined();
  if (has_zp) {
    check_dtype_in(*x_zero_point, "x_zero_point", {at::kInt});
    check_same_device(x_q, "x_q", *x_zero_point, "x_zero_point");
    TORCH_CHECK_VALUE(x_zero_point->sizes() == lead, "x_zero_point: expected shape x_q.shape[:-1] = ", lead,
                      ", got ", x_zero_point->sizes());
  }
  const int64_t K = x_q.size(-1);
  check_k(K, "x_q");
  const int64_t N = check_w_scale(w_scale, x_q);
  at::Tensor storage;
  IntWeights w;
  w.blocked = blocked_weights(w_q, N, K, x_q, storage);

  PackedX p;
  const std::vector<int64_t> off = row_offsets(x_q);
  p.resize(static_cast<int64_t>(off.size()), K);
  const bool is_signed = x_q.scalar_type() == at::kChar;
  const at::Tensor xs = x_scale.contiguous();
  const at::Tensor zp = has_zp ? x_zero_point->contiguous() : at::Tensor();
  const uint8_t* src = static_cast<const uint8_t*>(x_q.const_data_ptr());
  at::parallel_for(0, p.M, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      uint8_t* a = p.a + m * p.KP;
      const uint8_t* r = src + off[m];
      std::memcpy(a, r, K);
      if (is_signed) flip_signs(a, K);
      p.rowc[m] = (is_signed ? 128 : 0) + (has_zp ? zp.const_data_ptr<int32_t>()[m] : 0);
      p.scale[m] = xs.const_data_ptr<float>()[m];
    }
  });
  return run_int(x_q, p, w, w_scale, bias, act, od);
}

at::Tensor dynamic_int8_linear(const at::Tensor& x_in, const at::Tensor& w_q, const at::Tensor& w_scale,
                               const std::optional<at::Tensor>& bias, c10::string_view activation, bool symmetric) {
  const at::Tensor x = rows_of(x_in, "x", {at::kFloat, at::kBFloat16, at::kHalf});
  const Act act = parse_activation(activation);
  const int64_t K = x.size(-1);
  check_k(K, "x");
  const int64_t N = check_w_scale(w_scale, x);
  at::Tensor storage;
  IntWeights w;
  w.blocked = blocked_weights(w_q, N, K, x, storage);
  PackedX p;
  quantize_rows(x, symmetric, symmetric ? XForm::kSymmetric : XForm::kAsymmetric, p);
  return run_int(x, p, w, w_scale, bias, act, x.scalar_type());
}

at::Tensor int4_int8_linear(const at::Tensor& x_in, const at::Tensor& w_packed, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const Packed4Args args(x_in, w_packed, activation);
  const at::Tensor& x = args.x;
  const int64_t K = args.K;
  check_k(K, "x");
  const int64_t N = check_w_scale(w_scale, x);
  TORCH_CHECK_VALUE(w_packed.size(0) == N, "w_scale: expected shape [N] = [", w_packed.size(0),
                    "] (N from w_packed), got ", w_scale.sizes());
  const at::Tensor wp = w_packed.contiguous();
  IntWeights w;
  w.codes = wp.const_data_ptr<uint8_t>();
  PackedX p;
  quantize_rows(x, true, XForm::kSigned, p);
  return run_int(x, p, w, w_scale, bias, args.act, x.scalar_type());
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "quantize_per_token", vitk::Backend::kCpu, &vitk::cpu::quantize_per_token);
  VITK_IMPL(m, "int8_linear", vitk::Backend::kCpu, &vitk::cpu::int8_linear);
  VITK_IMPL(m, "dynamic_int8_linear", vitk::Backend::kCpu, &vitk::cpu::dynamic_int8_linear);
  VITK_IMPL(m, "int4_int8_linear", vitk::Backend::kCpu, &vitk::cpu::int4_int8_linear);
}
