// int4_linear and shift_linear on AMX bf16 tiles: x split into exact bf16 parts once per call, weight
// tiles decoded from the packed codes (once per call, or per task overlapped with the previous task's
// products), fp32 sums per group folded with the group's scale and zero point (vitk/lowbit_amx_bf16.h
// has the arithmetic).
//
// Tasks are (block of rows, panel of 32 output channels), row-block-major, each block's parts (one
// slice of k at a time) at most 256 KiB: a thread runs every 32-row step of its block over a panel's
// tiles (K x 32 bf16) with the block's slice held in L2. Steps of a single 16-row tile pair are used
// for the last <= 16 rows, so a call of a few rows does half the tile products of a full step.
#include "float_linear_amx.h"

#if VITK_LOWBIT_AMX_BF16
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>

#include "common.h"

namespace vitk {
namespace cpu {
namespace lowbit_detail {
namespace {

namespace lb = ::vitk::lowbit;
namespace amx = ::vitk::lowbit::amx;

// x's parts per task and slice of k. A quarter of one core's L2: the weights' slice and the output
// share it (at 1 MiB, 3072 -> 768 took 18 against 14 ms, and no shape was faster).
constexpr int64_t kRowBlockBytes = 1 << 18;
constexpr int64_t kSliceChunks = 16;         // chunks of k per slice (512 values), whole groups
constexpr int64_t kPanel = 32;               // output channels per task: the two blocks of one step
constexpr int kStepRows = 32;

template <class F>
void with_parts(int parts, F&& f) {
  if (parts == 3)
    f.template operator()<3>();
  else if (parts == 2)
    f.template operator()<2>();
  else
    f.template operator()<1>();
}

}  // namespace

std::vector<int64_t> amx_float_gemm(const at::Tensor& x, const std::vector<int64_t>& off, int64_t N, int64_t K,
                                    const TileCodes& codes, const lb::Epilogue& ep, at::Tensor& out) {
  const int64_t M = static_cast<int64_t>(off.size());
  // A fp32 x needs three bf16 parts to be exact, a fp16 x two (11 significant bits), a bf16 x one.
  const int parts = x.scalar_type() == at::kFloat ? 3 : x.scalar_type() == at::kHalf ? 2 : 1;
  const int64_t Kp = lb::ceil_div(K, amx::kBf16Chunk) * amx::kBf16Chunk, chunks = Kp / amx::kBf16Chunk;
  const int64_t groups = K / codes.G, group_chunks = groups == 1 ? chunks : codes.G / amx::kBf16Chunk;
  // x's parts tile-major: per 16 rows, per part, per chunk one contiguous 1 KiB tile. (Row-major, a
  // tile's 16 rows sat 18 KiB apart at K = 3072, in 16 pages: the tile loads then ran at a fifth of the
  // speed they have at K = 768.)
  const int64_t part_elems = chunks * amx::kBf16TileElems, group_elems = parts * part_elems;

  // Rows past M are slack for the last step's tile loads; their sums are never stored.
  std::unique_ptr<uint16_t[]> a(new uint16_t[lb::ceil_div(M + kStepRows, 16) * group_elems]);
  std::vector<float> gsum(codes.zero ? M * groups : 0);
  std::vector<uint8_t> exact(M);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<float> conv(x.scalar_type() == at::kFloat ? 0 : K);
    with_parts(parts, [&]<int P>() {
      for (int64_t m = m0; m < m1; ++m) {
        const float* row = x.scalar_type() == at::kFloat ? x.const_data_ptr<float>() + off[m] : conv.data();
        if (x.scalar_type() != at::kFloat) load_row(x, off[m], K, conv.data());
        uint16_t* dst = a.get() + (m / 16) * group_elems + (m % 16) * amx::kBf16Chunk;
        exact[m] = amx::split_row<P>(row, K, Kp, dst, part_elems, amx::kBf16TileElems, codes.G,
                                     codes.zero ? gsum.data() + m * groups : nullptr);
      }
    });
  });

  // k runs in slices of whole groups (or, with one group, slices of kSliceChunks whose sums fold like
  // groups with the same scales, the zero point's term once): a task's rows then sweep one slice of the
  // panel at a time, so a block of rows holds only that slice of x in L2 and can be long. (Whole rows in
  // L2 at K = 3072 meant 32-row blocks, each reading all of the weights from L3.)
  const int64_t unit_chunks = groups == 1 ? std::min(chunks, kSliceChunks) : group_chunks;
  const int64_t units = lb::ceil_div(chunks, unit_chunks);
  const int64_t slice_units = std::max<int64_t>(1, kSliceChunks / unit_chunks), slices = lb::ceil_div(units, slice_units);
  const int64_t slice_elems = parts * std::min(chunks, slice_units * unit_chunks) * amx::kBf16Chunk;
  const int64_t panels = lb::ceil_div(N, kPanel);
  const int64_t max_rows = std::max<int64_t>(kStepRows, kRowBlockBytes / (2 * slice_elems) / kStepRows * kStepRows);
  const int64_t row_blocks = lb::ceil_div(M, max_rows);
  const int64_t block_rows = lb::ceil_div(lb::ceil_div(M, row_blocks), kStepRows) * kStepRows;
  const __m512i table = amx::code_word_table(codes.values);
  const OutRows dst(out);
  // A panel's weight tiles (two per chunk: tile 2c + j is chunk c of channel block j) and its channels'
  // scales per group, with their zero points.
  struct Panel {
    uint16_t* tiles = nullptr;
    float *sc = nullptr, *sz = nullptr;
    int64_t n0 = 0;
    int blocks = 0;
  };
  const int64_t panel_elems = chunks * 2 * amx::kBf16TileElems, scale_elems = groups * kPanel;
  // Decoded a tile at a time, so that the next task's tiles can be decoded between the current task's
  // tile products; its columns and scales last, once the current task no longer folds into them.
  struct Decoder {
    const uint8_t* rows[2][16];
    int64_t next = 0;
  };
  auto start_decode = [&](Decoder& d, int64_t p) {
    // Channels past N repeat channel N - 1; their sums are never stored.
    for (int j = 0; j < 2; ++j)
      for (int i = 0; i < 16; ++i) d.rows[j][i] = codes.packed + std::min(p * kPanel + 16 * j + i, N - 1) * (K / 2);
    d.next = 0;
  };
  auto decode_tiles = [&](Panel& pn, Decoder& d, int64_t count) {
    for (const int64_t end = std::min(2 * chunks, d.next + count); d.next < end; ++d.next) {
      const int64_t c = d.next / 2;
      amx::code_tile_bf16(d.rows[d.next % 2], c, static_cast<int>(std::min<int64_t>(16, K / 2 - 16 * c)), table,
                          pn.tiles + d.next * amx::kBf16TileElems);
    }
  };
  auto decode_scales = [&](Panel& pn, int64_t p) {
    pn.n0 = p * kPanel;
    pn.blocks = N - pn.n0 > 16 ? 2 : 1;
    for (int64_t g = 0; g < groups; ++g)
      for (int i = 0; i < kPanel; ++i) {
        const int64_t at_ = std::min(pn.n0 + i, N - 1) * groups + g;
        pn.sc[g * kPanel + i] = codes.scale ? codes.scale[at_] : 1.f;
        if (codes.zero) pn.sz[g * kPanel + i] = pn.sc[g * kPanel + i] * codes.zero[at_];
      }
  };
  auto decode_panel = [&](Panel& pn, int64_t p) {
    Decoder d;
    start_decode(d, p);
    decode_tiles(pn, d, 2 * chunks);
    decode_scales(pn, p);
  };
  // With several row blocks, every panel is decoded once, up front, into a buffer the tasks share
  // (N * K * 2 bytes): decoded per task instead, a 3072 -> 768 layer (32-row blocks) decoded every
  // weight 49 times. With one or two, each task decodes its panel, overlapped with the previous task.
  const bool shared = row_blocks >= 3;
  std::unique_ptr<uint16_t[]> shared_tiles(shared ? new uint16_t[panels * panel_elems] : nullptr);
  std::vector<float> shared_scales(shared ? 2 * panels * scale_elems : 0);
  std::vector<Panel> shared_panels(shared ? panels : 0);
  if (shared)
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        Panel& pn = shared_panels[p];
        pn.tiles = shared_tiles.get() + p * panel_elems;
        pn.sc = shared_scales.data() + 2 * p * scale_elems;
        pn.sz = pn.sc + scale_elems;
        decode_panel(pn, p);
      }
    });

  const int head_rows = static_cast<int>(std::min<int64_t>(16, M));
  const bool stream = stream_rows(dst, M);
  at::parallel_for(0, row_blocks * panels, 1, [&](int64_t t0, int64_t t1) {
    amx::TileScope scope(head_rows);
    std::unique_ptr<uint16_t[]> own_tiles(shared ? nullptr : new uint16_t[2 * panel_elems]);
    std::vector<float> own_scales(shared ? 0 : 4 * scale_elems);
    Panel own[2];
    for (int b = 0; b < 2 && !shared; ++b) {
      own[b].tiles = own_tiles.get() + b * panel_elems;
      own[b].sc = own_scales.data() + 2 * b * scale_elems;
      own[b].sz = own[b].sc + scale_elems;
    }
    alignas(64) float prods[2][kStepRows * kPanel];
    std::vector<float> acc_steps(lb::ceil_div(block_rows, kStepRows) * kStepRows * kPanel);
    // A step's unit of sums (a group, or a slice of the one group) folded into the step's acc: acc = sum
    // over groups of scale * (sums - zero * sum(x)), finished (bias, activation) and stored after the
    // last unit. Rows [done, rows) are left to fold.
    struct Pending {
      int64_t m = -1, u = 0;
      int rows = 0, buf = 0, done = 0;
      float* acc = nullptr;
      const Panel* pn = nullptr;
    } pending;
    auto fold = [&](Pending& q, int upto) {
      const Panel& pn = *q.pn;
      const float* sums = prods[q.buf];
      const int64_t g = groups == 1 ? 0 : q.u;
      const bool zero_term = codes.zero && (groups > 1 || q.u == 0);
      for (int i = q.done; i < upto; ++i)
        for (int j = 0; j < pn.blocks; ++j) {
          const int at_ = i * kPanel + 16 * j;
          const __m512 s = _mm512_loadu_ps(pn.sc + g * kPanel + 16 * j);
          __m512 d = _mm512_load_ps(sums + at_);
          if (q.rows <= 16) d = _mm512_add_ps(d, _mm512_load_ps(sums + at_ + 16 * kPanel));
          __m512 v = q.u == 0 ? _mm512_mul_ps(d, s) : _mm512_fmadd_ps(d, s, _mm512_loadu_ps(q.acc + at_));
          if (zero_term)
            v = _mm512_fnmadd_ps(_mm512_set1_ps(gsum[(q.m + i) * groups + g]),
                                 _mm512_loadu_ps(pn.sz + g * kPanel + 16 * j), v);
          if (q.u + 1 < units) {
            _mm512_storeu_ps(q.acc + at_, v);
            continue;
          }
          const int64_t nj = pn.n0 + 16 * j;
          const int valid = static_cast<int>(std::min<int64_t>(16, N - nj));
          const lb::v16f f = lb::finish((lb::v16f)v, 1.f, ep, nj, valid);
          store16(dst, stream, q.m + i, nj, reinterpret_cast<const float*>(&f), valid);
        }
      q.done = std::max(q.done, upto);
    };
    auto rows_of_task = [&](int64_t t, int64_t& m0, int64_t& m1) {
      m0 = t / panels * block_rows;
      m1 = std::min(M, m0 + block_rows);
      return m0 < m1;
    };
    auto next_task = [&](int64_t t) {
      int64_t m0, m1;
      while (t < t1 && !rows_of_task(t, m0, m1)) ++t;
      return t;
    };
    // Software-pipelined: a group's products run on the tiles while the vector units, between chunks of
    // products, fold the previous group's sums (stored one iteration earlier) a few rows at a time and
    // decode the next task's panel two tiles at a time. (Vector work placed after a group's products
    // waits for them: folded or decoded there, M = 16 took 1.4x as long.)
    int cur = 0, pb = 0;
    Decoder dec;
    int64_t t = next_task(t0);
    if (t < t1 && !shared) decode_panel(own[pb], t % panels);
    while (t < t1) {
      const int64_t next = next_task(t + 1);
      int64_t m0, m1;
      rows_of_task(t, m0, m1);
      const Panel& pn = shared ? shared_panels[t % panels] : own[pb];
      const bool decode_next = !shared && next < t1;
      if (decode_next) start_decode(dec, next % panels);
      for (int64_t sl = 0; sl < slices; ++sl)
      for (int64_t m = m0; m < m1; m += kStepRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kStepRows, m1 - m));
        const uint16_t* am = a.get() + (m / 16) * group_elems;
        float* acc = acc_steps.data() + (m - m0) * kPanel;
        for (int64_t u = sl * slice_units; u < std::min(units, (sl + 1) * slice_units); ++u) {
          const int64_t c0 = u * unit_chunks, c1 = std::min(chunks, c0 + unit_chunks);
          const int fold_step = pending.m >= 0 ? static_cast<int>(lb::ceil_div(pending.rows, c1 - c0)) : 0;
          auto between = [&] {
            if (fold_step) fold(pending, std::min(pending.rows, pending.done + fold_step));
            if (decode_next) decode_tiles(own[pb ^ 1], dec, 2);
          };
          with_parts(parts, [&]<int P>() {
            if (rows > 16)
              amx::bf16_products<2, P>(am, am + group_elems, part_elems, pn.tiles, c0, c1, between);
            else
              amx::bf16_products<1, P>(am, am, part_elems, pn.tiles, c0, c1, between);
          });
          if (pending.m >= 0) fold(pending, pending.rows);
          amx::store_products(prods[cur]);
          pending = {m, u, rows, cur, 0, acc, &pn};
          cur ^= 1;
        }
      }
      if (decode_next) {
        decode_tiles(own[pb ^ 1], dec, 2 * chunks);  // what the task's chunks of products left
        // The previous task's last sums, folded above, read the other panel's columns and scales until now.
        decode_scales(own[pb ^ 1], next % panels);
      }
      t = next;
      pb ^= 1;
    }
    if (pending.m >= 0) fold(pending, pending.rows);
    _mm_sfence();
  });

  std::vector<int64_t> redo;
  for (int64_t m = 0; m < M; ++m)
    if (!exact[m]) redo.push_back(m);
  return redo;
}

}  // namespace lowbit_detail
}  // namespace cpu
}  // namespace vitk
#endif
