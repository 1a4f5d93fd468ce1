// The forced-backend state and the hand-off to the Python router (see vitk/registration.h).
#include "vitk/registration.h"

#include <cstdlib>
#include <cstring>

namespace vitk {
namespace {

thread_local int g_thread_backend = -1;

Backend parse_env() {
  const char* env = std::getenv("VITK_BACKEND");
  if (env == nullptr || *env == '\0') return Backend::kAuto;
  if (std::strcmp(env, "cpu") == 0) return Backend::kCpu;
  if (std::strcmp(env, "cuda") == 0) return Backend::kCuda;
  if (std::strcmp(env, "triton") == 0) return Backend::kTriton;
  TORCH_CHECK_VALUE(false, "VITK_BACKEND: expected one of cpu, cuda, triton, got '", env, "'");
}

}  // namespace

const char* backend_name(Backend b) {
  switch (b) {
    case Backend::kCpu: return "cpu";
    case Backend::kCuda: return "cuda";
    case Backend::kTriton: return "triton";
    default: return "auto";
  }
}

Backend forced_backend() {
  if (g_thread_backend >= 0) return static_cast<Backend>(g_thread_backend);
  return parse_env();
}

int set_thread_backend(int code) {
  TORCH_CHECK_VALUE(code >= -1 && code <= static_cast<int>(Backend::kTriton), "code: expected -1..3, got ", code);
  const int prev = g_thread_backend;
  g_thread_backend = code;
  return prev;
}

namespace detail {

std::optional<c10::OperatorHandle> route_handle(const char* op) {
  return c10::Dispatcher::singleton().findOp(c10::OperatorName(std::string("vitk_route::") + op, ""));
}

void no_route(const char* op, Backend forced, const std::string& limit) {
  if (!limit.empty())
    TORCH_CHECK_VALUE(false, "vitk::", op, ": ", limit, ", and no other backend is loaded in this process");
  TORCH_CHECK(false, "vitk::", op, ": backend '", backend_name(forced), "' was forced (use_backend or VITK_BACKEND), ",
              "but only the C++ kernels are loaded in this process: import vitkernels to reach the other backends");
}

}  // namespace detail
}  // namespace vitk
