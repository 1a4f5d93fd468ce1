// CUDA kernels of the codebook family: code lookup (a row gather) and its backward (a row
// scatter-add). Needs only the CUDA runtime, so `nvcc -arch=sm_90 -c` checks it on any machine;
// the torch binding is csrc/cuda/codebook.cpp. Layout contract: see codebook.cuh.
#include "codebook.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace vitk {
namespace cuda_kernels {
namespace {

constexpr int kThreads = 256;
// Beyond this many blocks the kernels grid-stride; more blocks than the GPU can hold at once only
// add scheduling overhead.
constexpr int64_t kMaxBlocks = int64_t(1) << 16;

// Threads that share one row: the next power of two >= the row's vector count, at most a warp.
// Short rows (VQ codes are often 8 to 32 values) then pack several per warp instead of idling 31
// lanes, and a power of two lets a thread find its row and lane with a shift and a mask instead of
// a 64-bit division per element.
int log2_lanes_for(int64_t vecs_per_row) {
  int l = 0;
  while (l < 5 && (int64_t(1) << l) < vecs_per_row) ++l;
  return l;
}

unsigned blocks_for(int64_t rows, int log2_lanes) {
  const int64_t rows_per_block = kThreads >> log2_lanes;
  int64_t b = (rows + rows_per_block - 1) / rows_per_block;
  if (b < 1) b = 1;
  if (b > kMaxBlocks) b = kMaxBlocks;
  return static_cast<unsigned>(b);
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// ------------------------------------------------------------------------------------ lookup
// Vec is an opaque word of 2, 4, 8 or 16 bytes: a lookup only moves bytes, so one kernel per word
// size serves every dtype.
template <typename Vec, typename Index>
__global__ void __launch_bounds__(kThreads)
lookup_kernel(const Vec* __restrict__ codebook, const Index* __restrict__ indices, Vec* __restrict__ out,
              int64_t rows, int64_t vecs_per_row, int64_t G, int64_t K, int log2_lanes) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t lanes = int64_t(1) << log2_lanes;
  const int64_t lane = tid & (lanes - 1);
  // The total thread count is a multiple of lanes (lanes <= 32 divides kThreads), so a thread keeps
  // its lane across the grid-stride loop.
  const int64_t row_stride = (int64_t(gridDim.x) * blockDim.x) >> log2_lanes;
  for (int64_t r = tid >> log2_lanes; r < rows; r += row_stride) {
    const int64_t k = static_cast<int64_t>(indices[r]);
    Vec* dst = out + r * vecs_per_row;
    if (k >= 0 && k < K) {
      const int64_t g = G == 1 ? 0 : r % G;
      const Vec* src = codebook + (g * K + k) * vecs_per_row;
      for (int64_t w = lane; w < vecs_per_row; w += lanes) dst[w] = src[w];
    } else {
      for (int64_t w = lane; w < vecs_per_row; w += lanes) dst[w] = Vec{};
    }
  }
}

template <typename Vec, typename Index>
cudaError_t launch_lookup(const void* codebook, const void* indices, void* out, int64_t rows, int64_t row_bytes,
                          int64_t G, int64_t K, cudaStream_t stream) {
  const int64_t vecs = row_bytes / static_cast<int64_t>(sizeof(Vec));
  const int log2_lanes = log2_lanes_for(vecs);
  lookup_kernel<Vec, Index><<<blocks_for(rows, log2_lanes), kThreads, 0, stream>>>(
      static_cast<const Vec*>(codebook), static_cast<const Index*>(indices), static_cast<Vec*>(out), rows, vecs, G, K,
      log2_lanes);
  return cudaGetLastError();
}

template <typename Index>
cudaError_t lookup_by_width(const void* codebook, const void* indices, void* out, int64_t rows, int64_t row_bytes,
                            int64_t G, int64_t K, cudaStream_t stream) {
  // The widest word that divides a row and that both row arrays are aligned to; rows then start on
  // word boundaries too, since every row begins at a multiple of row_bytes.
  auto fits = [&](size_t w) {
    return row_bytes % static_cast<int64_t>(w) == 0 && aligned(codebook, w) && aligned(out, w);
  };
  if (fits(16)) return launch_lookup<uint4, Index>(codebook, indices, out, rows, row_bytes, G, K, stream);
  if (fits(8)) return launch_lookup<uint2, Index>(codebook, indices, out, rows, row_bytes, G, K, stream);
  if (fits(4)) return launch_lookup<uint32_t, Index>(codebook, indices, out, rows, row_bytes, G, K, stream);
  return launch_lookup<uint16_t, Index>(codebook, indices, out, rows, row_bytes, G, K, stream);
}

size_t element_size(DType dtype) {
  switch (dtype) {
    case kFloat64: return 8;
    case kFloat32: return 4;
    case kFloat16:
    case kBFloat16: return 2;
  }
  return 0;
}

// -------------------------------------------------------------------------- lookup backward
template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T v) {
  if constexpr (std::is_same<T, __half>::value) {
    return __half2float(v);
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __bfloat162float(v);
  } else {
    return static_cast<Acc>(v);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same<T, __half>::value) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

// VEC consecutive elements loaded as one aligned access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename Acc>
__device__ __forceinline__ void atomic_add_vec(Acc* p, const Acc (&v)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Hopper has vector float atomics: one red.global.v4.f32 instead of four scalar ones.
  if constexpr (std::is_same<Acc, float>::value && VEC == 4) {
    atomicAdd(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
  } else if constexpr (std::is_same<Acc, float>::value && VEC == 2) {
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(v[0], v[1]));
  } else
#endif
  {
#pragma unroll
    for (int i = 0; i < VEC; ++i) atomicAdd(p + i, v[i]);
  }
}

template <typename T, typename Acc, typename Index, int VEC>
__global__ void __launch_bounds__(kThreads)
scatter_add_kernel(const T* __restrict__ grad, const Index* __restrict__ indices, Acc* __restrict__ acc, int64_t rows,
                   int64_t vecs_per_row, int64_t G, int64_t K, int log2_lanes) {
  using P = Pack<T, VEC>;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t lanes = int64_t(1) << log2_lanes;
  const int64_t lane = tid & (lanes - 1);
  const int64_t row_stride = (int64_t(gridDim.x) * blockDim.x) >> log2_lanes;
  for (int64_t r = tid >> log2_lanes; r < rows; r += row_stride) {
    const int64_t k = static_cast<int64_t>(indices[r]);
    if (k < 0 || k >= K) continue;
    const int64_t g = G == 1 ? 0 : r % G;
    const P* src = reinterpret_cast<const P*>(grad) + r * vecs_per_row;
    Acc* dst = acc + (g * K + k) * vecs_per_row * VEC;
    for (int64_t w = lane; w < vecs_per_row; w += lanes) {
      const P p = src[w];
      Acc v[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] = to_acc<Acc>(p.v[i]);
      atomic_add_vec<VEC>(dst + w * VEC, v);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) round_kernel(const float* __restrict__ in, T* __restrict__ out, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = from_float<T>(in[i]);
}

template <typename T, typename Acc, typename Index>
cudaError_t launch_scatter_add(const void* grad, const void* indices, Acc* acc, int64_t rows, int64_t G, int64_t K,
                               int64_t D, cudaStream_t stream) {
  // The widest vector that divides D and that grad rows and accumulator rows are aligned to. The
  // accumulator comes from the caching allocator (256-byte aligned), so the row base decides.
  auto fits = [&](int vec) {
    return D % vec == 0 && aligned(grad, sizeof(T) * vec) && aligned(acc, sizeof(Acc) * vec);
  };
  auto go = [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    const int64_t vecs = D / VEC;
    const int log2_lanes = log2_lanes_for(vecs);
    scatter_add_kernel<T, Acc, Index, VEC><<<blocks_for(rows, log2_lanes), kThreads, 0, stream>>>(
        static_cast<const T*>(grad), static_cast<const Index*>(indices), acc, rows, vecs, G, K, log2_lanes);
    return cudaGetLastError();
  };
  if (fits(4)) return go(std::integral_constant<int, 4>{});
  if (fits(2)) return go(std::integral_constant<int, 2>{});
  return go(std::integral_constant<int, 1>{});
}

template <typename Index>
cudaError_t lookup_backward_typed(DType dtype, const void* grad, const void* indices, void* grad_codebook,
                                  void* workspace, int64_t rows, int64_t G, int64_t K, int64_t D,
                                  cudaStream_t stream) {
  const int64_t n = G * K * D;
  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case kFloat32:
      err = cudaMemsetAsync(grad_codebook, 0, n * sizeof(float), stream);
      if (err != cudaSuccess) return err;
      return launch_scatter_add<float, float, Index>(grad, indices, static_cast<float*>(grad_codebook), rows, G, K, D,
                                                     stream);
    case kFloat64:
      err = cudaMemsetAsync(grad_codebook, 0, n * sizeof(double), stream);
      if (err != cudaSuccess) return err;
      return launch_scatter_add<double, double, Index>(grad, indices, static_cast<double*>(grad_codebook), rows, G, K,
                                                       D, stream);
    case kFloat16:
    case kBFloat16: {
      // 16-bit atomics would round after every add; sum in fp32 and round once.
      float* acc = static_cast<float*>(workspace);
      err = cudaMemsetAsync(acc, 0, n * sizeof(float), stream);
      if (err != cudaSuccess) return err;
      err = dtype == kFloat16
                ? launch_scatter_add<__half, float, Index>(grad, indices, acc, rows, G, K, D, stream)
                : launch_scatter_add<__nv_bfloat16, float, Index>(grad, indices, acc, rows, G, K, D, stream);
      if (err != cudaSuccess) return err;
      int64_t blocks = (n + kThreads - 1) / kThreads;
      if (blocks > kMaxBlocks) blocks = kMaxBlocks;
      if (dtype == kFloat16) {
        round_kernel<__half><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            acc, static_cast<__half*>(grad_codebook), n);
      } else {
        round_kernel<__nv_bfloat16><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            acc, static_cast<__nv_bfloat16*>(grad_codebook), n);
      }
      return cudaGetLastError();
    }
  }
  return cudaErrorInvalidValue;
}

bool valid_dtype(DType dtype) {
  return dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16 || dtype == kFloat64;
}

}  // namespace

cudaError_t codebook_lookup_launch(DType dtype, const void* codebook, const void* indices, bool idx64, void* out,
                                   int64_t rows, int64_t G, int64_t K, int64_t D, cudaStream_t stream) {
  if (!valid_dtype(dtype) || rows < 0 || G < 1 || K < 0 || D < 0) return cudaErrorInvalidValue;
  if (rows == 0 || D == 0) return cudaSuccess;
  const int64_t row_bytes = D * static_cast<int64_t>(element_size(dtype));
  return idx64 ? lookup_by_width<int64_t>(codebook, indices, out, rows, row_bytes, G, K, stream)
               : lookup_by_width<int32_t>(codebook, indices, out, rows, row_bytes, G, K, stream);
}

size_t codebook_lookup_backward_workspace_bytes(DType dtype, int64_t G, int64_t K, int64_t D) {
  if (dtype != kFloat16 && dtype != kBFloat16) return 0;
  return static_cast<size_t>(G * K * D) * sizeof(float);
}

cudaError_t codebook_lookup_backward_launch(DType dtype, const void* grad_output, const void* indices, bool idx64,
                                            void* grad_codebook, void* workspace, int64_t rows, int64_t G,
                                            int64_t K, int64_t D, cudaStream_t stream) {
  if (!valid_dtype(dtype) || rows < 0 || G < 1 || K < 0 || D < 0) return cudaErrorInvalidValue;
  const int64_t n = G * K * D;
  if (n == 0) return cudaSuccess;
  if (rows == 0) {
    // Nothing to add: all-zero bits are +0.0 in every float format.
    return cudaMemsetAsync(grad_codebook, 0, static_cast<size_t>(n) * element_size(dtype), stream);
  }
  if (codebook_lookup_backward_workspace_bytes(dtype, G, K, D) > 0 && (workspace == nullptr || !aligned(workspace, 16)))
    return cudaErrorInvalidValue;
  return idx64 ? lookup_backward_typed<int64_t>(dtype, grad_output, indices, grad_codebook, workspace, rows, G, K, D,
                                                stream)
               : lookup_backward_typed<int32_t>(dtype, grad_output, indices, grad_codebook, workspace, rows, G, K, D,
                                                stream);
}

}  // namespace cuda_kernels
}  // namespace vitk
