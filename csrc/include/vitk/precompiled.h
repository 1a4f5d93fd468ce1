// The torch and standard headers that nearly every translation unit of the CPU library includes,
// which setup.py precompiles once per build (tools/precompiled_header.py): parsing them is about a
// quarter of each file's compile time. Every file still includes what it uses, so the library builds
// the same without this (CMake, and any compiler the precompiled header does not suit).
#pragma once

// Python's CFLAGS carry -Wsign-compare. Parsed from a precompiled header, torch's own templates get
// instantiated at the end of every file and warn there (TypeSafeSignMath.h), which parsed in place
// they do not; the pragma covers torch's code only, not ours after it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>
