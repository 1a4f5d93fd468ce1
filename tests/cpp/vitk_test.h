// A minimal test harness for the C++ unit tests: no GoogleTest on the CI machine, and these tests
// need little more than "check, say where and with which values, go on to the next case".
//
//   TEST(name) { REQUIRE(cond, "context", value); REQUIRE_EQ(a, b, ...);
//                std::string msg = REQUIRE_THROWS(c10::Error, expr); REQUIRE_CONTAINS(msg, "z:"); }
//   int main(int argc, char** argv) { return vitk_test::run_all(argc, argv); }
//
// Torch-free, so header-only code (tiling.h) is tested without paying for libtorch's headers.
// A failed check ends its test case: in the exhaustive loops one wrong helper would otherwise
// print thousands of lines, and the first failure with its loop variables is the useful one.
#pragma once

#include <cstdio>
#include <cstring>
#include <exception>
#include <sstream>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

namespace vitk_test {

struct Case {
  const char* name;
  void (*fn)();
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

struct Register {
  Register(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

// Thrown by a failed check; not derived from std::exception so a test's own catch clauses for
// library errors cannot swallow it.
struct Failure {};

template <class... Ts>
std::string cat(const Ts&... parts) {
  std::ostringstream os;
  ((os << parts), ...);
  return os.str();
}

[[noreturn]] inline void fail(const char* file, int line, const std::string& what, const std::string& context) {
  std::fprintf(stderr, "  %s:%d: %s%s%s\n", file, line, what.c_str(), context.empty() ? "" : "\n    context: ",
               context.c_str());
  throw Failure{};
}

// c10::Error::what() carries a backtrace; prefer the bare message when the type offers one.
template <class E, class = void>
struct HasBareMessage : std::false_type {};
template <class E>
struct HasBareMessage<E, std::void_t<decltype(std::declval<const E&>().what_without_backtrace())>>
    : std::true_type {};

template <class E>
std::string message_of(const E& e) {
  if constexpr (HasBareMessage<E>::value)
    return e.what_without_backtrace();
  else
    return e.what();
}

// Runs f, which must throw E; returns E's message for further checks.
template <class E, class F>
std::string expect_throw(F&& f, const char* expr, const char* type, const char* file, int line) {
  try {
    f();
  } catch (const E& e) {
    return message_of(e);
  } catch (const Failure&) {
    throw;
  } catch (const std::exception& e) {
    fail(file, line, cat("expected ", type, " from `", expr, "`, got ", typeid(e).name(), ": ", e.what()), "");
  }
  fail(file, line, cat("expected ", type, " from `", expr, "`, nothing was thrown"), "");
}

template <class F>
void expect_no_throw(F&& f, const char* expr, const char* file, int line) {
  try {
    f();
  } catch (const Failure&) {
    throw;
  } catch (const std::exception& e) {
    fail(file, line, cat("`", expr, "` threw: ", message_of(e)), "");
  }
}

inline int run_all(int argc, char** argv) {
  // An optional argument selects the cases whose name contains it, for running one from a debugger.
  const char* filter = argc > 1 ? argv[1] : nullptr;
  int passed = 0, failed = 0;
  for (const Case& c : registry()) {
    if (filter && !std::strstr(c.name, filter)) continue;
    bool ok = false;
    std::fprintf(stderr, "[ RUN  ] %s\n", c.name);
    try {
      c.fn();
      ok = true;
    } catch (const Failure&) {
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  uncaught %s: %s\n", typeid(e).name(), message_of(e).c_str());
    } catch (...) {
      std::fprintf(stderr, "  uncaught non-std exception\n");
    }
    std::fprintf(stderr, "[ %s ] %s\n", ok ? " OK " : "FAIL", c.name);
    (ok ? passed : failed)++;
  }
  std::fprintf(stderr, "%d passed, %d failed\n", passed, failed);
  return (failed == 0 && passed > 0) ? 0 : 1;
}

}  // namespace vitk_test

#define TEST(name)                                                 \
  static void name();                                              \
  static const ::vitk_test::Register name##_registered_(#name, &name); \
  static void name()

// Not CHECK/CHECK_EQ: c10's logging header defines those. Every REQUIRE is fatal to its case.
// The trailing arguments, if any, are streamed into a context line (loop variables, shapes).
#define REQUIRE(cond, ...)                                                                   \
  do {                                                                                       \
    if (!(cond))                                                                             \
      ::vitk_test::fail(__FILE__, __LINE__, "REQUIRE(" #cond ") failed", ::vitk_test::cat(__VA_ARGS__)); \
  } while (0)

#define REQUIRE_EQ(a, b, ...)                                                                \
  do {                                                                                       \
    const auto& vitk_a_ = (a);                                                               \
    const auto& vitk_b_ = (b);                                                               \
    if (!(vitk_a_ == vitk_b_))                                                               \
      ::vitk_test::fail(__FILE__, __LINE__,                                                  \
                        ::vitk_test::cat("REQUIRE_EQ(" #a ", " #b "): ", vitk_a_, " != ", vitk_b_), \
                        ::vitk_test::cat(__VA_ARGS__));                                      \
  } while (0)

#define REQUIRE_CONTAINS(text, fragment, ...)                                                \
  do {                                                                                       \
    const std::string vitk_t_ = (text);                                                      \
    const std::string vitk_f_ = (fragment);                                                  \
    if (vitk_t_.find(vitk_f_) == std::string::npos)                                          \
      ::vitk_test::fail(__FILE__, __LINE__,                                                  \
                        ::vitk_test::cat("expected \"", vitk_f_, "\" in \"", vitk_t_, "\""), \
                        ::vitk_test::cat(__VA_ARGS__));                                      \
  } while (0)

// Evaluates to the exception's message, for REQUIRE_CONTAINS.
#define REQUIRE_THROWS(ExcType, expr) \
  ::vitk_test::expect_throw<ExcType>([&]() { (void)(expr); }, #expr, #ExcType, __FILE__, __LINE__)

#define REQUIRE_NO_THROW(expr) ::vitk_test::expect_no_throw([&]() { (void)(expr); }, #expr, __FILE__, __LINE__)
