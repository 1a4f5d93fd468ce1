// Tiling and work-splitting helpers for the CPU kernels. Header-only and torch-free so the C++
// unit tests (tests/cpp) can exercise them directly.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace vitk {

// ceil(a / b) for positive b.
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// a rounded up to a multiple of b.
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// The half-open range [begin, end) of tile `t` when `n` items are cut into tiles of `tile` items;
// the last tile is short when tile does not divide n.
struct Range {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
};
constexpr Range tile_range(int64_t n, int64_t tile, int64_t t) {
  return Range{t * tile, std::min(n, (t + 1) * tile)};
}

// How many pieces to cut `n` items into so that `threads` threads each get work, without cutting
// below `min_piece` items per piece. Returns at least 1.
inline int64_t split_count(int64_t n, int64_t threads, int64_t min_piece) {
  if (n <= 0) return 1;
  int64_t by_size = std::max<int64_t>(1, n / std::max<int64_t>(1, min_piece));
  return std::max<int64_t>(1, std::min(threads, by_size));
}

// Piece `p` of `pieces` nearly equal pieces of [0, n), each a multiple of `align` except the last.
inline Range split_range(int64_t n, int64_t pieces, int64_t p, int64_t align = 1) {
  int64_t units = ceil_div(n, align);
  int64_t base = units / pieces, extra = units % pieces;
  int64_t b = p * base + std::min(p, extra);
  int64_t e = b + base + (p < extra ? 1 : 0);
  return Range{std::min(n, b * align), std::min(n, e * align)};
}


// Element offsets of the "rows" of a strided view: rows are enumerated in row-major order over the
// leading dimensions (sizes/strides of those dimensions only; the row's own inner dimensions are
// the caller's business). Dimensions of size 1 are dropped and neighbours that step evenly are
// merged, so a contiguous or sliced view costs one multiply per row and a transposed one a few, and
// kernels can read non-contiguous inputs tile by tile instead of copying them whole.
class StridedRows {
 public:
  StridedRows() = default;
  StridedRows(const int64_t* sizes, const int64_t* strides, int64_t ndim) {
    for (int64_t i = ndim - 1; i >= 0; --i) {
      if (sizes[i] == 1) continue;
      if (!size_.empty() && strides[i] == size_.back() * stride_.back()) {
        size_.back() *= sizes[i];
      } else {
        size_.push_back(sizes[i]);
        stride_.push_back(strides[i]);
      }
    }
    // Innermost first above; store outermost first so offset() walks from the inside out.
    std::reverse(size_.begin(), size_.end());
    std::reverse(stride_.begin(), stride_.end());
  }
  // How many dimensions remain after merging (0 for a single row).
  int64_t dims() const { return static_cast<int64_t>(size_.size()); }
  // Offset, in elements, of row `row` (0 <= row < product of sizes).
  int64_t offset(int64_t row) const {
    if (size_.size() == 1) return row * stride_[0];
    int64_t off = 0;
    for (int64_t i = dims() - 1; i >= 0; --i) {
      off += (row % size_[i]) * stride_[i];
      row /= size_[i];
    }
    return off;
  }

 private:
  std::vector<int64_t> size_, stride_;
};

}  // namespace vitk
