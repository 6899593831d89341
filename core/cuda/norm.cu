// CUDA backend, RMSNorm over the last dimension: forward and backward with the semantics of core/backend.h
// (reference: CpuBackend::rmsnorm_forward / rmsnorm_backward in core/cpu/cpu_kernels.cc).
//
// x, y, dx, dy and w are bf16, rstd f32, dw f32 or bf16; all arithmetic is f32. A block walks one row at a time
// in packs of up to 8 elements (when D and the pointers allow): a first pass reduces over the row, a second pass
// re-reads the row (from L1/L2, it was just loaded) and writes the output, so any D works with no register
// cache of the row.
//
// The weight gradient is deterministic without atomics: each block of the backward kernel owns a fixed set of
// rows and keeps its sums per column in shared memory, writes them to its row of a partials buffer (scratch),
// and a second kernel adds the partials of every column in a fixed order into dw.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "core/cuda/cuda_backend.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/reduce.cuh"

namespace loom::cuda {
namespace {

// Blocks of the backward kernel (at most; fewer when there are fewer rows). A constant, so the partials and
// their summation order depend only on the shapes, and enough to fill an H100/H200 (132 SMs x 8 blocks).
constexpr int64_t kBackwardBlocks = 1024;
// Shared memory above which a kernel must opt in (cudaFuncAttributeMaxDynamicSharedMemorySize).
constexpr size_t kDefaultSharedBytes = 48 * 1024;

// One block per row (block-stride over rows). Bytes: 4 per element (x read, y written) + 4 per row (rstd); w
// (2 D bytes) stays in L2.
template <int W>
__global__ void __launch_bounds__(kBlockThreads)
    rmsnorm_forward_kernel(BFloat16* y, float* rstd, const BFloat16* x, const BFloat16* w, int64_t n, int64_t d,
                           float eps) {
  __shared__ float shared[32];
  const int64_t packs = d / W;
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const BFloat16* xr = x + row * d;
    BFloat16* yr = y + row * d;
    float sum_sq = 0.0f;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      float xv[W];
      load_pack<W>(xr + p * W, xv);
#pragma unroll
      for (int k = 0; k < W; ++k) sum_sq += xv[k] * xv[k];
    }
    sum_sq = block_sum(sum_sq, shared);
    // As the CPU: 1 / sqrt(mean + eps) in double, rounded once (d == 0 gives 1 / sqrt(eps) there too).
    const double mean_sq = d > 0 ? static_cast<double>(sum_sq) / static_cast<double>(d) : 0.0;
    const float rs = static_cast<float>(1.0 / sqrt(mean_sq + static_cast<double>(eps)));
    if (threadIdx.x == 0) rstd[row] = rs;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      float xv[W], wv[W];
      load_pack<W>(xr + p * W, xv);
      load_pack<W>(w + p * W, wv);
#pragma unroll
      for (int k = 0; k < W; ++k) xv[k] = xv[k] * rs * wv[k];
      store_pack<W>(yr + p * W, xv);
    }
  }
}

// Rows blockIdx.x, blockIdx.x + gridDim.x, ...: dx (+)= rs (w dy - xhat mean_d(w dy xhat)), xhat = x rs, and
// this block's dw sums (sum of dy xhat over its rows), kept in dynamic shared memory (d floats, each column
// touched by one thread only) and stored to partials[blockIdx.x, :] at the end.
// Bytes: 6 per element (x, dy read; dx written), 8 when accumulating; 4 per row (rstd); 4 D per block (partials).
template <int W>
__global__ void __launch_bounds__(kBlockThreads)
    rmsnorm_backward_kernel(BFloat16* dx, bool accumulate, float* partials, const BFloat16* dy, const BFloat16* x,
                            const BFloat16* w, const float* rstd, int64_t n, int64_t d) {
  extern __shared__ __align__(16) unsigned char dynamic_shared[];
  Pack<float, W>* dw_acc = reinterpret_cast<Pack<float, W>*>(dynamic_shared);
  __shared__ float shared[32];
  const int64_t packs = d / W;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
#pragma unroll
    for (int k = 0; k < W; ++k) dw_acc[p].v[k] = 0.0f;
  }
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const float rs = rstd[row];
    const BFloat16* xr = x + row * d;
    const BFloat16* dyr = dy + row * d;
    BFloat16* dxr = dx + row * d;
    float dot = 0.0f;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      float xv[W], dyv[W], wv[W];
      load_pack<W>(xr + p * W, xv);
      load_pack<W>(dyr + p * W, dyv);
      load_pack<W>(w + p * W, wv);
#pragma unroll
      for (int k = 0; k < W; ++k) dot += (wv[k] * dyv[k]) * (xv[k] * rs);
    }
    const float mean = d > 0 ? block_sum(dot, shared) / static_cast<float>(d) : 0.0f;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      float xv[W], dyv[W], wv[W], g[W];
      load_pack<W>(xr + p * W, xv);
      load_pack<W>(dyr + p * W, dyv);
      load_pack<W>(w + p * W, wv);
      Pack<float, W> acc = dw_acc[p];
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float xhat = xv[k] * rs;
        g[k] = rs * (wv[k] * dyv[k] - xhat * mean);
        acc.v[k] += dyv[k] * xhat;
      }
      dw_acc[p] = acc;
      write_pack<W>(dxr + p * W, g, accumulate);
    }
  }
  float* out = partials + static_cast<int64_t>(blockIdx.x) * d;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) *reinterpret_cast<Pack<float, W>*>(out + p * W) = dw_acc[p];
}

// dw[c] += sum over g of partials[g, c], in the order g = y, y + 32, ... per thread row y, then y = 0..31.
// A 32 x 32 block covers 32 columns. Bytes: 4 per partial read + 2 sizeof(TD) per column.
template <class TD>
__global__ void __launch_bounds__(1024) column_sum_kernel(TD* dw, const float* partials, int64_t groups, int64_t d) {
  __shared__ float sums[32][33];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float s = 0.0f;
  if (c < d) {
    // Unrolled so that several independent loads are in flight; the additions stay in order.
#pragma unroll 8
    for (int64_t g = threadIdx.y; g < groups; g += 32) s += partials[g * d + c];
  }
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < d) {
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < 32; ++i) total += sums[i][threadIdx.x];
    dw[c] = from_float<TD>(to_float(dw[c]) + total);
  }
}

}  // namespace

void CudaBackend::rmsnorm_forward(const Tensor& y, const Tensor& rstd, const Tensor& x, const Tensor& w, float eps) {
  const char* op = "rmsnorm_forward";
  check_dtype(y, DType::kBF16, op, "y");
  check_dtype(rstd, DType::kF32, op, "rstd");
  check_dtype(x, DType::kBF16, op, "x");
  check_dtype(w, DType::kBF16, op, "w");
  LOOM_CHECK(x.ndim() == 2, kShape, op << ": 'x' must be [N, D], got " << x.shape().str());
  const int64_t n = x.size(0), d = x.size(1);
  check_shape(y, x.shape(), op, "y");
  check_shape(rstd, Shape{n}, op, "rstd");
  check_shape(w, Shape{d}, op, "w");
  auto* py = static_cast<BFloat16*>(device_mut_ptr(y, op, "y"));
  auto* pr = static_cast<float*>(device_mut_ptr(rstd, op, "rstd"));
  auto* px = static_cast<const BFloat16*>(device_ptr(x, op, "x"));
  auto* pw = static_cast<const BFloat16*>(device_ptr(w, op, "w"));
  if (n == 0) return;
  const int width = pack_width(8, d, {{py, 2}, {px, 2}, {pw, 2}});
  dispatch_width(width, [&](auto wt) {
    constexpr int kW = decltype(wt)::value;
    rmsnorm_forward_kernel<kW><<<row_blocks(n), row_threads(d / kW), 0, stream_>>>(py, pr, px, pw, n, d, eps);
    LOOM_CUDA_CHECK_LAUNCH("rmsnorm_forward_kernel");
  });
}

void CudaBackend::rmsnorm_backward(const Tensor& dx, bool accumulate_dx, const Tensor& dw, const Tensor& dy,
                                   const Tensor& x, const Tensor& w, const Tensor& rstd) {
  const char* op = "rmsnorm_backward";
  check_dtype(dx, DType::kBF16, op, "dx");
  check_float_dtype(dw, op, "dw");
  check_dtype(dy, DType::kBF16, op, "dy");
  check_dtype(x, DType::kBF16, op, "x");
  check_dtype(w, DType::kBF16, op, "w");
  check_dtype(rstd, DType::kF32, op, "rstd");
  LOOM_CHECK(x.ndim() == 2, kShape, op << ": 'x' must be [N, D], got " << x.shape().str());
  const int64_t n = x.size(0), d = x.size(1);
  check_shape(dx, x.shape(), op, "dx");
  check_shape(dy, x.shape(), op, "dy");
  check_shape(w, Shape{d}, op, "w");
  check_shape(dw, Shape{d}, op, "dw");
  check_shape(rstd, Shape{n}, op, "rstd");
  auto* pdx = static_cast<BFloat16*>(device_mut_ptr(dx, op, "dx"));
  void* pdw = device_mut_ptr(dw, op, "dw");
  auto* pdy = static_cast<const BFloat16*>(device_ptr(dy, op, "dy"));
  auto* px = static_cast<const BFloat16*>(device_ptr(x, op, "x"));
  auto* pw = static_cast<const BFloat16*>(device_ptr(w, op, "w"));
  auto* pr = static_cast<const float*>(device_ptr(rstd, op, "rstd"));
  if (n == 0 || d == 0) return;  // dw += an empty sum

  // The dw sums of a block live in shared memory: D floats, beyond 48 KiB (D > 12288) only after opting in.
  const size_t shared_bytes = static_cast<size_t>(d) * sizeof(float);
  const bool large_shared = shared_bytes + 32 * sizeof(float) > kDefaultSharedBytes;
  if (large_shared) {
    int optin_bytes = 0;
    LOOM_CUDA_CHECK(cudaDeviceGetAttribute(&optin_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
    LOOM_CHECK(shared_bytes + 32 * sizeof(float) <= static_cast<size_t>(optin_bytes), kShape,
               op << ": row length " << d << " needs " << shared_bytes << " bytes of shared memory, the GPU allows "
                  << optin_bytes);
  }
  const int64_t groups = std::min(n, kBackwardBlocks);
  float* partials = static_cast<float*>(scratch(static_cast<size_t>(groups * d) * sizeof(float)));
  const int width = pack_width(8, d, {{pdx, 2}, {pdy, 2}, {px, 2}, {pw, 2}});
  dispatch_width(width, [&](auto wt) {
    constexpr int kW = decltype(wt)::value;
    if (large_shared)
      LOOM_CUDA_CHECK(cudaFuncSetAttribute(rmsnorm_backward_kernel<kW>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(shared_bytes)));
    rmsnorm_backward_kernel<kW><<<static_cast<unsigned>(groups), row_threads(d / kW), shared_bytes, stream_>>>(
        pdx, accumulate_dx, partials, pdy, px, pw, pr, n, d);
    LOOM_CUDA_CHECK_LAUNCH("rmsnorm_backward_kernel");
  });
  dispatch_float(dw.dtype(), [&](auto tt) {
    using TD = typename decltype(tt)::type;
    column_sum_kernel<TD><<<static_cast<unsigned>((d + 31) / 32), dim3(32, 32), 0, stream_>>>(static_cast<TD*>(pdw),
                                                                                              partials, groups, d);
    LOOM_CUDA_CHECK_LAUNCH("column_sum_kernel");
  });
}

}  // namespace loom::cuda
