// The lowbit family's CPU entry points (int8 / int4 / power-of-two linear layers), each with its op's
// schema signature and registered as the op's CPU kernel. Semantics: vitkernels/ops/lowbit.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace vitk {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, bool symmetric);

// w_q: [N, K] int8, or the blocked layout of vitkernels.lowbit.block_int8 ([ceil(N/16), ceil(K/4) + 1, 64]).
at::Tensor int8_linear(const at::Tensor& x_q, const at::Tensor& x_scale, const std::optional<at::Tensor>& x_zero_point,
                       const at::Tensor& w_q, const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                       c10::string_view activation, std::optional<at::ScalarType> out_dtype);

at::Tensor dynamic_int8_linear(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                               const std::optional<at::Tensor>& bias, c10::string_view activation, bool symmetric);

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                       const std::optional<at::Tensor>& w_zero, int64_t group_size,
                       const std::optional<at::Tensor>& bias, c10::string_view activation);

at::Tensor int4_int8_linear(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& bias, c10::string_view activation);

at::Tensor shift_linear(const at::Tensor& x, const at::Tensor& w_packed, const std::optional<at::Tensor>& w_scale,
                        const std::optional<at::Tensor>& bias, c10::string_view activation);

}  // namespace cpu
}  // namespace vitk
