// Float linear layers over 4-bit weights: int4_linear (W4A16) and shift_linear (powers of two).
//
// Both decode 4-bit codes through 16-entry tables (int4_linear: (code - zero) * scale per group;
// shift_linear: the signed powers of two 2^-(c-1), the channel's scale applied in the epilogue), so no
// weight is ever multiplied to decode it. Timed against the alternative for the shift weights, adding
// the code's exponent to x's (vscalefps, a sign flip and a masked add per 16 values), the table (one
// vpermps and one fma per 16 values) is the faster one, and it is the same code for both ops.
//
// With AMX bf16 tiles (and M >= kAmxMinRows), float_linear_amx.cpp computes them instead: x split into
// exact bf16 parts, codes as bf16 tiles, fp32 sums; the rows it cannot take exactly come back here.
//
// Many rows (M > 16): tasks of (panel of 64 output channels, 96 rows), panel-major, in parallel over
// both. A thread decodes its panel once, k-major ([K][64] fp32), and reuses it for all of its rows:
// 6 x 64 outer-product micro-tiles (24 vector accumulators over the whole of K, fp32 fma), finished
// with scale, bias and activation on the way out. Few rows (M <= 16, AVX-512): reading the weights is
// the cost, so each packed row is read once and decoded in registers (a vpermps from the table per 16
// codes) against up to 8 rows of x at a time, over tasks of 16 output channels.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <functional>
#include <vector>

#include "common.h"
#include "float_linear_amx.h"
#include "vitk/lowbit.h"
#include "vitk/registration.h"

namespace vitk {
namespace cpu {
namespace {

using namespace lowbit_detail;
namespace lb = ::vitk::lowbit;

constexpr int64_t kTaskRows = 96;
constexpr int kMR = 6, kNR = 4;            // micro-tile: 6 rows x 4 vectors of 16 channels
constexpr int64_t kPanel = 16 * kNR;       // output channels per decoded panel
constexpr int kRowDotRows = 8;
constexpr int64_t kSmallM = 16;
// With AMX bf16 tiles, from this many rows on: below it the few-row kernel, which reads each packed
// row once, is faster (M = 1: 0.08 against 0.14 ms at 768 -> 3072; M = 4: 0.19 against 0.15 ms).
constexpr int64_t kAmxMinRows = 4;

// The codes and the tables they are decoded through: row n's K/G tables of 16 values (one per group
// of G values of k) written by tables(n, dst).
struct Codes {
  const uint8_t* packed;   // [N, K/2]
  int64_t G;
  std::function<void(int64_t n, float* dst)> tables;
};

// fp32 rows of x: read in place (any leading strides) when x is fp32, else converted once.
struct FloatRows {
  std::vector<float> buf;
  const float* base = nullptr;
  std::vector<int64_t> off;
  FloatRows(const at::Tensor& x, int64_t K) : FloatRows(x, K, row_offsets(x)) {}
  FloatRows(const at::Tensor& x, int64_t K, std::vector<int64_t> offsets) : off(std::move(offsets)) {
    const int64_t M = static_cast<int64_t>(off.size());
    if (x.scalar_type() == at::kFloat) {
      base = x.const_data_ptr<float>();
      return;
    }
    buf.resize(M * K);
    at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) load_row(x, off[m], K, buf.data() + m * K);
    });
    base = buf.data();
    for (int64_t m = 0; m < M; ++m) off[m] = m * K;
  }
  const float* row(int64_t m) const { return base + off[m]; }
};

#if defined(__AVX2__) && !defined(__AVX512F__)
// 16 sums times the channels' scales, plus their bias, through ReLU if asked (finish's arithmetic).
inline void finish_avx2(const float* sums, const lb::Epilogue& ep, int64_t n0, float* out) {
  for (int h = 0; h < 2; ++h) {
    __m256 v = _mm256_loadu_ps(sums + 8 * h);
    if (ep.w_scale) v = _mm256_mul_ps(v, _mm256_loadu_ps(ep.w_scale + n0 + 8 * h));
    if (ep.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(ep.bias + n0 + 8 * h));
    // max(0, v) returns its second operand, v, when either is NaN: NaN passes through, as in finish.
    if (ep.act == lb::Act::kRelu) v = _mm256_max_ps(_mm256_setzero_ps(), v);
    _mm256_storeu_ps(out + 8 * h, v);
  }
}
#endif

void panel_gemm(const FloatRows& x, int64_t M, int64_t N, int64_t K, const Codes& codes, const lb::Epilogue& ep,
                at::Tensor& out) {
  const OutRows dst(out);
  const int64_t groups = K / codes.G;
  for_each_panel_task(lb::ceil_div(N, kPanel), M, kTaskRows, [&]() {
    return [&, panel = std::vector<float>(K * kPanel), tables = std::vector<float>(groups * 16)](
               int64_t p, int64_t m0, int64_t m1, bool new_panel) mutable {
      const int64_t n0 = p * kPanel, ncols = std::min(kPanel, N - n0);
      const int nr = static_cast<int>(lb::ceil_div(ncols, 16));
      if (new_panel) {
        if (ncols < kPanel) std::fill(panel.begin(), panel.end(), 0.f);
        for (int64_t j = 0; j < ncols; ++j) {
          codes.tables(n0 + j, tables.data());
          lb::decode_column(codes.packed + (n0 + j) * (K / 2), K, codes.G, tables.data(), panel.data() + j, kPanel);
        }
      }
      for (int64_t m = m0; m < m1; m += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - m));
        const float* xr[kMR];
        for (int i = 0; i < mr; ++i) xr[i] = x.row(m + i);
        with_tile<kMR, kNR>(mr, nr, [&]<int MR, int NR>() {
          lb::v16f acc[MR][NR];
#if defined(__AVX2__) && !defined(__AVX512F__)
          if (ncols == kPanel && dst.type == at::kFloat && (ep.act == lb::Act::kNone || ep.act == lb::Act::kRelu)) {
            // The common case finished in AVX registers and stored in place: through the 16-lane vector
            // type, which AVX2 keeps on the stack, the epilogue took as long as a small-K tile.
            for (int j = 0; j < NR; ++j) {
              lb::v16f col[MR];
              lb::f32_tile_avx2<MR>(xr, panel.data() + 16 * j, kPanel, K, col);
              for (int i = 0; i < MR; ++i)
                finish_avx2(reinterpret_cast<const float*>(&col[i]), ep, n0 + 16 * j,
                            static_cast<float*>(dst.base) + (m + i) * dst.ld + n0 + 16 * j);
            }
            return;
          }
          for (int j = 0; j < NR; ++j) {
            lb::v16f col[MR];
            lb::f32_tile_avx2<MR>(xr, panel.data() + 16 * j, kPanel, K, col);
            for (int i = 0; i < MR; ++i) acc[i][j] = col[i];
          }
#else
          lb::f32_tile<MR, NR>(xr, panel.data(), kPanel, K, acc);
#endif
          for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) {
              const int valid = static_cast<int>(std::min<int64_t>(16, ncols - 16 * j));
              const lb::v16f v = lb::finish(acc[i][j], 1.f, ep, n0 + 16 * j, valid);
              store(dst, m + i, n0 + 16 * j, reinterpret_cast<const float*>(&v), valid);
            }
        });
      }
    };
  });
}

#if VITK_LOWBIT_VNNI || defined(__AVX2__)
// The AVX-512 kernel deinterleaves x by 16, the AVX2 one by 8 (f32_row_dot_avx2).
#if VITK_LOWBIT_VNNI
constexpr int64_t kRowDotLanes = 16;
#else
constexpr int64_t kRowDotLanes = 8;
#endif
void rows_gemm(const FloatRows& x, int64_t M, int64_t N, int64_t K, const Codes& codes, const lb::Epilogue& ep,
               at::Tensor& out) {
  const OutRows dst(out);
  std::vector<float> xd(M * K);
  for (int64_t m = 0; m < M; ++m) lb::deinterleave(x.row(m), K, kRowDotLanes, xd.data() + m * K);
  const int64_t groups = K / codes.G;
  at::parallel_for(0, lb::ceil_div(N, lb::kBlockN), 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> tables(groups * 16);
    std::vector<float> acc(lb::kBlockN * M);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * lb::kBlockN;
      const int valid = static_cast<int>(std::min<int64_t>(lb::kBlockN, N - n0));
      for (int j = 0; j < valid; ++j) {
        codes.tables(n0 + j, tables.data());
        const uint8_t* row = codes.packed + (n0 + j) * (K / 2);
        for (int64_t m0 = 0; m0 < M; m0 += kRowDotRows) {
          const int mt = static_cast<int>(std::min<int64_t>(kRowDotRows, M - m0));
          const float* xr[kRowDotRows];
          for (int i = 0; i < mt; ++i) xr[i] = xd.data() + (m0 + i) * K;
          with_rows<1, kRowDotRows>(mt, [&]<int MT>() {
#if VITK_LOWBIT_VNNI
            lb::f32_row_dot<MT>(xr, row, K, codes.G, tables.data(), acc.data() + j * M + m0);
#else
            lb::f32_row_dot_avx2<MT>(xr, row, K, codes.G, tables.data(), acc.data() + j * M + m0);
#endif
          });
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        lb::v16f v = lb::splat(0.f);
        for (int j = 0; j < valid; ++j) v[j] = acc[j * M + m];
        v = lb::finish(v, 1.f, ep, n0, valid);
        store(dst, m, n0, reinterpret_cast<const float*>(&v), valid);
      }
    }
  });
}
#endif

void fp32_gemm(const FloatRows& rows, int64_t N, int64_t K, const Codes& codes, const lb::Epilogue& ep,
               at::Tensor& out) {
  const int64_t M = static_cast<int64_t>(rows.off.size());
#if VITK_LOWBIT_VNNI || defined(__AVX2__)
  if (M <= kSmallM) {
    rows_gemm(rows, M, N, K, codes, ep, out);
    return;
  }
#endif
  panel_gemm(rows, M, N, K, codes, ep, out);
}

// codes serve the fp32 kernels, tiles (the same weights) the AMX bf16 one; col_scale is the fp32
// kernels' per-channel scale, which tiles.scale carries for the tile kernel.
at::Tensor float_gemm(const at::Tensor& x, int64_t N, const Codes& codes, const TileCodes& tiles,
                      const at::Tensor& col_scale, const std::optional<at::Tensor>& bias, Act act) {
  const int64_t K = x.size(-1);
  const at::Tensor b = channel_vector(bias, "bias", N, x);
  at::Tensor out = at::empty(out_shape(x, N), x.options());
  std::vector<int64_t> off = row_offsets(x);
  const int64_t M = static_cast<int64_t>(off.size());
  if (M == 0 || N == 0) return out;
  const lb::Epilogue ep{ptr_or_null(col_scale), ptr_or_null(b), act};
#if VITK_LOWBIT_AMX_BF16
  if (lb::amx::available_bf16() && M >= kAmxMinRows) {
    const std::vector<int64_t> redo = amx_float_gemm(x, off, N, K, tiles, {nullptr, ep.bias, act}, out);
    if (redo.empty()) return out;
    // Rows the tiles cannot take exactly (non-finite, extreme scales) get the fp32 kernels' result.
    std::vector<int64_t> sub(redo.size());
    for (size_t i = 0; i < redo.size(); ++i) sub[i] = off[redo[i]];
    at::Tensor part = at::empty({static_cast<int64_t>(redo.size()), N}, out.options());
    fp32_gemm(FloatRows(x, K, std::move(sub)), N, K, codes, ep, part);
    at::Tensor flat = out.view({M, N});
    for (size_t i = 0; i < redo.size(); ++i) flat[redo[i]].copy_(part[static_cast<int64_t>(i)]);
    return out;
  }
#endif
  fp32_gemm(FloatRows(x, K, std::move(off)), N, K, codes, ep, out);
  return out;
}

}  // namespace

at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& w_packed, const at::Tensor& w_scale,
                       const std::optional<at::Tensor>& w_zero, int64_t group_size,
                       const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const Packed4Args args(x_in, w_packed, activation);
  const at::Tensor& x = args.x;
  const int64_t K = args.K, N = args.N;
  TORCH_CHECK_VALUE(group_size == 32 || group_size == 64 || group_size == 128 || group_size == K,
                    "group_size: expected 32, 64, 128 or K=", K, ", got ", group_size);
  TORCH_CHECK_VALUE(K % group_size == 0, "group_size: expected a divisor of K=", K, ", got ", group_size);
  const int64_t G = K / group_size;
  check_dtype_in(w_scale, "w_scale", {at::kFloat, at::kBFloat16, at::kHalf});
  check_same_device(x, "x", w_scale, "w_scale");
  TORCH_CHECK_VALUE(w_scale.dim() == 2 && w_scale.size(0) == N && w_scale.size(1) == G,
                    "w_scale: expected shape [N, K/group_size] = [", N, ", ", G, "], got ", w_scale.sizes());
  const bool has_zero = w_zero.has_value() && w_zero->defined();
  if (has_zero) {
    check_defined(*w_zero, "w_zero");
    check_same_device(x, "x", *w_zero, "w_zero");
    check_same_dtype(w_scale, "w_scale", *w_zero, "w_zero");
    TORCH_CHECK_VALUE(w_zero->sizes() == w_scale.sizes(), "w_zero: expected the shape of w_scale ", w_scale.sizes(),
                      ", got ", w_zero->sizes());
  }
  const at::Tensor s = w_scale.to(at::kFloat).contiguous();
  const at::Tensor z = has_zero ? w_zero->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor wp = w_packed.contiguous();
  const uint8_t* codes = wp.const_data_ptr<uint8_t>();
  const float* sp = s.const_data_ptr<float>();
  const float* zp = has_zero ? z.const_data_ptr<float>() : nullptr;
  const Codes c{codes, group_size, [&](int64_t n, float* dst) {
    for (int64_t g = 0; g < G; ++g) lb::int4_table(sp[n * G + g], zp ? zp + n * G + g : nullptr, dst + 16 * g);
  }};
  float values[16];
  for (int i = 0; i < 16; ++i) values[i] = static_cast<float>(has_zero || i < 8 ? i : i - 16);
  const TileCodes t{codes, values, group_size, sp, zp};
  return float_gemm(x, N, c, t, at::Tensor(), bias, args.act);
}

at::Tensor shift_linear(const at::Tensor& x_in, const at::Tensor& w_packed, const std::optional<at::Tensor>& w_scale,
                        const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const Packed4Args args(x_in, w_packed, activation);
  const at::Tensor& x = args.x;
  const int64_t K = args.K, N = args.N;
  const at::Tensor s = channel_vector(w_scale, "w_scale", N, x, /*fp32_only=*/true);
  const at::Tensor wp = w_packed.contiguous();
  const uint8_t* codes = wp.const_data_ptr<uint8_t>();
  float table[16];
  lb::shift_table(table);
  const Codes c{codes, K, [&](int64_t, float* dst) { std::memcpy(dst, table, sizeof(table)); }};
  const TileCodes t{codes, table, K, ptr_or_null(s), nullptr};
  return float_gemm(x, N, c, t, s, bias, args.act);
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "int4_linear", vitk::Backend::kCpu, &vitk::cpu::int4_linear);
  VITK_IMPL(m, "shift_linear", vitk::Backend::kCpu, &vitk::cpu::shift_linear);
}
