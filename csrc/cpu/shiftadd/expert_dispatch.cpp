// CPU kernels of the token dispatch around ShiftAddViT's mixture of experts: a stable counting sort
// of the tokens by expert (expert_dispatch), its inverse scatter times the gate (expert_combine), and
// the latter's backward.
//
// The tokens are cut into fixed chunks, so the result never depends on the thread count: each chunk
// counts its tokens per expert, the counts give every (chunk, expert) its first slot (experts in
// order, chunks in order within an expert), and each chunk then places its own tokens in token order.
// The rows are then copied in parallel; no row is written twice.
#include "common.h"

namespace vitk {
namespace cpu {
namespace {

using shiftadd_detail::Acc;

constexpr int64_t kChunk = 8192;
constexpr int64_t kRowGrain = 64;

void check_rows(const at::Tensor& t, const char* name) {
  check_dtype_in(t, name, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_device_type(t, name, c10::DeviceType::CPU);
  TORCH_CHECK_VALUE(t.dim() == 2, name, ": expected 2 dimensions [T, C], got shape ", t.sizes());
}

void check_index(const at::Tensor& idx, const char* name, const at::Tensor& x, const char* x_name) {
  check_dtype_in(idx, name, {at::kLong});
  check_same_device(x, x_name, idx, name);
  TORCH_CHECK_VALUE(idx.dim() == 1 && idx.size(0) == x.size(0), name, ": expected shape [T] = [", x.size(0),
                    "] (", x_name, "'s rows), got ", idx.sizes());
}

// Copies rows: dst[i] = src[rows[i]] (times scale[rows[i]] when given), dst contiguous [T, C].
template <typename T, typename G>
void gather_rows(const at::Tensor& src, const int64_t* rows, const G* scale, int64_t scale_stride, T* dst) {
  using A = Acc<T>;
  const T* s = src.data_ptr<T>();
  const int64_t T_ = src.size(0), C = src.size(1), rs = src.stride(0), cs = src.stride(1);
  at::parallel_for(0, T_, kRowGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T* r = s + rows[i] * rs;
      T* o = dst + i * C;
      if (scale == nullptr) {
        if (cs == 1) std::copy(r, r + C, o);
        else for (int64_t c = 0; c < C; ++c) o[c] = r[c * cs];
      } else {
        const A g = static_cast<A>(scale[rows[i] * scale_stride]);
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<T>(g * static_cast<A>(r[c * cs]));
      }
    }
  });
}

// The inverse of a permutation `order` of [0, T); refuses anything else by name.
std::vector<int64_t> inverse_of(const at::Tensor& order) {
  const int64_t T = order.size(0), st = order.stride(0);
  const int64_t* o = order.data_ptr<int64_t>();
  std::vector<int64_t> inv(T, -1);
  for (int64_t i = 0; i < T; ++i) {
    const int64_t t = o[i * st];
    TORCH_CHECK_INDEX(t >= 0 && t < T, "order: expected values in [0, ", T, "), got ", t);
    TORCH_CHECK_VALUE(inv[t] < 0, "order: expected a permutation of [0, ", T, "), got ", t, " twice");
    inv[t] = i;
  }
  return inv;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_dispatch(const at::Tensor& x, const at::Tensor& expert_index,
                                                               int64_t num_experts) {
  check_rows(x, "x");
  check_index(expert_index, "expert_index", x, "x");
  TORCH_CHECK_VALUE(num_experts >= 1, "num_experts: expected at least 1, got ", num_experts);
  const int64_t T = x.size(0), C = x.size(1), E = num_experts, st = expert_index.stride(0);
  const int64_t* idx = expert_index.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t e = idx[t * st];
    TORCH_CHECK_INDEX(e >= 0 && e < E, "expert_index: expected values in [0, ", E, "), got ", e);
  }
  at::Tensor offsets = at::empty({E + 1}, expert_index.options());
  at::Tensor order = at::empty({T}, expert_index.options());
  at::Tensor x_sorted = at::empty({T, C}, x.options());

  const int64_t chunks = ceil_div(T, kChunk);
  std::vector<int64_t> slot(chunks * E, 0);       // counts, then each (chunk, expert)'s first slot
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Range r = tile_range(T, kChunk, c);
      for (int64_t t = r.begin; t < r.end; ++t) ++slot[c * E + idx[t * st]];
    }
  });
  int64_t* off = offsets.data_ptr<int64_t>();
  int64_t next = 0;
  for (int64_t e = 0; e < E; ++e) {
    off[e] = next;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n = slot[c * E + e];
      slot[c * E + e] = next;
      next += n;
    }
  }
  off[E] = next;
  int64_t* ord = order.data_ptr<int64_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Range r = tile_range(T, kChunk, c);
      int64_t* pos = slot.data() + c * E;
      for (int64_t t = r.begin; t < r.end; ++t) ord[pos[idx[t * st]]++] = t;
    }
  });
  if (x_sorted.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "expert_dispatch", [&] {
      gather_rows<scalar_t, float>(x, ord, nullptr, 0, x_sorted.data_ptr<scalar_t>());
    });
  }
  return {x_sorted, offsets, order};
}

namespace {
void check_combine(const at::Tensor& y_sorted, const at::Tensor& order, const at::Tensor& gate) {
  check_rows(y_sorted, "y_sorted");
  check_index(order, "order", y_sorted, "y_sorted");
  check_dtype_in(gate, "gate", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_same_device(y_sorted, "y_sorted", gate, "gate");
  TORCH_CHECK_VALUE(gate.dim() == 1 && gate.size(0) == y_sorted.size(0), "gate: expected shape [T] = [",
                    y_sorted.size(0), "] (one gate per token, in token order), got ", gate.sizes());
}
}  // namespace

at::Tensor expert_combine(const at::Tensor& y_sorted, const at::Tensor& order, const at::Tensor& gate) {
  check_combine(y_sorted, order, gate);
  const std::vector<int64_t> inv = inverse_of(order);
  at::Tensor out = at::empty(y_sorted.sizes(), y_sorted.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_sorted.scalar_type(), "expert_combine", [&] {
    using Y = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "expert_combine_gate", [&] {
      // out[t] = gate[t] * y_sorted[inv[t]]: a gather in token order, each output row written once.
      const Y* ys = y_sorted.data_ptr<Y>();
      Y* o = out.data_ptr<Y>();
      const int64_t T = y_sorted.size(0), C = y_sorted.size(1), rs = y_sorted.stride(0), cs = y_sorted.stride(1),
                    gs = gate.stride(0);
      const scalar_t* gp = gate.data_ptr<scalar_t>();
      at::parallel_for(0, T, kRowGrain, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const Acc<Y> w = static_cast<Acc<Y>>(static_cast<double>(gp[t * gs]));
          const Y* r = ys + inv[t] * rs;
          Y* dst = o + t * C;
          for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<Y>(w * static_cast<Acc<Y>>(r[c * cs]));
        }
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> expert_combine_bwd(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                                      const at::Tensor& order, const at::Tensor& gate, bool y_grad,
                                                      bool gate_grad) {
  check_combine(y_sorted, order, gate);
  check_rows(grad_out, "grad_out");
  check_same_dtype(y_sorted, "y_sorted", grad_out, "grad_out");
  check_same_device(y_sorted, "y_sorted", grad_out, "grad_out");
  TORCH_CHECK_VALUE(grad_out.sizes() == y_sorted.sizes(), "grad_out: expected shape ", y_sorted.sizes(),
                    " (y_sorted's), got ", grad_out.sizes());
  const std::vector<int64_t> inv = inverse_of(order);
  const at::Tensor ord_c = order.contiguous();
  at::Tensor dy = at::empty(y_grad ? y_sorted.sizes() : at::IntArrayRef{0}, y_sorted.options());
  at::Tensor dgate = at::empty({gate_grad ? gate.size(0) : 0}, gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_sorted.scalar_type(), "expert_combine_bwd", [&] {
    using Y = scalar_t;
    using A = Acc<Y>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "expert_combine_bwd_gate", [&] {
      if (y_grad && dy.numel() > 0)
        gather_rows<Y, scalar_t>(grad_out, ord_c.data_ptr<int64_t>(), gate.data_ptr<scalar_t>(), gate.stride(0),
                                 dy.data_ptr<Y>());
      if (gate_grad && dgate.numel() > 0) {
        const Y* g = grad_out.data_ptr<Y>();
        const Y* y = y_sorted.data_ptr<Y>();
        const int64_t T = y_sorted.size(0), C = y_sorted.size(1);
        const int64_t gr = grad_out.stride(0), gc = grad_out.stride(1), yr = y_sorted.stride(0),
                      yc = y_sorted.stride(1);
        scalar_t* dg = dgate.data_ptr<scalar_t>();
        at::parallel_for(0, T, kRowGrain, [&](int64_t t0, int64_t t1) {
          for (int64_t t = t0; t < t1; ++t) {
            const Y* gt = g + t * gr;
            const Y* yt = y + inv[t] * yr;
            double s = 0;
            for (int64_t c = 0; c < C; ++c)
              s += static_cast<double>(static_cast<A>(gt[c * gc])) * static_cast<double>(static_cast<A>(yt[c * yc]));
            dg[t] = static_cast<scalar_t>(s);
          }
        });
      }
    });
  });
  return {dy, dgate};
}

}  // namespace cpu
}  // namespace vitk

TORCH_LIBRARY_IMPL(vitk, CPU, m) {
  VITK_IMPL(m, "expert_dispatch", vitk::Backend::kCpu, &vitk::cpu::expert_dispatch);
  VITK_IMPL(m, "expert_combine", vitk::Backend::kCpu, &vitk::cpu::expert_combine);
  VITK_IMPL(m, "expert_combine_bwd", vitk::Backend::kCpu, &vitk::cpu::expert_combine_bwd);
}
