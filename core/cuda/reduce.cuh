// Helpers shared by the CUDA kernel files (elementwise.cu, norm.cu, loss.cu, optim.cu): bf16/f32 conversion,
// packed 16-byte loads and stores, warp and block reductions, grid- and block-stride visitors, and the host-side
// choice of pack width and dispatch over element types and widths. Included by .cu files only (C++17).
//
// Assumptions: blocks are 1-D with a multiple of 32 threads (the reductions shuffle with a full mask); a pointer
// handed to a pack load or store is aligned to its pack (alignof(Pack<T, W>), checked on the host by
// pack_width()); tensors are element-aligned.
//
// Determinism: every reduction here combines values in an order fixed by the launch shape and the data, never by
// timing, so a kernel built on them gives bitwise the same result on every run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "core/dtype.h"

namespace loom::cuda {

using BFloat16 = __nv_bfloat16;

// Threads per block of the elementwise and row kernels.
constexpr int kBlockThreads = 256;

// ---- element conversion --------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) {
  return x;
}
__device__ __forceinline__ float to_float(BFloat16 x) {
  return __bfloat162float(x);
}

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ BFloat16 from_float<BFloat16>(float x) {
  return __float2bfloat16_rn(x);  // round to nearest even, as the host's f32_to_bf16
}

// ---- packed loads and stores ---------------------------------------------------------------------------

// W consecutive elements moved as one unit: a single 16-byte access when W * sizeof(T) == 16, two when it is 32
// (f32 packs of 8 beside bf16 packs of 8), a narrower one below. The alignment is the access width, capped at 16.
template <class T, int W>
struct alignas(sizeof(T) * W < 16 ? sizeof(T) * W : 16) Pack {
  T v[W];
};

template <int W, class T>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[W]) {
  const Pack<T, W> pk = *reinterpret_cast<const Pack<T, W>*>(p);
#pragma unroll
  for (int k = 0; k < W; ++k) out[k] = to_float(pk.v[k]);
}

template <int W, class T>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[W]) {
  Pack<T, W> pk;
#pragma unroll
  for (int k = 0; k < W; ++k) pk.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, W>*>(p) = pk;
}

// dst (+)= value for a pack: read-modify-write in f32 when accumulating.
template <int W, class T>
__device__ __forceinline__ void write_pack(T* p, float (&value)[W], bool accumulate) {
  if (accumulate) {
    float old[W];
    load_pack<W>(p, old);
#pragma unroll
    for (int k = 0; k < W; ++k) value[k] += old[k];
  }
  store_pack<W>(p, value);
}

template <int W>
using Width = std::integral_constant<int, W>;

// ---- reductions ----------------------------------------------------------------------------------------

struct SumOp {
  template <class T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MaxOp {
  // fmaxf ignores a NaN operand, like the CPU's `x > m ? x : m` scan.
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Butterfly over the warp: partners add the same two values (in swapped order, which IEEE addition does not
// see), so every lane ends with the bitwise same result.
template <class T, class Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Reduces one value per thread over the block; every thread gets the result. `shared` holds at least 32 Ts and
// may be reused by the next call (the leading barrier protects it).
template <class T, class Op>
__device__ __forceinline__ T block_reduce(T v, T identity, T* shared, Op op) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_reduce(v, op);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  return warp_reduce(lane < warps ? shared[lane] : identity, op);
}

template <class T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  return block_reduce(v, T(0), shared, SumOp{});
}

__device__ __forceinline__ float block_max(float v, float* shared) {
  return block_reduce(v, -INFINITY, shared, MaxOp{});
}

// ---- visitors ------------------------------------------------------------------------------------------

// Grid-stride loop over [0, n): packs of W consecutive elements, then the n % W tail one element at a time.
// body(Width<w>, i) handles elements [i, i + w).
template <int W, class Body>
__device__ __forceinline__ void grid_stride_packs(int64_t n, const Body& body) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / W;
  for (int64_t p = tid; p < packs; p += stride) body(Width<W>{}, p * W);
  if constexpr (W > 1) {
    for (int64_t i = packs * W + tid; i < n; i += stride) body(Width<1>{}, i);
  }
}

// Block-stride loop over the n elements of a row starting at `row`, whatever its alignment: single elements up to
// the first pack boundary, packs of W, then single elements. Other arrays visited with the same indices must have
// the same misalignment (checked on the host with same_misalignment()).
template <int W, class T, class Body>
__device__ __forceinline__ void block_stride_row(const T* row, int64_t n, const Body& body) {
  int64_t head = 0;
  if constexpr (W > 1) {
    constexpr uintptr_t kAlign = alignof(Pack<T, W>);
    const uintptr_t misalign = reinterpret_cast<uintptr_t>(row) % kAlign;
    head = misalign == 0 ? 0 : static_cast<int64_t>((kAlign - misalign) / sizeof(T));
    if (head > n) head = n;
    for (int64_t i = threadIdx.x; i < head; i += blockDim.x) body(Width<1>{}, i);
  }
  const int64_t packs = (n - head) / W;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) body(Width<W>{}, head + p * W);
  if constexpr (W > 1) {
    for (int64_t i = head + packs * W + threadIdx.x; i < n; i += blockDim.x) body(Width<1>{}, i);
  }
}

// ---- host side: pack widths and dispatch ----------------------------------------------------------------

struct PtrInfo {
  const void* ptr;
  size_t elem_bytes;
};

// The widest pack width w in {max_width, max_width/2, ..., 1} (max_width a power of two <= 8) such that
// `multiple_of` % w == 0 (pass 0 for flat loops, which handle a tail) and every pointer is aligned to its pack,
// min(16, w * elem_bytes) bytes.
inline int pack_width(int max_width, int64_t multiple_of, std::initializer_list<PtrInfo> ptrs) {
  for (int w = max_width; w > 1; w /= 2) {
    if (multiple_of % w != 0) continue;
    bool ok = true;
    for (const PtrInfo& p : ptrs) {
      const size_t align = std::min<size_t>(16, static_cast<size_t>(w) * p.elem_bytes);
      ok = ok && reinterpret_cast<uintptr_t>(p.ptr) % align == 0;
    }
    if (ok) return w;
  }
  return 1;
}

// Whether two arrays walked with the same indices by block_stride_row reach 16-byte boundaries together.
inline bool same_misalignment(const void* a, const void* b) {
  return (reinterpret_cast<uintptr_t>(a) - reinterpret_cast<uintptr_t>(b)) % 16 == 0;
}

// Threads for a block that walks rows of `items` work items each: a multiple of 32, at most kBlockThreads.
inline int row_threads(int64_t items) {
  const int64_t t = (items + 31) / 32 * 32;
  return static_cast<int>(std::clamp<int64_t>(t, 32, kBlockThreads));
}

// Blocks for a kernel that walks rows with a block-stride loop (for r = blockIdx.x; r < rows; r += gridDim.x):
// one per row, capped well inside the grid's limit.
inline unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(std::clamp<int64_t>(rows, 1, int64_t{1} << 30));
}

template <class T>
struct TypeTag {
  using type = T;
};

// fn(TypeTag<float>{}) or fn(TypeTag<BFloat16>{}); the caller has checked that dtype is f32 or bf16.
template <class Fn>
void dispatch_float(DType dtype, Fn&& fn) {
  if (dtype == DType::kF32) {
    fn(TypeTag<float>{});
  } else {
    fn(TypeTag<BFloat16>{});
  }
}

// fn(Width<w>{}) for w in {8, 4, 2, 1} (a value from pack_width).
template <class Fn>
void dispatch_width(int width, Fn&& fn) {
  switch (width) {
    case 8: fn(Width<8>{}); break;
    case 4: fn(Width<4>{}); break;
    case 2: fn(Width<2>{}); break;
    default: fn(Width<1>{}); break;
  }
}

// The widest useful pack for a flat loop over arrays of these dtypes: 16 bytes of the narrowest.
inline int max_pack(std::initializer_list<DType> dtypes) {
  size_t narrowest = 4;
  for (DType d : dtypes) narrowest = std::min(narrowest, dtype_size(d));
  return static_cast<int>(16 / narrowest);
}

}  // namespace loom::cuda
