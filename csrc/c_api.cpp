// The library's plain-C entry points, which Python reaches through ctypes (vitkernels/_lib.py).
// Loading the library registers every op (schemas, C++ kernels, composites); these functions only add
// what Python needs besides torch.ops.vitk: the calling thread's forced backend (vitkernels.use_backend),
// which the C++ kernels read on every call (vitk/registration.h), and the torch version the library was
// compiled against. Nothing here needs Python, so a C++ program links the very file Python loads.
#include <torch/version.h>

#include "vitk/backend_choice.h"

#define VITK_C_API extern "C" __attribute__((visibility("default")))

namespace {
// What a C caller gets when the call fails: C++ exceptions must not cross the C boundary.
constexpr int kInvalid = -2;
}  // namespace

// Sets this thread's forced backend (-1: none, 0: automatic, 1: cpu, 2: cuda, 3: triton) and returns the
// previous one; an unknown code changes nothing and returns kInvalid.
VITK_C_API int vitk_set_thread_backend(int code) {
  if (code < -1 || code > static_cast<int>(vitk::Backend::kTriton)) return kInvalid;
  return vitk::set_thread_backend(code);
}

// This thread's forced backend code (0: none), from use_backend or VITK_BACKEND; kInvalid when
// VITK_BACKEND names no backend (the caller reports it).
VITK_C_API int vitk_forced_backend() {
  try {
    return static_cast<int>(vitk::forced_backend());
  } catch (...) {
    return kInvalid;
  }
}

VITK_C_API const char* vitk_torch_version() { return TORCH_VERSION; }
