// What the shiftadd CPU kernels share: the accumulation type, and the includes and namespace every
// one of them opens.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "vitk/checks.h"
#include "vitk/registration.h"
#include "vitk/shiftadd.h"
#include "vitk/tiling.h"

namespace vitk {
namespace cpu {
namespace shiftadd_detail {

// float64 accumulates in float64, every other floating type in float32.
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

}  // namespace shiftadd_detail
}  // namespace cpu
}  // namespace vitk
