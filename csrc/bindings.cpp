// The Python module vitkernels._C. Loading it registers every op (schemas, C++ kernels, composites);
// the module itself only adds what Python needs besides torch.ops.vitk: the build metadata checked at
// import, and the calling thread's forced backend (vitkernels.use_backend), which the C++ kernels
// read on every call (vitk/registration.h). Kernels run through torch.ops.vitk.*, which releases
// the GIL around them.
// Only pybind11 and the torch version: the ops register from the kernels' own translation units,
// and torch/extension.h would make this file the slowest of the build to compile.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include "vitk/backend_choice.h"

namespace py = pybind11;

#ifndef VITK_CPU_ARCH
#define VITK_CPU_ARCH "unknown"
#endif

namespace {

py::dict build_info() {
  py::dict d;
  d["torch_version"] = TORCH_VERSION;
  d["cpu_arch"] = VITK_CPU_ARCH;
#ifdef __AVX512F__
  d["avx512f"] = true;
#else
  d["avx512f"] = false;
#endif
#ifdef VITK_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vitkernels compiled library (its ops are torch.ops.vitk.*)";
  m.def("build_info", &build_info);
  m.def("set_thread_backend", &vitk::set_thread_backend, py::arg("code"),
        "Sets this thread's forced backend (-1: none, 0: automatic, 1: cpu, 2: cuda, 3: triton); returns the "
        "previous one.");
  m.def(
      "forced_backend", [] { return static_cast<int>(vitk::forced_backend()); },
      "This thread's forced backend code (0: none), from use_backend or VITK_BACKEND.");
}
