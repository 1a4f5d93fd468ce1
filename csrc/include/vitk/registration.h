// How a C++ kernel becomes the default implementation of a torch.ops.vitk op.
//
// Every family registers its CPU (and CUDA) kernels with TORCH_LIBRARY_IMPL, so the dispatcher
// reaches them with no Python in between: a model exported with torch.export runs under
// AOTInductor from C++ alone (libtorch + this library). Each kernel is registered through
// VITK_IMPL, which wraps it in `Routed`: the wrapper calls the kernel unless the caller forced
// another backend (vitkernels.use_backend(...) in this thread, else the VITK_BACKEND environment
// variable) or the call is outside one of the kernel's declared limits. Only then does it hand the
// call to the op's twin `vitk_route::<op>`, which the Python package defines with the same schema
// and whose kernel picks the forced or capable backend (Triton, ...) and explains a refusal. In a
// C++-only process that twin does not exist, and such a call raises an error that says so.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "vitk/backend_choice.h"

#include <algorithm>
#include <cstddef>
#include <optional>
#include <string>

namespace vitk {

// An op name usable as a template argument, so one wrapper template serves every op.
template <std::size_t N>
struct OpName {
  char s[N];
  constexpr OpName(const char (&name)[N]) { std::copy_n(name, N, s); }  // NOLINT: implicit on purpose
};

namespace detail {
// vitk_route::<op>, or nullopt when the Python package is not loaded in this process.
std::optional<c10::OperatorHandle> route_handle(const char* op);
[[noreturn]] void no_route(const char* op, Backend forced, const std::string& limit);

inline bool routed_elsewhere(Backend mine) {
  const Backend f = forced_backend();
  return f != Backend::kAuto && f != mine;
}
}  // namespace detail

// A limit of a kernel: the empty string when the call is within it, else what it exceeds.
template <auto Kernel>
struct NoLimits;
template <class R, class... A, R (*K)(A...)>
struct NoLimits<K> {
  static std::string check(A...) { return {}; }
};

template <OpName Name, Backend Mine, auto Kernel, auto Limits>
struct Routed;
template <OpName Name, Backend Mine, class R, class... A, R (*Kernel)(A...), std::string (*Limits)(A...)>
struct Routed<Name, Mine, Kernel, Limits> {
  static R call(A... args) {
    std::string limit = Limits(args...);
    if (limit.empty() && !detail::routed_elsewhere(Mine)) return Kernel(args...);
    // Looked up per routed call (not cached): the Python package may register it after a miss.
    const std::optional<c10::OperatorHandle> route = detail::route_handle(Name.s);
    if (!route) detail::no_route(Name.s, forced_backend(), limit);
    return route->typed<R(A...)>().call(args...);
  }
};

}  // namespace vitk

// m.impl("op", kernel) with routing (see above); the op name is given without the namespace.
#define VITK_IMPL(m, name, backend, kernel) \
  m.impl(name, TORCH_FN((::vitk::Routed<name, backend, kernel, &::vitk::NoLimits<kernel>::check>::call)))
// The same for a kernel with limits: `limits` has the kernel's signature and returns "" when the
// call fits, else a description of the limit it exceeds (which the error and the router report).
#define VITK_IMPL_LIMITED(m, name, backend, kernel, limits) \
  m.impl(name, TORCH_FN((::vitk::Routed<name, backend, kernel, limits>::call)))
