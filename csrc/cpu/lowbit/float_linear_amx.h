// int4_linear and shift_linear on AMX bf16 tiles (vitk/lowbit_amx_bf16.h): the op-side driver.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "vitk/lowbit_amx_bf16.h"
#include "vitk/lowbit_kernels.h"

namespace vitk {
namespace cpu {
namespace lowbit_detail {

// 4-bit codes as the tile kernel reads them: weight (n, k) = scale[n][g] * (values[code] - zero[n][g])
// for k in group g of G values (G = K: one group).
struct TileCodes {
  const uint8_t* packed;  // [N, K/2]
  const float* values;    // 16 code values, each exact in bf16
  int64_t G;
  const float* scale;     // [N, K/G], or null (1)
  const float* zero;      // [N, K/G] in code units, or null (0)
};

#if VITK_LOWBIT_AMX_BF16
// out[m] = act(x[m] . w + bias) for the M rows of x at element offsets `off` (ep's w_scale unused: the
// scales are the codes'). Returns the rows it could not compute exactly on tiles (split_row); the
// caller computes those with the fp32 kernels.
std::vector<int64_t> amx_float_gemm(const at::Tensor& x, const std::vector<int64_t>& off, int64_t N, int64_t K,
                                    const TileCodes& codes, const lowbit::Epilogue& ep, at::Tensor& out);
#endif

}  // namespace lowbit_detail
}  // namespace cpu
}  // namespace vitk
