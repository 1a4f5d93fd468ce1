// The CPU attention core, layer 2: the register-blocked micro-GEMM that every product of the
// forward and backward goes through (S = Q K^T, O += P V, dP = dO V^T, dV += P^T dO, dK += dS^T Q,
// dQ += dS K), on the padded fp32 layouts of attention_core.h. Torch-free.
#pragma once

#include <algorithm>
#include <cstdint>

#include "vitk/attention_simd.h"
#include "vitk/tiling.h"

namespace vitk {
namespace attn {

// ------------------------------------------------------------------------------ micro-kernels
//
// One register-blocked kernel serves every product of the forward and backward:
//   C[r][0:16V) (=|+=) sum_{k<K} a(r, k) * B[k*ldb + 0:16V),   r < R,
// with a(r, k) = A[r*astride + k] (a row-major A) or, when ATrans, A[k*astride + r] (A read
// transposed, so the R broadcasts of one k are adjacent). S = Q K^T, dP = dO V^T (B = K^T / V^T), O += P V and
// dQ += dS K (B = V / K rows) use row-major A; dV += P^T dO and dK += dS^T Q use ATrans. The R x V
// accumulators stay in registers across the whole K loop; B rows are streamed once per row group.

#ifdef __AVX512F__
// Panels of at most 3 vectors with 8 rows (24 accumulators out of 32 zmm registers) measured
// faster than wider panels with fewer rows on Zen 4, e.g. 1.7x for P V with dv = 80 (5 vectors:
// panels 3 + 2 at 8 rows, against one panel at 4 rows): the broadcasts of A are shared by more FMAs.
constexpr int kMaxV = 3;      // widest panel, in vectors
constexpr int kAccRegs = 24;  // accumulator budget out of 32 zmm registers
#else
constexpr int kMaxV = 4;
constexpr int kAccRegs = 4;
#endif
constexpr int kMaxR = 8;

constexpr int rows_for(int V) { return std::max(1, std::min(kMaxR, kAccRegs / V)); }

#ifdef __AVX512F__
template <int R, int V, bool Acc, bool ATrans>
inline void micro(const float* __restrict A, int64_t astride, const float* __restrict B, int64_t ldb, int64_t K,
                  float* __restrict C, int64_t ldc) {
  using namespace simd;
  vf c[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) c[r][v] = Acc ? load(C + r * ldc + 16 * v) : zero();
  if (ATrans) {
    const float* a = A;
    for (int64_t k = 0; k < K; ++k, a += astride, B += ldb) {
      vf b[V];
      for (int v = 0; v < V; ++v) b[v] = load(B + 16 * v);
      for (int r = 0; r < R; ++r) {
        const vf x = set1(a[r]);
        for (int v = 0; v < V; ++v) c[r][v] = fmadd(x, b[v], c[r][v]);
      }
    }
  } else {
    for (int64_t k = 0; k < K; ++k, B += ldb) {
      vf b[V];
      for (int v = 0; v < V; ++v) b[v] = load(B + 16 * v);
      for (int r = 0; r < R; ++r) {
        const vf x = set1(A[r * astride + k]);
        for (int v = 0; v < V; ++v) c[r][v] = fmadd(x, b[v], c[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store(C + r * ldc + 16 * v, c[r][v]);
}
#elif defined(__AVX2__) && defined(__FMA__)
// The 16-lane panel as two 8-lane halves, and one broadcast load per element of A. From the plain
// loops below, GCC 12's SLP vectorizer made a gather of four rows of A per k (ATrans, R = 2), three
// of them unused and, at the last k, past the end of A: a read that faulted whenever the scratch
// buffer ended at the top of the heap.
template <int R, int V, bool Acc, bool ATrans>
inline void micro(const float* __restrict A, int64_t astride, const float* __restrict B, int64_t ldb, int64_t K,
                  float* __restrict C, int64_t ldc) {
  constexpr int H = 2 * V;
  __m256 c[R][H];
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < H; ++h) c[r][h] = Acc ? _mm256_loadu_ps(C + r * ldc + 8 * h) : _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k, B += ldb) {
    __m256 b[H];
    for (int h = 0; h < H; ++h) b[h] = _mm256_loadu_ps(B + 8 * h);
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(ATrans ? A + k * astride + r : A + r * astride + k);
      for (int h = 0; h < H; ++h) c[r][h] = _mm256_fmadd_ps(x, b[h], c[r][h]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < H; ++h) _mm256_storeu_ps(C + r * ldc + 8 * h, c[r][h]);
}
#else
// Plain loops over the 16V lanes of each row; the compiler keeps the accumulators in vector
// registers of whatever width the target has. SLP vectorization off: it can merge the loads of A
// into loads of rows the loop never reads (see the AVX2 kernel above).
template <int R, int V, bool Acc, bool ATrans>
__attribute__((optimize("no-tree-slp-vectorize"))) inline void micro(
    const float* __restrict A, int64_t astride, const float* __restrict B, int64_t ldb, int64_t K,
    float* __restrict C, int64_t ldc) {
  constexpr int L = 16 * V;
  float c[R][L];
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < L; ++l) c[r][l] = Acc ? C[r * ldc + l] : 0.f;
  for (int64_t k = 0; k < K; ++k, B += ldb) {
    for (int r = 0; r < R; ++r) {
      const float x = ATrans ? A[k * astride + r] : A[r * astride + k];
      for (int l = 0; l < L; ++l) c[r][l] += x * B[l];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < L; ++l) C[r * ldc + l] = c[r][l];
}
#endif

template <int V, bool Acc, bool ATrans>
inline void micro_rows(int R, const float* A, int64_t astride, const float* B, int64_t ldb, int64_t K, float* C,
                       int64_t ldc) {
  constexpr int RM = rows_for(V);
  switch (R) {
    case 1: micro<1, V, Acc, ATrans>(A, astride, B, ldb, K, C, ldc); break;
    case 2: if constexpr (RM >= 2) micro<2, V, Acc, ATrans>(A, astride, B, ldb, K, C, ldc); break;
    case 3: if constexpr (RM >= 3) micro<3, V, Acc, ATrans>(A, astride, B, ldb, K, C, ldc); break;
    case 4: if constexpr (RM >= 4) micro<4, V, Acc, ATrans>(A, astride, B, ldb, K, C, ldc); break;
    case 5: if constexpr (RM >= 5) micro<5, V, Acc, ATrans>(A, astride, B, ldb, K, C, ldc); break;
    case 6: if constexpr (RM >= 6) micro<6, V, Acc, ATrans>(A, astride, B, ldb, K, C, ldc); break;
    case 7: if constexpr (RM >= 7) micro<7, V, Acc, ATrans>(A, astride, B, ldb, K, C, ldc); break;
    case 8: if constexpr (RM >= 8) micro<8, V, Acc, ATrans>(A, astride, B, ldb, K, C, ldc); break;
    default: break;
  }
}

// C[M][0:ncols) (=|+=) a(M x K) * B[K][0:ncols), ncols a multiple of 16. Without ATrans a(i, k) =
// A[i*astride + k]; with ATrans a(i, k) = A[k*astride + i]. Panels of up to kMaxV vectors are the
// outer loop, so one panel of B stays in L1 while every row group passes over it.
template <bool Acc, bool ATrans>
void gemm(int64_t M, int64_t ncols, int64_t K, const float* A, int64_t astride, const float* B, int64_t ldb,
          float* C, int64_t ldc) {
  if (M <= 0 || ncols <= 0) return;
  if (K <= 0) {
    if (!Acc)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + ncols, 0.f);
    return;
  }
  const int64_t W = ncols / kLanes;
  const int64_t panels = ceil_div(W, kMaxV);
  for (int64_t p = 0; p < panels; ++p) {
    const Range pv = split_range(W, panels, p);
    const int V = static_cast<int>(pv.size());
    const float* Bp = B + pv.begin * kLanes;
    float* Cp = C + pv.begin * kLanes;
    const int RM = rows_for(V);
    for (int64_t i = 0; i < M; i += RM) {
      const int R = static_cast<int>(std::min<int64_t>(RM, M - i));
      const float* Ai = ATrans ? A + i : A + i * astride;
      float* Ci = Cp + i * ldc;
      switch (V) {
        case 1: micro_rows<1, Acc, ATrans>(R, Ai, astride, Bp, ldb, K, Ci, ldc); break;
        case 2: micro_rows<2, Acc, ATrans>(R, Ai, astride, Bp, ldb, K, Ci, ldc); break;
        case 3: micro_rows<3, Acc, ATrans>(R, Ai, astride, Bp, ldb, K, Ci, ldc); break;
#if !defined(__AVX512F__)
        case 4: micro_rows<4, Acc, ATrans>(R, Ai, astride, Bp, ldb, K, Ci, ldc); break;
#endif
        default: break;
      }
    }
  }
}

}  // namespace attn
}  // namespace vitk
