// CUDA backend, the optimizer's kernels: the sum of squares (gradient norm) and one fused AdamW pass, with the
// semantics of core/backend.h (reference: CpuBackend::sum_squares / adamw in core/cpu/cpu_kernels.cc).
//
// Master weights, m and v are f32; gradients f32 or bf16; the compute copy of the weights bf16 (or f32, possibly
// the master itself). Both kernels stream each array once in 16-byte packs where the pointers allow.
//
// Neither kernel waits for the host: the squared norm that decides gradient clipping stays on the device and
// the AdamW kernel derives the clip factor from it; only the bias corrections, which depend on the step alone,
// are computed on the host (in double, as the CPU backend does).
//
// The sum of squares is deterministic: a grid whose size depends only on n writes one double per block to
// scratch, and a single block adds those in a fixed order.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "core/cuda/cuda_backend.h"
#include "core/cuda/cuda_check.h"
#include "core/cuda/kernels.h"
#include "core/cuda/reduce.cuh"

namespace loom::cuda {
namespace {

// Blocks of the first stage of sum_squares: at most kSumBlocks (one wave on 132 SMs x 8 blocks), and each
// thread gets at least kSumItemsPerThread elements.
constexpr int64_t kSumBlocks = 1024;
constexpr int64_t kSumItemsPerThread = 32;

// partials[b] = sum of x^2 over this block's grid-stride share, as f32 sums of one pack added in double.
// Bytes: sizeof(T) per element read, 8 per block written.
template <class T, int W>
__global__ void __launch_bounds__(kBlockThreads) sum_squares_partial_kernel(double* partials, const T* x, int64_t n) {
  __shared__ double shared[32];
  double acc = 0.0;
  grid_stride_packs<W>(n, [&](auto width, int64_t i) {
    constexpr int w = decltype(width)::value;
    float v[w];
    load_pack<w>(x + i, v);
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < w; ++k) s += v[k] * v[k];
    acc += static_cast<double>(s);
  });
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// out[0] (+)= sum of partials[0, blocks) (one block, fixed order). Bytes: 8 per partial, 4 or 8 for out.
__global__ void __launch_bounds__(kBlockThreads)
    sum_squares_final_kernel(float* out, const double* partials, int64_t blocks, bool accumulate) {
  __shared__ double shared[32];
  double acc = 0.0;
  for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) acc += partials[b];
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) out[0] = static_cast<float>(accumulate ? static_cast<double>(out[0]) + acc : acc);
}

struct AdamWParams {
  float lr, beta1, beta2, eps, weight_decay, grad_scale, max_norm;
  float bias1, bias2;  // 1 - beta^step
};

// One AdamW step per element (the formula of core/backend.h, in the CPU's order of operations). norm_sq is null
// when clipping is off. Bytes: 12 read + 12 written (master, m, v) + sizeof(TG) read + sizeof(TO) written per
// element: 30 for f32 gradients and bf16 weights. out may alias master (both receive the same value).
template <class TG, class TO, int W>
__global__ void __launch_bounds__(kBlockThreads) adamw_kernel(float* master, float* m, float* v, const TG* grad,
                                                              TO* out, const float* norm_sq, AdamWParams a, int64_t n) {
  float g_scale = a.grad_scale;
  if (norm_sq != nullptr) {
    const double norm = sqrt(static_cast<double>(*norm_sq)) * static_cast<double>(a.grad_scale);
    const double clip = fmin(1.0, static_cast<double>(a.max_norm) / (norm + 1e-6));
    g_scale = static_cast<float>(static_cast<double>(a.grad_scale) * clip);
  }
  grid_stride_packs<W>(n, [&](auto width, int64_t i) {
    constexpr int w = decltype(width)::value;
    float pw[w], pm[w], pv[w], pg[w];
    load_pack<w>(master + i, pw);
    load_pack<w>(m + i, pm);
    load_pack<w>(v + i, pv);
    load_pack<w>(grad + i, pg);
#pragma unroll
    for (int k = 0; k < w; ++k) {
      const float g = pg[k] * g_scale;
      const float mi = a.beta1 * pm[k] + (1.0f - a.beta1) * g;
      const float vi = a.beta2 * pv[k] + (1.0f - a.beta2) * (g * g);
      const float mhat = mi / a.bias1, vhat = vi / a.bias2;
      pw[k] = pw[k] - a.lr * (mhat / (sqrtf(vhat) + a.eps) + a.weight_decay * pw[k]);
      pm[k] = mi;
      pv[k] = vi;
    }
    store_pack<w>(m + i, pm);
    store_pack<w>(v + i, pv);
    store_pack<w>(master + i, pw);
    store_pack<w>(out + i, pw);
  });
}

}  // namespace

void CudaBackend::sum_squares(const Tensor& out, const Tensor& x, bool accumulate) {
  const char* op = "sum_squares";
  check_dtype(out, DType::kF32, op, "out");
  check_shape(out, Shape{1}, op, "out");
  check_float_dtype(x, op, "x");
  auto* po = static_cast<float*>(device_mut_ptr(out, op, "out"));
  const void* px = device_ptr(x, op, "x");
  const int64_t n = x.numel();
  const int64_t per_block = kBlockThreads * kSumItemsPerThread;
  const int64_t blocks = std::clamp<int64_t>((n + per_block - 1) / per_block, 1, kSumBlocks);
  auto* partials = static_cast<double*>(scratch(static_cast<size_t>(blocks) * sizeof(double)));
  const size_t es = dtype_size(x.dtype());
  const int width = pack_width(max_pack({x.dtype()}), 0, {{px, es}});
  dispatch_float(x.dtype(), [&](auto tt) {
    using T = typename decltype(tt)::type;
    dispatch_width(width, [&](auto w) {
      constexpr int kW = decltype(w)::value;
      sum_squares_partial_kernel<T, kW>
          <<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream_>>>(partials, static_cast<const T*>(px), n);
      LOOM_CUDA_CHECK_LAUNCH("sum_squares_partial_kernel");
    });
  });
  sum_squares_final_kernel<<<1, kBlockThreads, 0, stream_>>>(po, partials, blocks, accumulate);
  LOOM_CUDA_CHECK_LAUNCH("sum_squares_final_kernel");
}

void CudaBackend::adamw(const Tensor& master, const Tensor& m, const Tensor& v, const Tensor& grad,
                        const Tensor& compute_out, const Tensor& norm_sq, const AdamWArgs& args) {
  const char* op = "adamw";
  check_dtype(master, DType::kF32, op, "master");
  check_dtype(m, DType::kF32, op, "m");
  check_dtype(v, DType::kF32, op, "v");
  check_float_dtype(grad, op, "grad");
  check_float_dtype(compute_out, op, "compute_out");
  const int64_t n = master.numel();
  auto check_numel = [&](const Tensor& t, const char* arg) {
    LOOM_CHECK(t.numel() == n, kShape, op << ": '" << arg << "' has " << t.numel() << " elements, 'master' has " << n);
  };
  check_numel(m, "m");
  check_numel(v, "v");
  check_numel(grad, "grad");
  check_numel(compute_out, "compute_out");
  LOOM_CHECK(args.step >= 1, kConfig, op << ": step is 1-based, got " << args.step);
  auto* pw = static_cast<float*>(device_mut_ptr(master, op, "master"));
  auto* pm = static_cast<float*>(device_mut_ptr(m, op, "m"));
  auto* pv = static_cast<float*>(device_mut_ptr(v, op, "v"));
  const void* pg = device_ptr(grad, op, "grad");
  void* pout = device_mut_ptr(compute_out, op, "compute_out");
  const float* pn = nullptr;
  if (args.max_norm > 0 && !norm_sq.is_null()) {
    check_dtype(norm_sq, DType::kF32, op, "norm_sq");
    check_shape(norm_sq, Shape{1}, op, "norm_sq");
    pn = static_cast<const float*>(device_ptr(norm_sq, op, "norm_sq"));
  }
  if (n == 0) return;

  AdamWParams a{};
  a.lr = args.lr;
  a.beta1 = args.beta1;
  a.beta2 = args.beta2;
  a.eps = args.eps;
  a.weight_decay = args.weight_decay;
  a.grad_scale = args.grad_scale;
  a.max_norm = args.max_norm;
  a.bias1 = static_cast<float>(1.0 - std::pow(static_cast<double>(args.beta1), static_cast<double>(args.step)));
  a.bias2 = static_cast<float>(1.0 - std::pow(static_cast<double>(args.beta2), static_cast<double>(args.step)));

  const int width = pack_width(
      4, 0, {{pw, 4}, {pm, 4}, {pv, 4}, {pg, dtype_size(grad.dtype())}, {pout, dtype_size(compute_out.dtype())}});
  dispatch_float(grad.dtype(), [&](auto gt) {
    using TG = typename decltype(gt)::type;
    dispatch_float(compute_out.dtype(), [&](auto ot) {
      using TO = typename decltype(ot)::type;
      dispatch_width(width, [&](auto w) {
        constexpr int kW = decltype(w)::value;
        if constexpr (kW <= 4) {  // pack_width(4, ...) never returns 8: no kernel for it
          adamw_kernel<TG, TO, kW><<<grid_for((n + kW - 1) / kW, kBlockThreads), kBlockThreads, 0, stream_>>>(
              pw, pm, pv, static_cast<const TG*>(pg), static_cast<TO*>(pout), pn, a, n);
          LOOM_CUDA_CHECK_LAUNCH("adamw_kernel");
        }
      });
    });
  });
}

}  // namespace loom::cuda
