// What the lowbit CPU kernels share on the ATen side: argument checks, rows of x read in place
// through any leading strides, fp32 staging rows stored into the output dtype.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "vitk/checks.h"
#include "vitk/lowbit_kernels.h"

namespace vitk {
namespace cpu {
namespace lowbit_detail {

using lowbit::Act;

inline Act parse_activation(c10::string_view a) {
  if (a == "none") return Act::kNone;
  if (a == "relu") return Act::kRelu;
  if (a == "gelu") return Act::kGelu;
  if (a == "gelu_tanh") return Act::kGeluTanh;
  TORCH_CHECK_VALUE(false, "activation: expected one of none, relu, gelu, gelu_tanh, got '", std::string(a), "'");
}

// x [..., K] with K >= 1, on the CPU, its last dimension contiguous (a copy is made otherwise).
inline at::Tensor rows_of(const at::Tensor& x, const char* name, std::initializer_list<at::ScalarType> dtypes) {
  check_dtype_in(x, name, dtypes);
  check_device_type(x, name, c10::DeviceType::CPU);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, name, ": expected shape [..., K] with K >= 1, got ", x.sizes());
  return x.stride(-1) == 1 ? x : x.contiguous();
}

// Element offset of each of the M = prod(x.shape[:-1]) rows.
inline std::vector<int64_t> row_offsets(const at::Tensor& x) {
  const int64_t lead = x.dim() - 1;
  int64_t M = 1;
  for (int64_t d = 0; d < lead; ++d) M *= x.size(d);
  std::vector<int64_t> off(M);
  std::vector<int64_t> idx(lead, 0);
  int64_t cur = 0;
  for (int64_t m = 0; m < M; ++m) {
    off[m] = cur;
    for (int64_t d = lead - 1; d >= 0; --d) {
      if (++idx[d] < x.size(d)) {
        cur += x.stride(d);
        break;
      }
      cur -= (x.size(d) - 1) * x.stride(d);
      idx[d] = 0;
    }
  }
  return off;
}

template <typename T>
inline void to_f32(const T* src, int64_t K, float* dst) {
  for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<float>(src[k]);
}

// Row m of x as fp32 in dst (K values).
inline void load_row(const at::Tensor& x, int64_t offset, int64_t K, float* dst) {
  switch (x.scalar_type()) {
    case at::kFloat: std::memcpy(dst, x.const_data_ptr<float>() + offset, K * sizeof(float)); break;
    case at::kBFloat16: to_f32(x.const_data_ptr<c10::BFloat16>() + offset, K, dst); break;
    case at::kHalf: to_f32(x.const_data_ptr<c10::Half>() + offset, K, dst); break;
    default: TORCH_CHECK(false, "x: unsupported dtype ", x.scalar_type());
  }
}

// A contiguous [M, N] output, its pointer and dtype read once: data_ptr checks the dtype at every
// call, which cost more than the store itself in tiles of a small K.
struct OutRows {
  void* base;
  int64_t ld;
  at::ScalarType type;
  explicit OutRows(at::Tensor& out) : base(out.data_ptr()), ld(out.size(-1)), type(out.scalar_type()) {}
};

// Whether whole 16-channel rows of a fp32 output go straight to memory (non-temporal stores, then an
// sfence before the task ends): for an output this large, stores that first read each line for
// ownership took longer than the GEMM (Swin-T stage 1 fc1, 38.5 MB: 7.1 against 5.1 ms, and the fc2
// that reads it back, 5.1 against 5.4 ms). Rows must be 64-byte aligned.
inline bool stream_rows(const OutRows& out, int64_t M) {
  constexpr int64_t kStreamBytes = int64_t(16) << 20;
  return out.type == at::kFloat && reinterpret_cast<uintptr_t>(out.base) % 64 == 0 && out.ld % 16 == 0 &&
         M * out.ld * static_cast<int64_t>(sizeof(float)) >= kStreamBytes;
}

// n values of src into row `row` of the output, columns [n0, n0 + n).
inline void store(const OutRows& out, int64_t row, int64_t n0, const float* src, int64_t n) {
  const int64_t at_ = row * out.ld + n0;
  switch (out.type) {
    case at::kFloat: std::memcpy(static_cast<float*>(out.base) + at_, src, n * sizeof(float)); break;
    case at::kBFloat16: {
      auto* d = static_cast<c10::BFloat16*>(out.base) + at_;
      for (int64_t i = 0; i < n; ++i) d[i] = c10::BFloat16(src[i]);
      break;
    }
    default: {
      auto* d = static_cast<c10::Half*>(out.base) + at_;
      for (int64_t i = 0; i < n; ++i) d[i] = c10::Half(src[i]);
    }
  }
}

#if defined(__AVX512F__)
// 16 finished values of row `row`, columns [n0, n0 + valid): a whole fp32 row of 16 goes out as one
// vector (a streaming store when `stream`, see stream_rows), anything else through store().
inline void store16(const OutRows& out, bool stream, int64_t row, int64_t n0, const float* v, int valid) {
  if (out.type != at::kFloat || valid != 16) {
    store(out, row, n0, v, valid);
    return;
  }
  float* at_ = static_cast<float*>(out.base) + row * out.ld + n0;
  if (stream)
    _mm512_stream_ps(at_, _mm512_loadu_ps(v));
  else
    _mm512_storeu_ps(at_, _mm512_loadu_ps(v));
}
#endif

// A per-channel vector ([N], any float dtype) as contiguous fp32, or undefined when absent.
inline at::Tensor channel_vector(const std::optional<at::Tensor>& t, const char* name, int64_t N, const at::Tensor& x,
                                 bool fp32_only = false) {
  if (!t.has_value() || !t->defined()) return {};
  if (fp32_only)
    check_dtype_in(*t, name, {at::kFloat});
  else
    check_dtype_in(*t, name, {at::kFloat, at::kBFloat16, at::kHalf});
  check_same_device(x, "x", *t, name);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == N, name, ": expected shape [N] = [", N, "], got ", t->sizes());
  return t->to(at::kFloat).contiguous();
}

inline const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

inline std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = N;
  return s;
}

// Calls f.template operator()<R>() with the compile-time R equal to the run-time r in [R0, RMAX]: the
// micro-tiles are templates over their shape, and a tile at the edge of the problem is a smaller one.
template <int R0, int RMAX, class F>
inline void with_rows(int r, F&& f) {
  if constexpr (R0 < RMAX) {
    if (r != R0) return with_rows<R0 + 1, RMAX>(r, f);
  }
  f.template operator()<R0>();
}

// The same over a two-dimensional tile shape: f.template operator()<MR, NR>().
template <int MRMAX, int NRMAX, class F>
inline void with_tile(int mr, int nr, F&& f) {
  with_rows<1, MRMAX>(mr, [&]<int MR>() { with_rows<1, NRMAX>(nr, [&]<int NR>() { f.template operator()<MR, NR>(); }); });
}

// The GEMMs' work split: tasks of (panel of output channels, range of task_rows rows), panel-major,
// run in parallel over both. Each thread's contiguous range of tasks mostly shares panels: it makes one
// worker (make_worker(), holding its scratch) and calls worker(panel, m0, m1, new_panel), told when the
// panel changed (to decode that panel's weights once per thread, not once per task).
template <class Make>
inline void for_each_panel_task(int64_t panels, int64_t M, int64_t task_rows, Make&& make_worker) {
  const int64_t m_tasks = (M + task_rows - 1) / task_rows;
  at::parallel_for(0, panels * m_tasks, 1, [&](int64_t t0, int64_t t1) {
    auto fn = make_worker();
    int64_t last = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t panel = t / m_tasks, mt = t % m_tasks;
      fn(panel, mt * task_rows, std::min(M, (mt + 1) * task_rows), panel != last);
      last = panel;
    }
  });
}

// w_packed [N, K/2] uint8 of 4-bit codes for x's K.
inline void check_packed4(const at::Tensor& w, const at::Tensor& x, int64_t K) {
  check_dtype_in(w, "w_packed", {at::kByte});
  check_same_device(x, "x", w, "w_packed");
  TORCH_CHECK_VALUE(K % 2 == 0, "x: expected an even last dimension K for 4-bit packed weights, got K=", K);
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == K / 2, "w_packed: expected shape [N, K/2] = [N, ", K / 2,
                    "] (two 4-bit codes per byte), got ", w.sizes());
}

// The arguments every op on float x and packed 4-bit weights starts from, checked.
struct Packed4Args {
  at::Tensor x;   // [..., K], last dimension contiguous
  Act act;
  int64_t K, N;
  Packed4Args(const at::Tensor& x_in, const at::Tensor& w_packed, c10::string_view activation)
      : x(rows_of(x_in, "x", {at::kFloat, at::kBFloat16, at::kHalf})), act(parse_activation(activation)),
        K(x.size(-1)), N(0) {
    check_packed4(w_packed, x, K);
    N = w_packed.size(0);
  }
};

}  // namespace lowbit_detail
}  // namespace cpu
}  // namespace vitk
