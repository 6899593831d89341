// CUDA backend, elementwise kernels: dtype conversion and fill (kernels.h), add, axpy, SwiGLU, RoPE, and the
// embedding lookup with its gradient. Semantics are those of core/backend.h; the CPU backend
// (core/cpu/cpu_kernels.cc) is the reference the tests compare against.
//
// All of these are memory-bound. Each kernel moves its data in packs of up to 16 bytes where the pointers allow
// it (pack_width() picks the width on the host; misaligned views fall back to narrower packs or single elements,
// and flat loops finish the n % W tail one element at a time) and computes in f32 registers. The comment above
// each kernel counts the bytes it moves.
//
// The embedding gradient is deterministic: positions are sorted by token with CUB's stable radix sort, and each
// table row receives the sum of its positions' rows in position order (no atomics).
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_run_length_encode.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "core/cuda/cuda_backend.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/kernels.h"
#include "core/cuda/reduce.cuh"

namespace loom::cuda {
namespace {

// ---- conversion and fill -------------------------------------------------------------------------------

// dst = src: sizeof(S) + sizeof(D) bytes per element.
template <class D, class S, int W>
__global__ void __launch_bounds__(kBlockThreads) convert_kernel(D* dst, const S* src, int64_t n) {
  grid_stride_packs<W>(n, [&](auto width, int64_t i) {
    constexpr int w = decltype(width)::value;
    float x[w];
    load_pack<w>(src + i, x);
    store_pack<w>(dst + i, x);
  });
}

// dst = bits: sizeof(Bits) bytes per element.
template <class Bits, int W>
__global__ void __launch_bounds__(kBlockThreads) fill_kernel(Bits* dst, Bits bits, int64_t n) {
  grid_stride_packs<W>(n, [&](auto width, int64_t i) {
    constexpr int w = decltype(width)::value;
    Pack<Bits, w> pk;
#pragma unroll
    for (int k = 0; k < w; ++k) pk.v[k] = bits;
    *reinterpret_cast<Pack<Bits, w>*>(dst + i) = pk;
  });
}

template <class Bits>
void launch_fill_bits(void* dst, Bits bits, int64_t n, cudaStream_t stream) {
  const int width = pack_width(static_cast<int>(16 / sizeof(Bits)), 0, {{dst, sizeof(Bits)}});
  dispatch_width(width, [&](auto w) {
    constexpr int kW = decltype(w)::value;
    fill_kernel<Bits, kW>
        <<<grid_for((n + kW - 1) / kW, kBlockThreads), kBlockThreads, 0, stream>>>(static_cast<Bits*>(dst), bits, n);
    LOOM_CUDA_CHECK_LAUNCH("fill_kernel");
  });
}

// ---- add, axpy -----------------------------------------------------------------------------------------

// out = a + b: 3 sizeof(T) bytes per element. out may alias a or b: each thread reads its elements first.
template <class T, int W>
__global__ void __launch_bounds__(kBlockThreads) add_kernel(T* out, const T* a, const T* b, int64_t n) {
  grid_stride_packs<W>(n, [&](auto width, int64_t i) {
    constexpr int w = decltype(width)::value;
    float x[w], y[w];
    load_pack<w>(a + i, x);
    load_pack<w>(b + i, y);
#pragma unroll
    for (int k = 0; k < w; ++k) x[k] += y[k];
    store_pack<w>(out + i, x);
  });
}

// dst = (accumulate ? dst : 0) + alpha * src: sizeof(S) + sizeof(D) bytes per element, plus sizeof(D) when
// accumulating. dst may alias src.
template <class D, class S, int W>
__global__ void __launch_bounds__(kBlockThreads)
    axpy_kernel(D* dst, const S* src, float alpha, bool accumulate, int64_t n) {
  grid_stride_packs<W>(n, [&](auto width, int64_t i) {
    constexpr int w = decltype(width)::value;
    float x[w];
    load_pack<w>(src + i, x);
#pragma unroll
    for (int k = 0; k < w; ++k) x[k] *= alpha;
    write_pack<w>(dst + i, x, accumulate);
  });
}

// ---- SwiGLU --------------------------------------------------------------------------------------------

__device__ __forceinline__ float sigmoid(float g) {
  return 1.0f / (1.0f + expf(-g));
}

// out = silu(gate) * up: 6 bytes per element (bf16).
template <int W>
__global__ void __launch_bounds__(kBlockThreads)
    swiglu_forward_kernel(BFloat16* out, const BFloat16* gate, const BFloat16* up, int64_t n) {
  grid_stride_packs<W>(n, [&](auto width, int64_t i) {
    constexpr int w = decltype(width)::value;
    float g[w], u[w];
    load_pack<w>(gate + i, g);
    load_pack<w>(up + i, u);
#pragma unroll
    for (int k = 0; k < w; ++k) g[k] = g[k] * sigmoid(g[k]) * u[k];
    store_pack<w>(out + i, g);
  });
}

// dgate (+)= dout * up * s (1 + g (1 - s)), dup (+)= dout * g * s, s = sigmoid(g): 10 bytes per element (bf16),
// 14 when accumulating.
template <int W>
__global__ void __launch_bounds__(kBlockThreads)
    swiglu_backward_kernel(BFloat16* dgate, BFloat16* dup, bool accumulate, const BFloat16* dout, const BFloat16* gate,
                           const BFloat16* up, int64_t n) {
  grid_stride_packs<W>(n, [&](auto width, int64_t i) {
    constexpr int w = decltype(width)::value;
    float g[w], u[w], dy[w], dg[w], du[w];
    load_pack<w>(gate + i, g);
    load_pack<w>(up + i, u);
    load_pack<w>(dout + i, dy);
#pragma unroll
    for (int k = 0; k < w; ++k) {
      const float s = sigmoid(g[k]);
      dg[k] = dy[k] * u[k] * (s * (1.0f + g[k] * (1.0f - s)));
      du[k] = dy[k] * (g[k] * s);
    }
    write_pack<w>(dgate + i, dg, accumulate);
    write_pack<w>(dup + i, du, accumulate);
  });
}

// ---- RoPE ----------------------------------------------------------------------------------------------

// base^(-2i/Dh) for i < Dh/2, computed on the host in double exactly as the CPU backend does, and passed by value
// (a __grid_constant__ parameter: indexed in place, never copied to local memory).
constexpr int kRopeMaxHalf = 256;
struct RopeFreqs {
  double inv_freq[kRopeMaxHalf];
};

// cos and sin of an angle a = t * inv_freq (radians, 0 <= a < ~1e7) to about 3e-7 absolute. The product is the
// CPU's own double angle. In f32 it would be off by up to a * 2^-24 (5e-4 rad at a = 8192), so the reduction is
// done in double: u = a / pi half-turns (relative error 2e-16), r = u - 2 rint(u / 2) in [-1, 1] is exact, and
// only the rounding of r to f32 (<= 2^-25 half-turns, 1e-7 rad) and sincospif's 1-2 ulp remain. The CPU rounds
// the exact cos/sin to f32 (3e-8), so the two differ by well under a bf16 ulp of the output (2^-9 relative).
__device__ __forceinline__ void rope_cos_sin(double angle, float* c, float* s) {
  constexpr double kInvPi = 0.318309886183790671537767526745028724;
  const double u = angle * kInvPi;
  const double r = u - 2.0 * rint(0.5 * u);
  sincospif(static_cast<float>(r), s, c);
}

// dst (+)= the rotation of src by sign * angle, pairs (i, i + Dh/2) of each [Dh] row: 4 bytes per element (bf16),
// 6 when accumulating. One item is W pairs; dst may alias src (both halves are read before either is written).
template <int W>
__global__ void __launch_bounds__(kBlockThreads)
    rope_kernel(BFloat16* dst, const BFloat16* src, int64_t rows, int64_t seq, int64_t heads, int64_t half, float sign,
                bool accumulate, const __grid_constant__ RopeFreqs freqs) {
  const int64_t groups = half / W;  // items per [Dh] row
  const int64_t items = rows * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < items; item += stride) {
    const int64_t row = item / groups;  // (b * T + t) * H + h
    const int64_t i0 = (item % groups) * W;
    const double t = static_cast<double>((row / heads) % seq);
    const int64_t offset = row * 2 * half + i0;
    float x0[W], x1[W], y0[W], y1[W];
    load_pack<W>(src + offset, x0);
    load_pack<W>(src + offset + half, x1);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      float c, s;
      rope_cos_sin(t * freqs.inv_freq[i0 + k], &c, &s);
      s *= sign;
      y0[k] = x0[k] * c - x1[k] * s;
      y1[k] = x1[k] * c + x0[k] * s;
    }
    write_pack<W>(dst + offset, y0, accumulate);
    write_pack<W>(dst + offset + half, y1, accumulate);
  }
}

void launch_rope(const Tensor& dst, bool accumulate, const Tensor& src, float base, float sign, const char* op,
                 cudaStream_t stream) {
  check_dtype(src, DType::kBF16, op, "src");
  check_dtype(dst, DType::kBF16, op, "dst");
  LOOM_CHECK(src.ndim() == 4 && src.size(3) % 2 == 0, kShape,
             op << ": input must be [B, T, H, Dh] with Dh even, got " << src.shape().str());
  check_shape(dst, src.shape(), op, "dst");
  const int64_t seq = src.size(1), heads = src.size(2), head_dim = src.size(3), half = head_dim / 2;
  LOOM_CHECK(half <= kRopeMaxHalf, kShape,
             op << ": head dimension " << head_dim << " is above the CUDA kernel's limit of " << 2 * kRopeMaxHalf);
  const BFloat16* ps = static_cast<const BFloat16*>(device_ptr(src, op, "src"));
  BFloat16* pd = static_cast<BFloat16*>(device_mut_ptr(dst, op, "dst"));
  if (src.numel() == 0) return;
  RopeFreqs freqs{};
  for (int64_t i = 0; i < half; ++i)
    freqs.inv_freq[i] =
        std::pow(static_cast<double>(base), -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
  const int64_t rows = src.numel() / head_dim;
  const int width = pack_width(8, half, {{pd, 2}, {ps, 2}});
  dispatch_width(width, [&](auto w) {
    constexpr int kW = decltype(w)::value;
    rope_kernel<kW><<<grid_for(rows * (half / kW), kBlockThreads), kBlockThreads, 0, stream>>>(
        pd, ps, rows, seq, heads, half, sign, accumulate, freqs);
    LOOM_CUDA_CHECK_LAUNCH("rope_kernel");
  });
}

// ---- embedding -----------------------------------------------------------------------------------------

// out[r, :] = table[tokens[r] - vocab_start, :] or zeros: 4 bytes per element of out (2 read, 2 written; nothing
// read for out-of-range tokens) plus 4 bytes per token. Rows are copied bit for bit.
template <int W>
__global__ void __launch_bounds__(kBlockThreads)
    embedding_forward_kernel(BFloat16* out, const BFloat16* table, const int32_t* tokens, int64_t n, int64_t d,
                             int64_t vocab_start, int64_t v_local) {
  const int64_t groups = d / W;
  const int64_t items = n * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < items; item += stride) {
    const int64_t r = item / groups, c = (item % groups) * W;
    const int64_t row = static_cast<int64_t>(tokens[r]) - vocab_start;
    Pack<BFloat16, W> pk;
    if (row >= 0 && row < v_local) {
      pk = *reinterpret_cast<const Pack<BFloat16, W>*>(table + row * d + c);
    } else {
#pragma unroll
      for (int k = 0; k < W; ++k) pk.v[k] = __float2bfloat16_rn(0.0f);
    }
    *reinterpret_cast<Pack<BFloat16, W>*>(out + r * d + c) = pk;
  }
}

// Sort keys: the local table row of each position, or v_local (sorted last, then skipped) when another shard
// holds the token. 12 bytes per token.
__global__ void __launch_bounds__(kBlockThreads)
    embedding_keys_kernel(uint32_t* keys, int32_t* positions, const int32_t* tokens, int64_t n, int64_t vocab_start,
                          int64_t v_local) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t row = static_cast<int64_t>(tokens[i]) - vocab_start;
    keys[i] = static_cast<uint32_t>(row >= 0 && row < v_local ? row : v_local);
    positions[i] = static_cast<int32_t>(i);
  }
}

// Runs (equal tokens, positions ascending) are handled in groups of kEmbWarps by one block, for one column tile of
// 32 * W columns (blockIdx.y). A run of at most kLongRun rows is summed by one warp in position order; a longer
// one by the whole block, warp w taking rows w, w + kEmbWarps, ..., and the warps' sums added in warp order.
// Either way the order depends only on the data, so the result is bitwise reproducible.
constexpr int kEmbWarps = kBlockThreads / 32;
constexpr int kLongRun = 32;

// dtable[key, :] += sum of dout[position, :] over the run: 2 bytes per element of dout read, plus
// 2 sizeof(TD) bytes per element of each distinct in-range table row (read and written once).
template <class TD, int W>
__global__ void __launch_bounds__(kBlockThreads)
    embedding_backward_kernel(TD* dtable, const BFloat16* dout, const int32_t* sorted_positions,
                              const uint32_t* run_keys, const int32_t* run_lengths, const int32_t* run_starts,
                              const int32_t* num_runs_ptr, int64_t d, uint32_t skip_key) {
  constexpr int kTile = 32 * W;
  __shared__ float partial[kEmbWarps][kTile];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t num_runs = *num_runs_ptr;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kTile + lane * W;  // d % W == 0: whole pack in range
  const bool col_ok = col < d;
  for (int64_t group = static_cast<int64_t>(blockIdx.x) * kEmbWarps; group < num_runs;
       group += static_cast<int64_t>(gridDim.x) * kEmbWarps) {
    // Short runs: one warp each.
    const int64_t r = group + warp;
    if (r < num_runs && col_ok) {
      const uint32_t key = run_keys[r];
      const int32_t len = run_lengths[r];
      if (key != skip_key && len <= kLongRun) {
        const int32_t* pos = sorted_positions + run_starts[r];
        float acc[W] = {};
#pragma unroll 4
        for (int32_t j = 0; j < len; ++j) {
          float x[W];
          load_pack<W>(dout + static_cast<int64_t>(pos[j]) * d + col, x);
#pragma unroll
          for (int k = 0; k < W; ++k) acc[k] += x[k];
        }
        write_pack<W>(dtable + static_cast<int64_t>(key) * d + col, acc, true);
      }
    }
    // Long runs: the whole block (the conditions below are the same for every thread).
    const int64_t group_end = group + kEmbWarps < num_runs ? group + kEmbWarps : num_runs;
    for (int64_t lr = group; lr < group_end; ++lr) {
      const uint32_t key = run_keys[lr];
      const int32_t len = run_lengths[lr];
      if (key == skip_key || len <= kLongRun) continue;
      const int32_t* pos = sorted_positions + run_starts[lr];
      float acc[W] = {};
      if (col_ok) {
#pragma unroll 4
        for (int32_t j = warp; j < len; j += kEmbWarps) {
          float x[W];
          load_pack<W>(dout + static_cast<int64_t>(pos[j]) * d + col, x);
#pragma unroll
          for (int k = 0; k < W; ++k) acc[k] += x[k];
        }
      }
#pragma unroll
      for (int k = 0; k < W; ++k) partial[warp][lane * W + k] = acc[k];
      __syncthreads();
      const int64_t c = static_cast<int64_t>(blockIdx.y) * kTile + threadIdx.x;
      if (threadIdx.x < kTile && c < d) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kEmbWarps; ++w) sum += partial[w][threadIdx.x];
        TD* p = dtable + static_cast<int64_t>(key) * d + c;
        *p = from_float<TD>(to_float(*p) + sum);
      }
      __syncthreads();  // partial is rewritten by the next long run
    }
  }
}

// Scratch of the embedding gradient, carved from one CudaBackend::scratch() block.
struct EmbeddingScratch {
  uint32_t* keys_in;
  uint32_t* keys_sorted;
  int32_t* positions_in;
  int32_t* positions_sorted;
  uint32_t* run_keys;
  int32_t* run_lengths;
  int32_t* run_starts;
  int32_t* num_runs;
  void* cub_temp;
  size_t cub_temp_bytes;
};

size_t align_up(size_t bytes) {
  return (bytes + 255) / 256 * 256;
}

}  // namespace

// ---- kernels.h -----------------------------------------------------------------------------------------

void launch_convert(void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  if (dst_dtype == src_dtype) {
    LOOM_CUDA_CHECK(
        cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * dtype_size(dst_dtype), cudaMemcpyDeviceToDevice, stream));
    return;
  }
  const bool floats = (dst_dtype == DType::kF32 || dst_dtype == DType::kBF16) &&
                      (src_dtype == DType::kF32 || src_dtype == DType::kBF16);
  LOOM_CHECK(
      floats, kShape,
      "convert: cannot convert " << dtype_name(src_dtype) << " to " << dtype_name(dst_dtype) << " (only f32 <-> bf16)");
  const int width =
      pack_width(max_pack({dst_dtype, src_dtype}), 0, {{dst, dtype_size(dst_dtype)}, {src, dtype_size(src_dtype)}});
  dispatch_float(dst_dtype, [&](auto dt) {
    using D = typename decltype(dt)::type;
    dispatch_float(src_dtype, [&](auto st) {
      using S = typename decltype(st)::type;
      dispatch_width(width, [&](auto w) {
        constexpr int kW = decltype(w)::value;
        convert_kernel<D, S, kW><<<grid_for((n + kW - 1) / kW, kBlockThreads), kBlockThreads, 0, stream>>>(
            static_cast<D*>(dst), static_cast<const S*>(src), n);
        LOOM_CUDA_CHECK_LAUNCH("convert_kernel");
      });
    });
  });
}

void launch_fill(void* dst, DType dtype, float value, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  switch (dtype) {
    case DType::kF32: {
      uint32_t bits;
      std::memcpy(&bits, &value, 4);
      launch_fill_bits<uint32_t>(dst, bits, n, stream);
      break;
    }
    case DType::kBF16: launch_fill_bits<uint16_t>(dst, f32_to_bf16(value).bits, n, stream); break;
    case DType::kI32: {
      const int32_t v = static_cast<int32_t>(value);
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      launch_fill_bits<uint32_t>(dst, bits, n, stream);
      break;
    }
    case DType::kU16: launch_fill_bits<uint16_t>(dst, static_cast<uint16_t>(value), n, stream); break;
  }
}

// ---- add, axpy -----------------------------------------------------------------------------------------

void CudaBackend::add(const Tensor& out, const Tensor& a, const Tensor& b) {
  check_float_dtype(out, "add", "out");
  check_dtype(a, out.dtype(), "add", "a");
  check_dtype(b, out.dtype(), "add", "b");
  check_shape(a, out.shape(), "add", "a");
  check_shape(b, out.shape(), "add", "b");
  void* po = device_mut_ptr(out, "add", "out");
  const void* pa = device_ptr(a, "add", "a");
  const void* pb = device_ptr(b, "add", "b");
  const int64_t n = out.numel();
  if (n == 0) return;
  const size_t es = dtype_size(out.dtype());
  const int width = pack_width(max_pack({out.dtype()}), 0, {{po, es}, {pa, es}, {pb, es}});
  dispatch_float(out.dtype(), [&](auto tt) {
    using T = typename decltype(tt)::type;
    dispatch_width(width, [&](auto w) {
      constexpr int kW = decltype(w)::value;
      add_kernel<T, kW><<<grid_for((n + kW - 1) / kW, kBlockThreads), kBlockThreads, 0, stream_>>>(
          static_cast<T*>(po), static_cast<const T*>(pa), static_cast<const T*>(pb), n);
      LOOM_CUDA_CHECK_LAUNCH("add_kernel");
    });
  });
}

void CudaBackend::axpy(const Tensor& dst, const Tensor& src, float alpha, bool accumulate) {
  check_float_dtype(dst, "axpy", "dst");
  check_float_dtype(src, "axpy", "src");
  LOOM_CHECK(dst.numel() == src.numel(), kShape,
             "axpy: 'dst' " << dst.describe() << " and 'src' " << src.describe() << " differ in element count");
  void* pd = device_mut_ptr(dst, "axpy", "dst");
  const void* ps = device_ptr(src, "axpy", "src");
  const int64_t n = dst.numel();
  if (n == 0) return;
  const int width = pack_width(max_pack({dst.dtype(), src.dtype()}), 0,
                               {{pd, dtype_size(dst.dtype())}, {ps, dtype_size(src.dtype())}});
  dispatch_float(dst.dtype(), [&](auto dt) {
    using D = typename decltype(dt)::type;
    dispatch_float(src.dtype(), [&](auto st) {
      using S = typename decltype(st)::type;
      dispatch_width(width, [&](auto w) {
        constexpr int kW = decltype(w)::value;
        axpy_kernel<D, S, kW><<<grid_for((n + kW - 1) / kW, kBlockThreads), kBlockThreads, 0, stream_>>>(
            static_cast<D*>(pd), static_cast<const S*>(ps), alpha, accumulate, n);
        LOOM_CUDA_CHECK_LAUNCH("axpy_kernel");
      });
    });
  });
}

// ---- SwiGLU --------------------------------------------------------------------------------------------

void CudaBackend::swiglu_forward(const Tensor& out, const Tensor& gate, const Tensor& up) {
  const char* op = "swiglu_forward";
  check_dtype(out, DType::kBF16, op, "out");
  check_dtype(gate, DType::kBF16, op, "gate");
  check_dtype(up, DType::kBF16, op, "up");
  check_shape(gate, out.shape(), op, "gate");
  check_shape(up, out.shape(), op, "up");
  auto* po = static_cast<BFloat16*>(device_mut_ptr(out, op, "out"));
  auto* pg = static_cast<const BFloat16*>(device_ptr(gate, op, "gate"));
  auto* pu = static_cast<const BFloat16*>(device_ptr(up, op, "up"));
  const int64_t n = out.numel();
  if (n == 0) return;
  const int width = pack_width(8, 0, {{po, 2}, {pg, 2}, {pu, 2}});
  dispatch_width(width, [&](auto w) {
    constexpr int kW = decltype(w)::value;
    swiglu_forward_kernel<kW><<<grid_for((n + kW - 1) / kW, kBlockThreads), kBlockThreads, 0, stream_>>>(po, pg, pu, n);
    LOOM_CUDA_CHECK_LAUNCH("swiglu_forward_kernel");
  });
}

void CudaBackend::swiglu_backward(const Tensor& dgate, const Tensor& dup, bool accumulate, const Tensor& dout,
                                  const Tensor& gate, const Tensor& up) {
  const char* op = "swiglu_backward";
  check_dtype(dgate, DType::kBF16, op, "dgate");
  check_dtype(dup, DType::kBF16, op, "dup");
  check_dtype(dout, DType::kBF16, op, "dout");
  check_dtype(gate, DType::kBF16, op, "gate");
  check_dtype(up, DType::kBF16, op, "up");
  check_shape(dgate, gate.shape(), op, "dgate");
  check_shape(dup, gate.shape(), op, "dup");
  check_shape(dout, gate.shape(), op, "dout");
  check_shape(up, gate.shape(), op, "up");
  auto* pdg = static_cast<BFloat16*>(device_mut_ptr(dgate, op, "dgate"));
  auto* pdu = static_cast<BFloat16*>(device_mut_ptr(dup, op, "dup"));
  auto* pdo = static_cast<const BFloat16*>(device_ptr(dout, op, "dout"));
  auto* pg = static_cast<const BFloat16*>(device_ptr(gate, op, "gate"));
  auto* pu = static_cast<const BFloat16*>(device_ptr(up, op, "up"));
  const int64_t n = gate.numel();
  if (n == 0) return;
  const int width = pack_width(8, 0, {{pdg, 2}, {pdu, 2}, {pdo, 2}, {pg, 2}, {pu, 2}});
  dispatch_width(width, [&](auto w) {
    constexpr int kW = decltype(w)::value;
    swiglu_backward_kernel<kW><<<grid_for((n + kW - 1) / kW, kBlockThreads), kBlockThreads, 0, stream_>>>(
        pdg, pdu, accumulate, pdo, pg, pu, n);
    LOOM_CUDA_CHECK_LAUNCH("swiglu_backward_kernel");
  });
}

// ---- RoPE ----------------------------------------------------------------------------------------------

void CudaBackend::rope_forward(const Tensor& out, const Tensor& x, float base) {
  launch_rope(out, false, x, base, 1.0f, "rope_forward", stream_);
}

void CudaBackend::rope_backward(const Tensor& dx, bool accumulate, const Tensor& dy, float base) {
  launch_rope(dx, accumulate, dy, base, -1.0f, "rope_backward", stream_);
}

// ---- embedding -----------------------------------------------------------------------------------------

void CudaBackend::embedding_forward(const Tensor& out, const Tensor& table, const Tensor& tokens, int64_t vocab_start) {
  const char* op = "embedding_forward";
  check_dtype(out, DType::kBF16, op, "out");
  check_dtype(table, DType::kBF16, op, "table");
  check_dtype(tokens, DType::kI32, op, "tokens");
  LOOM_CHECK(table.ndim() == 2, kShape, op << ": 'table' must be [V, D], got " << table.shape().str());
  const int64_t n = tokens.numel(), v_local = table.size(0), d = table.size(1);
  check_shape(out, Shape{n, d}, op, "out");
  auto* po = static_cast<BFloat16*>(device_mut_ptr(out, op, "out"));
  auto* pt = static_cast<const BFloat16*>(device_ptr(table, op, "table"));
  auto* tok = static_cast<const int32_t*>(device_ptr(tokens, op, "tokens"));
  if (n == 0 || d == 0) return;
  const int width = pack_width(8, d, {{po, 2}, {pt, 2}});
  dispatch_width(width, [&](auto w) {
    constexpr int kW = decltype(w)::value;
    embedding_forward_kernel<kW>
        <<<grid_for(n * (d / kW), kBlockThreads), kBlockThreads, 0, stream_>>>(po, pt, tok, n, d, vocab_start, v_local);
    LOOM_CUDA_CHECK_LAUNCH("embedding_forward_kernel");
  });
}

void CudaBackend::embedding_backward(const Tensor& dtable, const Tensor& dout, const Tensor& tokens,
                                     int64_t vocab_start) {
  const char* op = "embedding_backward";
  check_float_dtype(dtable, op, "dtable");
  check_dtype(dout, DType::kBF16, op, "dout");
  check_dtype(tokens, DType::kI32, op, "tokens");
  LOOM_CHECK(dtable.ndim() == 2, kShape, op << ": 'dtable' must be [V, D], got " << dtable.shape().str());
  const int64_t n = tokens.numel(), v_local = dtable.size(0), d = dtable.size(1);
  check_shape(dout, Shape{n, d}, op, "dout");
  void* pdt = device_mut_ptr(dtable, op, "dtable");
  auto* pdo = static_cast<const BFloat16*>(device_ptr(dout, op, "dout"));
  auto* tok = static_cast<const int32_t*>(device_ptr(tokens, op, "tokens"));
  if (n == 0 || d == 0 || v_local == 0) return;
  LOOM_CHECK(n <= std::numeric_limits<int32_t>::max(), kShape,
             op << ": " << n << " tokens is more than the kernel's limit of 2^31 - 1");
  LOOM_CHECK(v_local < std::numeric_limits<int32_t>::max(), kShape,
             op << ": table of " << v_local << " rows is more than the kernel's limit of 2^31 - 2");
  const int width = pack_width(8, d, {{pdt, dtype_size(dtable.dtype())}, {pdo, 2}});
  const int64_t tiles = (d + 32 * width - 1) / (32 * width);
  LOOM_CHECK(tiles <= 65535, kShape, op << ": row length " << d << " is above the kernel's limit");

  // Keys take values 0 .. v_local: sort on just the bits that can be set.
  int end_bit = 1;
  while ((int64_t{1} << end_bit) <= v_local) ++end_bit;
  const int count = static_cast<int>(n);

  // Temporary storage of the three CUB passes (queried with null data pointers: nothing is run).
  size_t sort_bytes = 0, rle_bytes = 0, scan_bytes = 0;
  LOOM_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const uint32_t*>(nullptr),
                                                  static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                  static_cast<int32_t*>(nullptr), count, 0, end_bit, stream_));
  LOOM_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(nullptr, rle_bytes, static_cast<const uint32_t*>(nullptr),
                                                     static_cast<uint32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                                     static_cast<int32_t*>(nullptr), count, stream_));
  LOOM_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<const int32_t*>(nullptr),
                                                static_cast<int32_t*>(nullptr), count, stream_));
  const size_t array_bytes = align_up(static_cast<size_t>(n) * 4);
  const size_t temp_bytes = align_up(std::max({sort_bytes, rle_bytes, scan_bytes, size_t{1}}));
  char* base = static_cast<char*>(scratch(7 * array_bytes + align_up(4) + temp_bytes));
  EmbeddingScratch s{};
  s.keys_in = reinterpret_cast<uint32_t*>(base);
  s.keys_sorted = reinterpret_cast<uint32_t*>(base + array_bytes);
  s.positions_in = reinterpret_cast<int32_t*>(base + 2 * array_bytes);
  s.positions_sorted = reinterpret_cast<int32_t*>(base + 3 * array_bytes);
  s.run_keys = reinterpret_cast<uint32_t*>(base + 4 * array_bytes);
  s.run_lengths = reinterpret_cast<int32_t*>(base + 5 * array_bytes);
  s.run_starts = reinterpret_cast<int32_t*>(base + 6 * array_bytes);
  s.num_runs = reinterpret_cast<int32_t*>(base + 7 * array_bytes);
  s.cub_temp = base + 7 * array_bytes + align_up(4);
  s.cub_temp_bytes = temp_bytes;

  embedding_keys_kernel<<<grid_for(n, kBlockThreads), kBlockThreads, 0, stream_>>>(s.keys_in, s.positions_in, tok, n,
                                                                                   vocab_start, v_local);
  LOOM_CUDA_CHECK_LAUNCH("embedding_keys_kernel");
  // Stable: equal keys keep ascending positions.
  size_t bytes = s.cub_temp_bytes;
  LOOM_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(s.cub_temp, bytes, s.keys_in, s.keys_sorted, s.positions_in,
                                                  s.positions_sorted, count, 0, end_bit, stream_));
  // Encode writes only the first num_runs lengths; the scan below reads all n, so the rest must be defined.
  LOOM_CUDA_CHECK(cudaMemsetAsync(s.run_lengths, 0, static_cast<size_t>(n) * 4, stream_));
  bytes = s.cub_temp_bytes;
  LOOM_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(s.cub_temp, bytes, s.keys_sorted, s.run_keys, s.run_lengths,
                                                     s.num_runs, count, stream_));
  bytes = s.cub_temp_bytes;
  LOOM_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(s.cub_temp, bytes, s.run_lengths, s.run_starts, count, stream_));

  const unsigned groups = grid_for((n + kEmbWarps - 1) / kEmbWarps, 1, 1 << 20);
  const dim3 grid(groups, static_cast<unsigned>(tiles));
  dispatch_float(dtable.dtype(), [&](auto tt) {
    using TD = typename decltype(tt)::type;
    dispatch_width(width, [&](auto w) {
      constexpr int kW = decltype(w)::value;
      embedding_backward_kernel<TD, kW><<<grid, kBlockThreads, 0, stream_>>>(
          static_cast<TD*>(pdt), pdo, s.positions_sorted, s.run_keys, s.run_lengths, s.run_starts, s.num_runs, d,
          static_cast<uint32_t>(v_local));
      LOOM_CUDA_CHECK_LAUNCH("embedding_backward_kernel");
    });
  });
}

}  // namespace loom::cuda
