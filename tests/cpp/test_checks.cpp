// vitk/checks.h is what turns a bad call into "codebook: expected ..." instead of a crash or a
// shape error from deep inside ATen. Each helper must accept good input silently and, for bad
// input, throw c10::Error whose message starts with the argument's name and states what was
// expected and what was got. Python tests match these messages, so their wording is contract.
#include "vitk/checks.h"

#include <ATen/ops/empty.h>

#include <string>
#include <vector>

#include "vitk_test.h"

namespace {

at::Tensor cpu(at::IntArrayRef shape, at::ScalarType dtype = at::kFloat) {
  return at::empty(shape, at::TensorOptions().dtype(dtype));
}

// The meta device stands in for "another device" on a CPU-only machine: a real non-CPU device
// type, with no storage to allocate.
at::Tensor meta(at::IntArrayRef shape, at::ScalarType dtype = at::kFloat) {
  return at::empty(shape, at::TensorOptions().dtype(dtype).device(at::kMeta));
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

}  // namespace

TEST(dtype_list_is_readable) {
  REQUIRE_EQ(vitk::dtype_list({at::kFloat, at::kHalf, at::kBFloat16}), std::string("Float, Half, BFloat16"));
  REQUIRE_EQ(vitk::dtype_list({at::kLong}), std::string("Long"));
  REQUIRE_EQ(vitk::dtype_list({}), std::string(""));
}

TEST(check_defined) {
  REQUIRE_NO_THROW(vitk::check_defined(cpu({2}), "z"));
  std::string m = REQUIRE_THROWS(c10::Error, vitk::check_defined(at::Tensor(), "z"));
  REQUIRE(starts_with(m, "z: "), m);
  REQUIRE_CONTAINS(m, "expected a tensor");
  REQUIRE_CONTAINS(m, "None");
}

TEST(check_dtype_in) {
  for (auto ok : {at::kFloat, at::kHalf, at::kBFloat16})
    REQUIRE_NO_THROW(vitk::check_dtype_in(cpu({2, 3}, ok), "z", {at::kFloat, at::kHalf, at::kBFloat16}));

  std::string m = REQUIRE_THROWS(
      c10::Error, vitk::check_dtype_in(cpu({2, 3}, at::kInt), "z", {at::kFloat, at::kHalf, at::kBFloat16}));
  REQUIRE(starts_with(m, "z: "), m);
  REQUIRE_CONTAINS(m, "expected dtype in {Float, Half, BFloat16}");
  REQUIRE_CONTAINS(m, "got Int");

  m = REQUIRE_THROWS(c10::Error, vitk::check_dtype_in(cpu({4}, at::kFloat), "indices", {at::kLong}));
  REQUIRE(starts_with(m, "indices: "), m);
  REQUIRE_CONTAINS(m, "{Long}");
  REQUIRE_CONTAINS(m, "got Float");
}

TEST(check_dtype_in_rejects_undefined_by_name) {
  // Not a segfault and not ATen's generic message: the caller's argument name.
  std::string m = REQUIRE_THROWS(c10::Error, vitk::check_dtype_in(at::Tensor(), "codebook", {at::kFloat}));
  REQUIRE(starts_with(m, "codebook: "), m);
  REQUIRE_CONTAINS(m, "expected a tensor");
}

TEST(check_same_dtype) {
  REQUIRE_NO_THROW(vitk::check_same_dtype(cpu({2}, at::kHalf), "z", cpu({3, 4}, at::kHalf), "codebook"));
  std::string m =
      REQUIRE_THROWS(c10::Error, vitk::check_same_dtype(cpu({2}, at::kHalf), "z", cpu({3}, at::kFloat), "codebook"));
  // The second argument is the one blamed; the first is the reference it should match.
  REQUIRE(starts_with(m, "codebook: "), m);
  REQUIRE_CONTAINS(m, "same dtype as z (Half)");
  REQUIRE_CONTAINS(m, "got Float");
}

TEST(check_same_device) {
  REQUIRE_NO_THROW(vitk::check_same_device(cpu({2}), "z", cpu({3}), "codebook"));
  REQUIRE_NO_THROW(vitk::check_same_device(meta({2}), "z", meta({3}), "codebook"));
  std::string m = REQUIRE_THROWS(c10::Error, vitk::check_same_device(cpu({2}), "z", meta({3}), "codebook"));
  REQUIRE(starts_with(m, "codebook: "), m);
  REQUIRE_CONTAINS(m, "z's device (cpu)");
  REQUIRE_CONTAINS(m, "got one on meta");
}

TEST(check_device_type) {
  REQUIRE_NO_THROW(vitk::check_device_type(cpu({2}), "z", c10::DeviceType::CPU));
  std::string m = REQUIRE_THROWS(c10::Error, vitk::check_device_type(meta({2}), "z", c10::DeviceType::CPU));
  REQUIRE(starts_with(m, "z: "), m);
  REQUIRE_CONTAINS(m, "expected a cpu tensor");
  REQUIRE_CONTAINS(m, "meta");

  // The CUDA entry points use the same check; the message must name CUDA even on a CPU-only build.
  m = REQUIRE_THROWS(c10::Error, vitk::check_device_type(cpu({2}), "indices", c10::DeviceType::CUDA));
  REQUIRE(starts_with(m, "indices: "), m);
  REQUIRE_CONTAINS(m, "expected a cuda tensor");
  REQUIRE_CONTAINS(m, "got one on cpu");
}

TEST(check_dim_in) {
  for (int64_t d = 2; d <= 3; ++d) {
    std::vector<int64_t> shape(d, 2);
    REQUIRE_NO_THROW(vitk::check_dim_in(cpu(shape), "codebook", 2, 3));
  }
  REQUIRE_NO_THROW(vitk::check_dim_in(cpu({4, 5}), "codebook", 2, 2));
  REQUIRE_NO_THROW(vitk::check_dim_in(cpu({}), "scalar", 0, 0));

  std::string m = REQUIRE_THROWS(c10::Error, vitk::check_dim_in(cpu({7}), "codebook", 2, 3));
  REQUIRE(starts_with(m, "codebook: "), m);
  REQUIRE_CONTAINS(m, "expected 2 to 3 dimensions");
  REQUIRE_CONTAINS(m, "got shape [7]");

  m = REQUIRE_THROWS(c10::Error, vitk::check_dim_in(cpu({1, 2, 3, 4}), "codebook", 2, 3));
  REQUIRE_CONTAINS(m, "got shape [1, 2, 3, 4]");

  // lo == hi reads as one number, not "2 to 2".
  m = REQUIRE_THROWS(c10::Error, vitk::check_dim_in(cpu({7}), "z", 2, 2));
  REQUIRE(starts_with(m, "z: "), m);
  REQUIRE_CONTAINS(m, "expected 2 dimensions");
}

TEST(check_nonempty_dim) {
  REQUIRE_NO_THROW(vitk::check_nonempty_dim(cpu({7, 3}), "codebook", 0, "code"));
  REQUIRE_NO_THROW(vitk::check_nonempty_dim(cpu({7, 3}), "codebook", -1, "feature"));

  std::string m = REQUIRE_THROWS(c10::Error, vitk::check_nonempty_dim(cpu({0, 3}), "codebook", 0, "code"));
  REQUIRE(starts_with(m, "codebook: "), m);
  REQUIRE_CONTAINS(m, "non-empty code dimension");
  REQUIRE_CONTAINS(m, "got shape [0, 3]");

  m = REQUIRE_THROWS(c10::Error, vitk::check_nonempty_dim(cpu({5, 0}), "z", -1, "feature"));
  REQUIRE(starts_with(m, "z: "), m);
  REQUIRE_CONTAINS(m, "non-empty feature dimension");
  REQUIRE_CONTAINS(m, "[5, 0]");
}

int main(int argc, char** argv) { return vitk_test::run_all(argc, argv); }
