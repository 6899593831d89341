// CUDA backend, cross-entropy over (possibly vocab-sharded) logits in four steps with the semantics of
// core/backend.h: row max, sum of exponentials and target logit, mean loss, gradient (reference: the ce_* methods
// of CpuBackend in core/cpu/cpu_kernels.cc). With tensor parallelism the caller all-reduces between steps.
//
// logits and dlogits are bf16 [N, V_local], statistics f32 [N], targets i32 [N] (full-vocabulary ids). The row
// kernels run one block per row and read it in 16-byte packs: block_stride_row() starts each row with single
// elements up to its first 16-byte boundary, so rows of any length and alignment take the packed path. Every
// reduction is a fixed tree (deterministic); the mean over rows is done in double by one block.
//
// The loss gradient dloss stays on the device: ce_backward reads it inside the kernel, so no step of the
// backward pass waits for the host.
#include <cmath>
#include <cstdint>

#include "core/cuda/cuda_backend.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/reduce.cuh"

namespace loom::cuda {
namespace {

constexpr int kRowPack = 8;  // bf16 elements per 16-byte pack
constexpr int kMeanThreads = 1024;

// The local column of a full-vocabulary target, or -1 when another shard holds it.
__device__ __forceinline__ int64_t local_column(int32_t target, int64_t vocab_start, int64_t v) {
  const int64_t col = static_cast<int64_t>(target) - vocab_start;
  return col >= 0 && col < v ? col : -1;
}

// row_max[r] = max_v logits[r, v]; one block per row. Bytes: 2 per logit read, 4 per row written.
__global__ void __launch_bounds__(kBlockThreads)
    ce_row_max_kernel(float* row_max, const BFloat16* logits, int64_t n, int64_t v) {
  __shared__ float shared[32];
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const BFloat16* row = logits + r * v;
    float m = -INFINITY;
    block_stride_row<kRowPack>(row, v, [&](auto width, int64_t i) {
      constexpr int w = decltype(width)::value;
      float x[w];
      load_pack<w>(row + i, x);
#pragma unroll
      for (int k = 0; k < w; ++k) m = fmaxf(m, x[k]);
    });
    m = block_max(m, shared);
    if (threadIdx.x == 0) row_max[r] = m;
  }
}

// sumexp[r] = sum_v exp(logits[r, v] - row_max[r]); target_logit[r] = logits[r, local target] or 0; one block per
// row. Bytes: 2 per logit read; 4 (row_max) + 4 (target) read and 8 written per row.
__global__ void __launch_bounds__(kBlockThreads)
    ce_sumexp_target_kernel(float* sumexp, float* target_logit, const BFloat16* logits, const float* row_max,
                            const int32_t* targets, int64_t n, int64_t v, int64_t vocab_start) {
  __shared__ float shared[32];
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const BFloat16* row = logits + r * v;
    const float m = row_max[r];
    float s = 0.0f;
    block_stride_row<kRowPack>(row, v, [&](auto width, int64_t i) {
      constexpr int w = decltype(width)::value;
      float x[w];
      load_pack<w>(row + i, x);
#pragma unroll
      for (int k = 0; k < w; ++k) s += expf(x[k] - m);
    });
    s = block_sum(s, shared);
    if (threadIdx.x == 0) {
      sumexp[r] = s;
      const int64_t col = local_column(targets[r], vocab_start, v);
      target_logit[r] = col < 0 ? 0.0f : to_float(row[col]);
    }
  }
}

// loss[0] = mean_r (log sumexp[r] + row_max[r] - target_logit[r]) in double, one block. Bytes: 12 per row.
__global__ void __launch_bounds__(kMeanThreads)
    ce_loss_mean_kernel(float* loss, const float* row_max, const float* sumexp, const float* target_logit, int64_t n) {
  __shared__ double shared[32];
  double acc = 0.0;
  for (int64_t r = threadIdx.x; r < n; r += blockDim.x)
    acc += log(static_cast<double>(sumexp[r])) + static_cast<double>(row_max[r]) - static_cast<double>(target_logit[r]);
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) loss[0] = static_cast<float>(acc / static_cast<double>(n));
}

// dlogits[r, v] (+)= g (exp(logits[r, v] - row_max[r]) / sumexp[r] - [v == target]), g = dloss[0] * scale; one
// block per row. Bytes: 2 per logit read + 2 per gradient written (+2 read when accumulating); 12 per row. W is
// kRowPack when dlogits and logits share their misalignment, else 1.
template <int W>
__global__ void __launch_bounds__(kBlockThreads)
    ce_backward_kernel(BFloat16* dlogits, bool accumulate, const BFloat16* logits, const float* row_max,
                       const float* sumexp, const int32_t* targets, int64_t n, int64_t v, int64_t vocab_start,
                       const float* dloss, float scale) {
  const float g = dloss[0] * scale;
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const BFloat16* row = logits + r * v;
    BFloat16* drow = dlogits + r * v;
    // As the CPU: g / sumexp in double, rounded once.
    const float coef = static_cast<float>(static_cast<double>(g) / static_cast<double>(sumexp[r]));
    const float m = row_max[r];
    const int64_t target = local_column(targets[r], vocab_start, v);  // -1 never matches a column
    block_stride_row<W>(row, v, [&](auto width, int64_t i) {
      constexpr int w = decltype(width)::value;
      float x[w];
      load_pack<w>(row + i, x);
#pragma unroll
      for (int k = 0; k < w; ++k) {
        x[k] = coef * expf(x[k] - m);
        if (i + k == target) x[k] -= g;
      }
      write_pack<w>(drow + i, x, accumulate);
    });
  }
}

// Checks that logits is a bf16 [N, V] tensor.
void check_logits(const Tensor& logits, const char* op) {
  check_dtype(logits, DType::kBF16, op, "logits");
  LOOM_CHECK(logits.ndim() == 2, kShape, op << ": 'logits' must be [N, V], got " << logits.shape().str());
}

void check_row_stat(const Tensor& t, int64_t n, const char* op, const char* arg) {
  check_dtype(t, DType::kF32, op, arg);
  check_shape(t, Shape{n}, op, arg);
}

}  // namespace

void CudaBackend::ce_row_max(const Tensor& row_max, const Tensor& logits) {
  const char* op = "ce_row_max";
  check_logits(logits, op);
  const int64_t n = logits.size(0), v = logits.size(1);
  check_row_stat(row_max, n, op, "row_max");
  auto* pm = static_cast<float*>(device_mut_ptr(row_max, op, "row_max"));
  auto* pl = static_cast<const BFloat16*>(device_ptr(logits, op, "logits"));
  if (n == 0) return;
  ce_row_max_kernel<<<row_blocks(n), row_threads((v + kRowPack - 1) / kRowPack), 0, stream_>>>(pm, pl, n, v);
  LOOM_CUDA_CHECK_LAUNCH("ce_row_max_kernel");
}

void CudaBackend::ce_sumexp_target(const Tensor& sumexp, const Tensor& target_logit, const Tensor& logits,
                                   const Tensor& row_max, const Tensor& targets, int64_t vocab_start) {
  const char* op = "ce_sumexp_target";
  check_logits(logits, op);
  const int64_t n = logits.size(0), v = logits.size(1);
  check_row_stat(sumexp, n, op, "sumexp");
  check_row_stat(target_logit, n, op, "target_logit");
  check_row_stat(row_max, n, op, "row_max");
  check_dtype(targets, DType::kI32, op, "targets");
  check_shape(targets, Shape{n}, op, "targets");
  auto* ps = static_cast<float*>(device_mut_ptr(sumexp, op, "sumexp"));
  auto* pt = static_cast<float*>(device_mut_ptr(target_logit, op, "target_logit"));
  auto* pl = static_cast<const BFloat16*>(device_ptr(logits, op, "logits"));
  auto* pm = static_cast<const float*>(device_ptr(row_max, op, "row_max"));
  auto* tgt = static_cast<const int32_t*>(device_ptr(targets, op, "targets"));
  if (n == 0) return;
  ce_sumexp_target_kernel<<<row_blocks(n), row_threads((v + kRowPack - 1) / kRowPack), 0, stream_>>>(
      ps, pt, pl, pm, tgt, n, v, vocab_start);
  LOOM_CUDA_CHECK_LAUNCH("ce_sumexp_target_kernel");
}

void CudaBackend::ce_loss_mean(const Tensor& loss_mean, const Tensor& row_max, const Tensor& sumexp,
                               const Tensor& target_logit) {
  const char* op = "ce_loss_mean";
  check_dtype(loss_mean, DType::kF32, op, "loss_mean");
  check_shape(loss_mean, Shape{1}, op, "loss_mean");
  check_dtype(row_max, DType::kF32, op, "row_max");
  const int64_t n = row_max.numel();
  check_row_stat(sumexp, n, op, "sumexp");
  check_row_stat(target_logit, n, op, "target_logit");
  LOOM_CHECK(n > 0, kShape, op << ": no rows");
  auto* pout = static_cast<float*>(device_mut_ptr(loss_mean, op, "loss_mean"));
  auto* pm = static_cast<const float*>(device_ptr(row_max, op, "row_max"));
  auto* ps = static_cast<const float*>(device_ptr(sumexp, op, "sumexp"));
  auto* pt = static_cast<const float*>(device_ptr(target_logit, op, "target_logit"));
  ce_loss_mean_kernel<<<1, kMeanThreads, 0, stream_>>>(pout, pm, ps, pt, n);
  LOOM_CUDA_CHECK_LAUNCH("ce_loss_mean_kernel");
}

void CudaBackend::ce_backward(const Tensor& dlogits, bool accumulate, const Tensor& logits, const Tensor& row_max,
                              const Tensor& sumexp, const Tensor& targets, int64_t vocab_start, const Tensor& dloss,
                              float scale) {
  const char* op = "ce_backward";
  check_logits(logits, op);
  const int64_t n = logits.size(0), v = logits.size(1);
  check_dtype(dlogits, DType::kBF16, op, "dlogits");
  check_shape(dlogits, logits.shape(), op, "dlogits");
  check_row_stat(row_max, n, op, "row_max");
  check_row_stat(sumexp, n, op, "sumexp");
  check_dtype(targets, DType::kI32, op, "targets");
  check_shape(targets, Shape{n}, op, "targets");
  check_dtype(dloss, DType::kF32, op, "dloss");
  check_shape(dloss, Shape{1}, op, "dloss");
  auto* pd = static_cast<BFloat16*>(device_mut_ptr(dlogits, op, "dlogits"));
  auto* pl = static_cast<const BFloat16*>(device_ptr(logits, op, "logits"));
  auto* pm = static_cast<const float*>(device_ptr(row_max, op, "row_max"));
  auto* ps = static_cast<const float*>(device_ptr(sumexp, op, "sumexp"));
  auto* tgt = static_cast<const int32_t*>(device_ptr(targets, op, "targets"));
  auto* pdl = static_cast<const float*>(device_ptr(dloss, op, "dloss"));
  if (n == 0 || v == 0) return;
  auto launch = [&](auto w) {
    constexpr int kW = decltype(w)::value;
    ce_backward_kernel<kW><<<row_blocks(n), row_threads((v + kW - 1) / kW), 0, stream_>>>(
        pd, accumulate, pl, pm, ps, tgt, n, v, vocab_start, pdl, scale);
    LOOM_CUDA_CHECK_LAUNCH("ce_backward_kernel");
  };
  // Rows of the two reach 16-byte boundaries together (packed path) unless their bases differ in misalignment.
  if (same_misalignment(pd, pl)) {
    launch(Width<kRowPack>{});
  } else {
    launch(Width<1>{});
  }
}

}  // namespace loom::cuda
