// vitk/tiling.h decides which elements every CPU kernel thread touches; an off-by-one here drops
// or double-counts rows silently, so the helpers are checked exhaustively over small sizes
// against their defining properties rather than against a second copy of their formulas.
#include "vitk/tiling.h"

#include <algorithm>
#include <cstdint>

#include "vitk_test.h"

using vitk::ceil_div;
using vitk::Range;
using vitk::round_up;
using vitk::split_count;
using vitk::split_range;
using vitk::tile_range;

// Kernels size fixed-length buffers with these, so they must stay usable in constant expressions.
static_assert(ceil_div(7, 3) == 3 && ceil_div(6, 3) == 2 && ceil_div(0, 5) == 0, "ceil_div");
static_assert(round_up(7, 4) == 8 && round_up(8, 4) == 8, "round_up");
static_assert(tile_range(10, 4, 2).begin == 8 && tile_range(10, 4, 2).end == 10, "tile_range");

TEST(ceil_div_is_the_least_cover) {
  for (int64_t b = 1; b <= 20; ++b)
    for (int64_t a = 0; a <= 300; ++a) {
      int64_t q = ceil_div(a, b);
      REQUIRE(q >= 0 && q * b >= a, "a=", a, " b=", b, " q=", q);
      REQUIRE(q == 0 || (q - 1) * b < a, "a=", a, " b=", b, " q=", q);
    }
  REQUIRE_EQ(ceil_div(1, 1), 1);
  REQUIRE_EQ(ceil_div(int64_t{1} << 40, 3), ((int64_t{1} << 40) + 2) / 3);
}

TEST(round_up_is_the_next_multiple) {
  for (int64_t b = 1; b <= 20; ++b)
    for (int64_t a = 0; a <= 300; ++a) {
      int64_t r = round_up(a, b);
      REQUIRE(r % b == 0 && r >= a && r - a < b, "a=", a, " b=", b, " r=", r);
    }
}

TEST(tile_range_cuts_n_into_tiles_with_a_short_last_one) {
  for (int64_t tile = 1; tile <= 17; ++tile)
    for (int64_t n = 0; n <= 120; ++n) {
      const int64_t tiles = ceil_div(n, tile);
      int64_t expect_begin = 0;
      for (int64_t t = 0; t < tiles; ++t) {
        Range r = tile_range(n, tile, t);
        REQUIRE_EQ(r.begin, expect_begin, "n=", n, " tile=", tile, " t=", t);
        REQUIRE_EQ(r.begin, t * tile, "n=", n, " tile=", tile, " t=", t);
        REQUIRE_EQ(r.size(), r.end - r.begin);
        if (t + 1 < tiles)
          REQUIRE_EQ(r.size(), tile, "n=", n, " tile=", tile, " t=", t);
        else
          REQUIRE_EQ(r.size(), n - (tiles - 1) * tile, "last tile; n=", n, " tile=", tile);
        REQUIRE(r.size() >= 1 && r.size() <= tile, "n=", n, " tile=", tile, " t=", t);
        expect_begin = r.end;
      }
      REQUIRE_EQ(expect_begin, n, "tiles must end at n; tile=", tile);
    }
}

TEST(tile_range_edge_cases) {
  // n < tile: one tile holding everything.
  REQUIRE_EQ(ceil_div(5, 8), 1);
  REQUIRE_EQ(tile_range(5, 8, 0).begin, 0);
  REQUIRE_EQ(tile_range(5, 8, 0).end, 5);
  // n == 0: no tiles at all, and a tile asked for anyway is empty rather than negative.
  REQUIRE_EQ(ceil_div(0, 8), 0);
  REQUIRE(tile_range(0, 8, 0).size() <= 0);
  // Exact division: no short tile.
  REQUIRE_EQ(tile_range(64, 16, 3).size(), 16);
}

TEST(split_count_feeds_every_thread_but_respects_min_piece) {
  for (int64_t threads = 1; threads <= 12; ++threads)
    for (int64_t min_piece = 1; min_piece <= 20; ++min_piece)
      for (int64_t n = 0; n <= 200; ++n) {
        int64_t c = split_count(n, threads, min_piece);
        REQUIRE(c >= 1 && c <= threads, "n=", n, " threads=", threads, " min_piece=", min_piece, " c=", c);
        if (n == 0) {
          REQUIRE_EQ(c, 1, "threads=", threads, " min_piece=", min_piece);
          continue;
        }
        // No piece below min_piece on average, unless the whole of n is smaller than one piece.
        REQUIRE(c == 1 || n / c >= min_piece, "n=", n, " threads=", threads, " min_piece=", min_piece, " c=", c);
        // Maximal: one more piece would either exceed the threads or go below min_piece.
        REQUIRE(c == threads || n / (c + 1) < min_piece, "n=", n, " threads=", threads, " min_piece=", min_piece,
              " c=", c);
      }
}

TEST(split_count_degenerate_arguments) {
  REQUIRE_EQ(split_count(-5, 8, 4), 1);
  REQUIRE_EQ(split_count(0, 8, 4), 1);
  REQUIRE_EQ(split_count(100, 0, 4), 1);   // no threads reported: still one piece
  REQUIRE_EQ(split_count(100, 8, 0), 8);   // min_piece 0 behaves as 1
  REQUIRE_EQ(split_count(3, 8, 0), 3);
  REQUIRE_EQ(split_count(3, 8, 1000), 1);
}

TEST(split_range_partitions_exactly_in_aligned_nearly_equal_pieces) {
  for (int64_t align = 1; align <= 9; ++align)
    for (int64_t pieces = 1; pieces <= 12; ++pieces)
      for (int64_t n = 0; n <= 150; ++n) {
        int64_t prev_end = 0, prev_units = INT64_MAX, min_units = INT64_MAX, max_units = 0;
        for (int64_t p = 0; p < pieces; ++p) {
          Range r = split_range(n, pieces, p, align);
          // In order, no gap, no overlap.
          REQUIRE_EQ(r.begin, prev_end, "n=", n, " pieces=", pieces, " p=", p, " align=", align);
          REQUIRE(r.end >= r.begin && r.end <= n, "n=", n, " pieces=", pieces, " p=", p, " align=", align);
          // Every boundary is aligned except n itself, so vector loops never straddle two threads.
          REQUIRE(r.begin % align == 0 || r.begin == n, "n=", n, " pieces=", pieces, " p=", p, " align=", align);
          REQUIRE(r.end % align == 0 || r.end == n, "n=", n, " pieces=", pieces, " p=", p, " align=", align);
          // Balanced in whole aligned units, larger pieces first.
          int64_t units = ceil_div(r.size(), align);
          REQUIRE(units <= prev_units, "n=", n, " pieces=", pieces, " p=", p, " align=", align);
          min_units = std::min(min_units, units);
          max_units = std::max(max_units, units);
          prev_units = units;
          prev_end = r.end;
        }
        REQUIRE_EQ(prev_end, n, "pieces must cover [0, n); pieces=", pieces, " align=", align);
        REQUIRE(max_units - min_units <= 1, "n=", n, " pieces=", pieces, " align=", align, " units ", min_units,
              "..", max_units);
      }
}

TEST(split_range_more_pieces_than_units) {
  // 3 items over 8 pieces: three single items, then empty pieces parked at n.
  for (int64_t p = 0; p < 8; ++p) {
    Range r = split_range(3, 8, p);
    REQUIRE_EQ(r.size(), p < 3 ? 1 : 0, "p=", p);
    if (p >= 3) REQUIRE_EQ(r.begin, 3, "p=", p);
  }
  // 10 items in units of 4 (3 units, the last short) over 5 pieces.
  const int64_t expect[5][2] = {{0, 4}, {4, 8}, {8, 10}, {10, 10}, {10, 10}};
  for (int64_t p = 0; p < 5; ++p) {
    Range r = split_range(10, 5, p, 4);
    REQUIRE_EQ(r.begin, expect[p][0], "p=", p);
    REQUIRE_EQ(r.end, expect[p][1], "p=", p);
  }
  // n == 0: every piece empty.
  for (int64_t p = 0; p < 4; ++p) REQUIRE_EQ(split_range(0, 4, p, 8).size(), 0, "p=", p);
  // One piece is the whole range.
  REQUIRE_EQ(split_range(37, 1, 0, 8).begin, 0);
  REQUIRE_EQ(split_range(37, 1, 0, 8).end, 37);
}

int main(int argc, char** argv) { return vitk_test::run_all(argc, argv); }
