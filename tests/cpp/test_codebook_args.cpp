// The codebook CPU entry points (vitk/codebook.h) called directly, below the Python layer: every
// bad argument must be refused with a c10::Error naming the offending argument (as checks.h
// formats it, "name: expected ..."), before any kernel reads memory out of bounds; and a tiny
// brute-force comparison catches a kernel that compiles but answers wrongly.
#include "vitk/codebook.h"

#include <ATen/ops/empty.h>

#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "vitk_test.h"

using vitk::cpu::codebook_argmin;
using vitk::cpu::codebook_lookup;
using vitk::cpu::codebook_lookup_backward;

namespace {

at::Tensor empty(at::IntArrayRef shape, at::ScalarType dtype = at::kFloat) {
  return at::empty(shape, at::TensorOptions().dtype(dtype));
}

// Filled from a fixed std::mt19937, so the cases are the same on every machine and torch version.
at::Tensor randn(at::IntArrayRef shape, uint32_t seed) {
  at::Tensor t = empty(shape);
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist;
  float* p = t.data_ptr<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = dist(gen);
  return t;
}

at::Tensor longs(at::IntArrayRef shape, std::initializer_list<int64_t> values) {
  at::Tensor t = empty(shape, at::kLong);
  std::memcpy(t.data_ptr<int64_t>(), values.begin(), values.size() * sizeof(int64_t));
  return t;
}

std::string shape_of(const at::Tensor& t) { return vitk_test::cat(t.sizes()); }

// True when `name:` occurs as a whole word, so "z:" is not found inside "size:" and "codebook:"
// not inside "codebook_shape:".
bool names(const std::string& msg, const std::string& name) {
  const std::string key = name + ":";
  for (size_t at = msg.find(key); at != std::string::npos; at = msg.find(key, at + 1)) {
    char before = at == 0 ? ' ' : msg[at - 1];
    if (!(std::isalnum(static_cast<unsigned char>(before)) || before == '_')) return true;
  }
  return false;
}

}  // namespace

// Either of several arguments may fairly be blamed (a D mismatch is z's or the codebook's); the
// message must blame one of them by name.
#define REQUIRE_BLAMES(expr, ...)                                                                  \
  do {                                                                                           \
    const std::string vitk_msg_ = REQUIRE_THROWS(c10::Error, expr);                                \
    bool vitk_named_ = false;                                                                    \
    for (const char* n : {__VA_ARGS__}) vitk_named_ = vitk_named_ || names(vitk_msg_, n);        \
    REQUIRE(vitk_named_, "message of `" #expr "` names none of {" #__VA_ARGS__ "}: ", vitk_msg_); \
  } while (0)

// ---- bad arguments ----------------------------------------------------------------------------

TEST(argmin_rejects_feature_dim_mismatch) {
  REQUIRE_BLAMES(codebook_argmin(randn({5, 3}, 1), randn({7, 4}, 2), false, false), "z", "codebook");
  REQUIRE_BLAMES(codebook_argmin(randn({5, 3}, 1), randn({7, 4}, 2), true, false), "z", "codebook");
}

TEST(argmin_rejects_1d_codebook) { REQUIRE_BLAMES(codebook_argmin(randn({5, 3}, 1), randn({7}, 2), false, false), "codebook"); }

TEST(argmin_rejects_4d_codebook) {
  REQUIRE_BLAMES(codebook_argmin(randn({5, 2, 3}, 1), randn({1, 2, 7, 3}, 2), false, false), "codebook");
}

TEST(argmin_rejects_empty_codebook) {
  // K == 0 has no nearest code; returning index 0 would hand the lookup an out-of-range row.
  REQUIRE_BLAMES(codebook_argmin(randn({5, 3}, 1), empty({0, 3}), false, false), "codebook");
  REQUIRE_BLAMES(codebook_argmin(randn({5, 2, 3}, 1), empty({2, 0, 3}), false, false), "codebook");
}

TEST(argmin_rejects_integer_z) {
  REQUIRE_BLAMES(codebook_argmin(empty({5, 3}, at::kInt), randn({7, 3}, 2), false, false), "z");
}

TEST(argmin_rejects_mixed_dtypes) {
  REQUIRE_BLAMES(codebook_argmin(empty({5, 3}, at::kHalf), randn({7, 3}, 2), false, false), "z", "codebook");
}

TEST(argmin_rejects_group_mismatch) {
  // z [N, G=2, D] against a codebook of G=4 groups.
  REQUIRE_BLAMES(codebook_argmin(randn({5, 2, 3}, 1), randn({4, 7, 3}, 2), false, false), "z", "codebook");
}

TEST(argmin_rejects_undefined) {
  REQUIRE_BLAMES(codebook_argmin(at::Tensor(), randn({7, 3}, 2), false, false), "z");
  REQUIRE_BLAMES(codebook_argmin(randn({5, 3}, 1), at::Tensor(), false, false), "codebook");
}

TEST(lookup_rejects_out_of_range_indices) {
  at::Tensor cb = randn({7, 3}, 2);
  REQUIRE_BLAMES(codebook_lookup(longs({3}, {0, 7, 1}), cb), "indices");
  REQUIRE_BLAMES(codebook_lookup(longs({3}, {0, 1000000, 1}), cb), "indices");
}

TEST(lookup_rejects_negative_indices) {
  // Python-style wrap-around would hide a bug in the caller's argmin; the contract is to raise.
  REQUIRE_BLAMES(codebook_lookup(longs({3}, {0, -1, 1}), randn({7, 3}, 2)), "indices");
}

TEST(lookup_rejects_bad_codebook) {
  REQUIRE_BLAMES(codebook_lookup(longs({2}, {0, 1}), randn({7}, 2)), "codebook");
  REQUIRE_BLAMES(codebook_lookup(longs({2}, {0, 0}), empty({0, 3})), "codebook", "indices");
}

TEST(lookup_rejects_float_indices) {
  REQUIRE_BLAMES(codebook_lookup(empty({3}, at::kFloat), randn({7, 3}, 2)), "indices");
}

TEST(lookup_rejects_group_mismatch) {
  // indices [N, G=2] against a codebook of G=4 groups.
  REQUIRE_BLAMES(codebook_lookup(longs({1, 2}, {0, 1}), randn({4, 7, 3}, 2)), "indices", "codebook");
  // In range for K overall but not per group: K=7 per group, index 7 must still be refused.
  REQUIRE_BLAMES(codebook_lookup(longs({1, 2}, {0, 7}), randn({2, 7, 3}, 2)), "indices");
}

TEST(lookup_backward_rejects_bad_indices) {
  at::Tensor g = randn({3, 3}, 3);
  REQUIRE_BLAMES(codebook_lookup_backward(g, longs({3}, {0, 7, 1}), {7, 3}), "indices");
  REQUIRE_BLAMES(codebook_lookup_backward(g, longs({3}, {0, -1, 1}), {7, 3}), "indices");
}

TEST(lookup_backward_rejects_shape_mismatch) {
  at::Tensor idx = longs({3}, {0, 1, 2});
  REQUIRE_BLAMES(codebook_lookup_backward(randn({3, 4}, 3), idx, {7, 3}), "grad_output", "codebook_shape", "codebook");
  REQUIRE_BLAMES(codebook_lookup_backward(randn({4, 3}, 3), idx, {7, 3}), "grad_output", "indices");
  REQUIRE_BLAMES(codebook_lookup_backward(randn({3, 3}, 3), idx, {7}), "codebook_shape", "codebook");
}

// ---- correctness smoke test -------------------------------------------------------------------

namespace {

struct Nearest {
  int64_t index;
  double distance;
};

// Squared Euclidean distance (or 2 - 2 cos) in double, first minimum wins: the contract's tie rule.
Nearest brute_nearest(const float* z, const float* cb, int64_t K, int64_t D, bool cosine) {
  auto norm = [D](const float* v) {
    double s = 0;
    for (int64_t d = 0; d < D; ++d) s += double(v[d]) * v[d];
    return std::sqrt(s);
  };
  Nearest best{-1, std::numeric_limits<double>::infinity()};
  for (int64_t k = 0; k < K; ++k) {
    const float* c = cb + k * D;
    double dist = 0;
    if (cosine) {
      double dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += double(z[d]) * c[d];
      dist = 2.0 - 2.0 * dot / (norm(z) * norm(c));
    } else {
      for (int64_t d = 0; d < D; ++d) dist += (double(z[d]) - c[d]) * (double(z[d]) - c[d]);
    }
    if (dist < best.distance) best = {k, dist};
  }
  return best;
}

// Compares (indices, distances) for z [N, G, D] flattened against codebook [G, K, D] flattened.
void check_against_brute(const at::Tensor& z, const at::Tensor& cb, int64_t N, int64_t G, int64_t K, int64_t D,
                         bool cosine, const std::tuple<at::Tensor, at::Tensor>& got) {
  at::Tensor idx = std::get<0>(got).contiguous(), dist = std::get<1>(got).contiguous();
  REQUIRE(idx.scalar_type() == at::kLong, "indices dtype ", idx.scalar_type());
  REQUIRE(dist.scalar_type() == at::kFloat, "distances dtype ", dist.scalar_type());
  REQUIRE_EQ(idx.numel(), N * G);
  REQUIRE_EQ(dist.numel(), N * G);
  const float* zp = z.data_ptr<float>();
  const float* cp = cb.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t row = n * G + g;
      Nearest want = brute_nearest(zp + row * D, cp + g * K * D, K, D, cosine);
      int64_t got_idx = idx.data_ptr<int64_t>()[row];
      float got_dist = dist.data_ptr<float>()[row];
      REQUIRE(got_idx >= 0 && got_idx < K, "row ", row, " index ", got_idx);
      // Accept a different index only when it is a float-rounding near-tie with the true nearest.
      Nearest chosen = brute_nearest(zp + row * D, cp + g * K * D + got_idx * D, 1, D, cosine);
      REQUIRE(got_idx == want.index || chosen.distance - want.distance < 1e-5, "row ", row, " cosine=", cosine,
            " got index ", got_idx, " (", chosen.distance, "), want ", want.index, " (", want.distance, ")");
      REQUIRE(std::abs(got_dist - want.distance) <= 1e-4 * (1.0 + want.distance), "row ", row, " cosine=", cosine,
            " distance ", got_dist, " want ", want.distance);
    }
}

}  // namespace

TEST(argmin_matches_brute_force) {
  const int64_t N = 5, K = 7, D = 3;
  at::Tensor z = randn({N, D}, 11), cb = randn({K, D}, 12);
  for (bool cosine : {false, true})
    for (bool exact : {false, true}) {
      auto got = codebook_argmin(z, cb, cosine, exact);
      REQUIRE_EQ(shape_of(std::get<0>(got)), std::string("[5]"));
      REQUIRE_EQ(shape_of(std::get<1>(got)), std::string("[5]"));
      check_against_brute(z, cb, N, 1, K, D, cosine, got);
    }
  // Leading batch dims are kept: z [..., D] -> indices [...].
  auto got = codebook_argmin(z.view({1, N, D}), cb, false, false);
  REQUIRE_EQ(shape_of(std::get<0>(got)), std::string("[1, 5]"));
  check_against_brute(z, cb, N, 1, K, D, false, got);
}

TEST(argmin_grouped_matches_brute_force) {
  const int64_t N = 5, G = 2, K = 7, D = 3;
  at::Tensor z = randn({N, G, D}, 21), cb = randn({G, K, D}, 22);
  for (bool exact : {false, true}) {
    auto got = codebook_argmin(z, cb, false, exact);
    REQUIRE_EQ(shape_of(std::get<0>(got)), std::string("[5, 2]"));
    check_against_brute(z, cb, N, G, K, D, false, got);
  }
}

// Zero-sized problems return empty outputs without planning a search (the plan divides by N and
// G), K = 1 and D = 1 search normally, and an empty code dimension is refused like the Python check.
TEST(argmin_degenerate_sizes) {
  for (bool cosine : {false, true})
    for (bool exact : {false, true}) {
      auto g0 = codebook_argmin(randn({5, 0, 4}, 1), empty({0, 10, 4}), cosine, exact);
      REQUIRE_EQ(shape_of(std::get<0>(g0)), std::string("[5, 0]"));
      auto n0 = codebook_argmin(empty({0, 2, 4}), randn({2, 10, 4}, 2), cosine, exact);
      REQUIRE_EQ(shape_of(std::get<1>(n0)), std::string("[0, 2]"));
      auto k1 = codebook_argmin(randn({9, 1}, 3), randn({1, 1}, 4), cosine, exact);
      for (int64_t i = 0; i < 9; ++i) REQUIRE_EQ(std::get<0>(k1).data_ptr<int64_t>()[i], int64_t{0});
      check_against_brute(randn({33, 1}, 5), randn({40, 1}, 6), 33, 1, 40, 1, cosine,
                          codebook_argmin(randn({33, 1}, 5), randn({40, 1}, 6), cosine, exact));
      REQUIRE_BLAMES(codebook_argmin(empty({4, 0}), empty({9, 0}), cosine, exact), "codebook");
    }
}

TEST(argmin_ties_go_to_the_lowest_index) {
  at::Tensor cb = randn({7, 3}, 31);
  float* c = cb.data_ptr<float>();
  std::memcpy(c + 5 * 3, c + 2 * 3, 3 * sizeof(float));  // rows 2 and 5 identical
  at::Tensor z = empty({1, 3});
  std::memcpy(z.data_ptr<float>(), c + 2 * 3, 3 * sizeof(float));
  for (bool exact : {false, true}) {
    auto got = codebook_argmin(z, cb, false, exact);
    REQUIRE_EQ(std::get<0>(got).contiguous().data_ptr<int64_t>()[0], int64_t{2});
  }
}

TEST(lookup_and_backward_match_brute_force) {
  const int64_t K = 7, D = 3;
  at::Tensor cb = randn({K, D}, 41);
  at::Tensor idx = longs({5}, {3, 0, 6, 3, 1});
  at::Tensor out = codebook_lookup(idx, cb).contiguous();
  REQUIRE_EQ(shape_of(out), std::string("[5, 3]"));
  for (int64_t n = 0; n < 5; ++n)
    for (int64_t d = 0; d < D; ++d)
      REQUIRE_EQ(out.data_ptr<float>()[n * D + d], cb.data_ptr<float>()[idx.data_ptr<int64_t>()[n] * D + d],
               "n=", n, " d=", d);

  at::Tensor grad = randn({5, D}, 42);
  at::Tensor gcb = codebook_lookup_backward(grad, idx, {K, D}).contiguous();
  REQUIRE_EQ(shape_of(gcb), std::string("[7, 3]"));
  std::vector<double> want(K * D, 0.0);
  for (int64_t n = 0; n < 5; ++n)
    for (int64_t d = 0; d < D; ++d) want[idx.data_ptr<int64_t>()[n] * D + d] += grad.data_ptr<float>()[n * D + d];
  for (int64_t i = 0; i < K * D; ++i)
    REQUIRE(std::abs(gcb.data_ptr<float>()[i] - want[i]) < 1e-5, "i=", i, " got ", gcb.data_ptr<float>()[i], " want ",
          want[i]);
}

TEST(lookup_grouped_matches_brute_force) {
  const int64_t G = 2, K = 7, D = 3;
  at::Tensor cb = randn({G, K, D}, 51);
  at::Tensor idx = longs({3, G}, {6, 0, 1, 1, 0, 6});
  at::Tensor out = codebook_lookup(idx, cb).contiguous();
  REQUIRE_EQ(shape_of(out), std::string("[3, 2, 3]"));
  for (int64_t n = 0; n < 3; ++n)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d)
        REQUIRE_EQ(out.data_ptr<float>()[(n * G + g) * D + d],
                 cb.data_ptr<float>()[(g * K + idx.data_ptr<int64_t>()[n * G + g]) * D + d], "n=", n, " g=", g);
}

int main(int argc, char** argv) { return vitk_test::run_all(argc, argv); }
