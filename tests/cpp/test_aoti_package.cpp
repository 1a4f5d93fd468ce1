// A model with vitk ops, exported by torch.export and packaged by AOTInductor in Python
// (tests/export/aoti_model.py), run from C++ alone: libtorch, this library and the package, no
// Python interpreter. Every vitk op the package calls must therefore reach its C++ kernel through
// the dispatcher with nothing registered from Python (the Python router's vitk_route twins are
// absent here). Usage: test_aoti_package DIR (DIR holds model.pt2, input.pt, expected.pt).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

at::Tensor load_tensor(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return torch::pickle_load(bytes).toTensor();
}

int fail(const std::string& what) {
  std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return fail("usage: test_aoti_package DIR");
  const std::string dir = argv[1];
  auto& dispatcher = c10::Dispatcher::singleton();
  for (const char* op : {"vitk::window_attention_fwd", "vitk::polyline_attention_fwd", "vitk::reduced_attention_fwd"}) {
    const auto handle = dispatcher.findOp(c10::OperatorName(op, ""));
    if (!handle || !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU))
      return fail(std::string(op) + " has no CPU kernel in a C++-only process");
  }
  if (dispatcher.findOp(c10::OperatorName("vitk_route::window_attention_fwd", "")))
    return fail("the Python router is registered, so this is not a C++-only process");

  const at::Tensor x = load_tensor(dir + "/input.pt");
  const at::Tensor expected = load_tensor(dir + "/expected.pt");
  torch::inductor::AOTIModelPackageLoader loader(dir + "/model.pt2");
  c10::InferenceMode no_grad;
  const std::vector<at::Tensor> out = loader.run({x});
  if (out.size() != 1) return fail("expected one output, got " + std::to_string(out.size()));
  if (!out[0].sizes().equals(expected.sizes())) return fail("output shape differs from the eager model's");
  const double err = (out[0] - expected).abs().max().item<double>();
  std::printf("AOTInductor package run from C++: output %s, max |error| vs eager %.3g\n",
              c10::str(out[0].sizes()).c_str(), err);
  // Inductor fuses the surrounding ops in another order than eager: fp32 rounding only.
  if (!(err <= 1e-4)) return fail("output differs from the eager model's by " + std::to_string(err));
  return 0;
}
