// The CPU attention core, layer 3: scheduling. The prefetch queue that spreads the next task's
// cache lines over the current task's loops, and the dynamic hand-out of task batches to the
// threads of an ATen parallel region (so not Torch-free: it includes <ATen/Parallel.h>).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>

#include "vitk/attention_simd.h"
#include "vitk/tiling.h"

namespace vitk {
namespace attn {

// ------------------------------------------------------------------------------ prefetching

// Cache lines of the next task, issued a few at a time from inside the current task's loops.
// Families gather each task's rows from scattered places of large tensors, so packing would wait on
// memory at every row; prefetching the next task's lines hides that, but only when spread out: a
// burst of hundreds of prefetches fills the miss buffers and stalls the computation behind it.
class PrefetchQueue {
 public:
  void clear() {
    lines_.clear();
    next_ = 0;
  }
  // Every line of [p, p + bytes).
  void add(const void* p, int64_t bytes) {
    if (p == nullptr || bytes <= 0) return;
    uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63);
    const uintptr_t e = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes);
    for (; a < e; a += 64) lines_.push_back(a);
  }
  // Spreads the queued lines over `steps` calls of step().
  void plan(int64_t steps) { per_step_ = ceil_div(static_cast<int64_t>(lines_.size()), std::max<int64_t>(1, steps)); }
  void step() {
    const int64_t end = std::min<int64_t>(static_cast<int64_t>(lines_.size()), next_ + per_step_);
    for (; next_ < end; ++next_) issue(lines_[next_]);
  }
  void drain() {
    for (; next_ < static_cast<int64_t>(lines_.size()); ++next_) issue(lines_[next_]);
  }

 private:
  // Into L2 (prefetcht1), also for lines the task will only write: a task's lines (tens of KB)
  // would otherwise push the current task's packed tiles out of L1. On Zen 4, t1 was never slower
  // than t0 in our measurements and up to 15% faster on whole kernels.
  static void issue(uintptr_t v) { __builtin_prefetch(reinterpret_cast<const char*>(v), 0, 2); }
  std::vector<uintptr_t> lines_;
  int64_t next_ = 0, per_step_ = 0;
};

// ------------------------------------------------------------------------------ scheduling

// Hands out batches of consecutive task indices to the workers of a parallel region on demand, so
// a worker that is slowed down (another process on its core, a heavier task) simply takes fewer
// batches instead of holding everyone up at the end, as a static split would. Batches shrink as the
// work runs out (OpenMP's "guided" rule: remaining / (2 workers)): long batches first, where the
// next-task prefetch inside a batch pays off, short ones at the end for the balance. Which worker
// runs a task never changes a result: tasks write disjoint outputs, and anything they reduce is
// reduced per task or per fixed chunk of tasks.
class TaskSource {
 public:
  TaskSource(int64_t n, int64_t workers) : n_(n), div_(2 * std::max<int64_t>(1, workers)) {}
  bool next(Range& r) {
    int64_t b = next_.load(std::memory_order_relaxed);
    for (;;) {
      if (b >= n_) return false;
      const int64_t e = b + std::max<int64_t>(1, (n_ - b) / div_);
      if (next_.compare_exchange_weak(b, e, std::memory_order_relaxed)) {
        r = Range{b, e};
        return true;
      }
    }
  }

 private:
  std::atomic<int64_t> next_{0};
  int64_t n_, div_;
};

// Runs body(source) on at most one worker per thread (none idle for lack of tasks), all pulling
// batches of [0, ntasks) from one shared TaskSource; each worker fences its streamed stores before
// it ends, so every output is visible once the region joins.
template <class Body>
void run_workers(int64_t ntasks, Body&& body) {
  if (ntasks <= 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), ntasks);
  TaskSource source(ntasks, workers);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    body(source);
    simd::stream_fence();
  });
}

}  // namespace attn
}  // namespace vitk
