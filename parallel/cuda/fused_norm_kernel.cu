// The fused all-reduce + residual add + RMSNorm kernels; the protocol is in fused_norm_kernel.h.
#include "parallel/cuda/fused_norm_kernel.h"

#include <cuda_bf16.h>

#include "core/cuda/cuda_check.h"
#include "core/cuda/reduce.cuh"
#include "core/error.h"

namespace loom::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPack = 8;  // bf16 elements per 16-byte access

struct Views {  // the kernel's copy of the group, by value
  int ranks, rank;
  BFloat16* stage[kFusedMaxRanks];
  uint32_t* flags[kFusedMaxRanks];
  const volatile uint32_t* abort;
  uint32_t* error;
};

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint32_t load_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Loads that bypass L1 (a buffer a peer rewrote since this SM last read it must not come from a stale L1 line).
__device__ __forceinline__ void load_pack_cg(const BFloat16* p, float (&out)[kPack]) {
  const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(p));
  const BFloat16* h = reinterpret_cast<const BFloat16*>(&raw);
#pragma unroll
  for (int k = 0; k < kPack; ++k) out[k] = __bfloat162float(h[k]);
}

__device__ __forceinline__ void copy_pack(BFloat16* dst, const BFloat16* src) {
  *reinterpret_cast<uint4*>(dst) = __ldcg(reinterpret_cast<const uint4*>(src));
}

// Barrier `which` of block blockIdx.x: tell every peer this block arrived at `epoch`, then wait until each
// peer's block did. False (after recording why) when the abort word is set, another block of this rank already
// failed, or the deadline passes. Called by every thread of the block; returns the same to all.
__device__ bool block_barrier(const Views& v, int which, uint32_t epoch, uint64_t deadline) {
  __shared__ int ok;
  __syncthreads();  // this block's stores of the phase are issued
  if (threadIdx.x == 0) {
    ok = 1;
    __threadfence_system();
    const int64_t slot = (static_cast<int64_t>(which) * kFusedMaxRanks + v.rank) * kFusedMaxBlocks + blockIdx.x;
    for (int p = 0; p < v.ranks; ++p) store_release_sys(v.flags[p] + slot, epoch);
    const uint32_t* mine = v.flags[v.rank];
    for (int p = 0; p < v.ranks && ok; ++p) {
      const uint32_t* f = mine + (static_cast<int64_t>(which) * kFusedMaxRanks + p) * kFusedMaxBlocks + blockIdx.x;
      while (static_cast<int32_t>(load_acquire_sys(f) - epoch) < 0) {
        uint32_t why = 0;
        if (*v.abort != 0) why = kFusedAborted;
        else if (global_ns() > deadline) why = kFusedDeadline;
        else if (*reinterpret_cast<volatile uint32_t*>(v.error) != 0) why = 0xffffffffu;  // a sibling block failed
        if (why != 0) {
          if (why != 0xffffffffu) atomicCAS(v.error, 0u, (why << 8) | static_cast<uint32_t>(p));
          ok = 0;
          break;
        }
      }
    }
  }
  __syncthreads();
  return ok != 0;
}

// This block's rows: row % gridDim.x == blockIdx.x, within [begin, end).
__device__ __forceinline__ int64_t first_row(int64_t begin) {
  const int64_t b = static_cast<int64_t>(blockIdx.x), g = static_cast<int64_t>(gridDim.x);
  return begin + ((b - begin % g) % g + g) % g;
}

// Copies this block's rows of the partial into this rank's input buffer `in_off` (bf16 elements).
__device__ void stage_input(const Views& v, const BFloat16* partial, int64_t in_off, int64_t rows, int64_t d) {
  BFloat16* in = v.stage[v.rank] + in_off;
  for (int64_t row = first_row(0); row < rows; row += gridDim.x)
    for (int64_t p = threadIdx.x; p < d / kPack; p += blockDim.x)
      *reinterpret_cast<uint4*>(in + row * d + p * kPack) =
          *reinterpret_cast<const uint4*>(partial + row * d + p * kPack);
}

// One row: r = bf16(sum over ranks 0..W-1 of in_p[row] + residual[row]) written to res_dst[0..n_dst) (the same
// row offset in each), then y = bf16(r * rstd * w) written to norm_dst[...]. rstd as the backend's RMSNorm:
// 1 / sqrt(mean(r^2) + eps) in double, rounded once. res_dst[0] is re-read for the second pass.
__device__ void reduce_norm_row(const Views& v, int64_t in_off, int64_t row, int64_t d, const BFloat16* residual,
                                const BFloat16* w, float eps, BFloat16* const* res_dst, BFloat16* const* norm_dst,
                                int n_dst, float* rstd, float* shared) {
  const int64_t packs = d / kPack, base = row * d;
  float sum_sq = 0.0f;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    float acc[kPack], x[kPack];
    load_pack_cg(v.stage[0] + in_off + base + p * kPack, acc);
    for (int q = 1; q < v.ranks; ++q) {
      load_pack_cg(v.stage[q] + in_off + base + p * kPack, x);
#pragma unroll
      for (int k = 0; k < kPack; ++k) acc[k] += x[k];
    }
    load_pack<kPack>(residual + base + p * kPack, x);
    uint4 out;
    BFloat16* o = reinterpret_cast<BFloat16*>(&out);
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      o[k] = __float2bfloat16_rn(acc[k] + x[k]);
      const float r = __bfloat162float(o[k]);
      sum_sq += r * r;
    }
    for (int i = 0; i < n_dst; ++i) *reinterpret_cast<uint4*>(res_dst[i] + base + p * kPack) = out;
  }
  sum_sq = block_sum(sum_sq, shared);
  const double mean_sq = static_cast<double>(sum_sq) / static_cast<double>(d);
  const float rs = static_cast<float>(1.0 / sqrt(mean_sq + static_cast<double>(eps)));
  if (rstd != nullptr && threadIdx.x == 0) rstd[row] = rs;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    float r[kPack], wv[kPack];
    load_pack<kPack>(res_dst[0] + base + p * kPack, r);  // this thread's own stores
    load_pack<kPack>(w + p * kPack, wv);
#pragma unroll
    for (int k = 0; k < kPack; ++k) r[k] = r[k] * rs * wv[k];
    uint4 out;
    BFloat16* o = reinterpret_cast<BFloat16*>(&out);
#pragma unroll
    for (int k = 0; k < kPack; ++k) o[k] = __float2bfloat16_rn(r[k]);
    for (int i = 0; i < n_dst; ++i) *reinterpret_cast<uint4*>(norm_dst[i] + base + p * kPack) = out;
  }
}

// The rstd of a row of this rank's residual output, summed exactly as reduce_norm_row sums it (the same
// thread-to-pack mapping, the same order within a pack, the same block reduction), so every rank gets the
// owner's value bit for bit.
__device__ float row_rstd(const BFloat16* res, int64_t row, int64_t d, float eps, float* shared) {
  float sum_sq = 0.0f;
  for (int64_t p = threadIdx.x; p < d / kPack; p += blockDim.x) {
    float r[kPack];
    load_pack<kPack>(res + row * d + p * kPack, r);
#pragma unroll
    for (int k = 0; k < kPack; ++k) sum_sq += r[k] * r[k];
  }
  sum_sq = block_sum(sum_sq, shared);
  return static_cast<float>(1.0 / sqrt(static_cast<double>(sum_sq) / static_cast<double>(d) + static_cast<double>(eps)));
}

// Staging layout per rank (bf16 elements; cap = the capacity of the staging buffer / 4, the same for every call
// whatever its shape, so the parity rule holds when shapes change between calls):
// [in 0][in 1][out residual][out normed].
__global__ void __launch_bounds__(kThreads)
    fused_two_shot(Views v, const BFloat16* partial, const BFloat16* residual, const BFloat16* w,
                   BFloat16* residual_out, BFloat16* normed, float* rstd, int64_t rows, int64_t d, int64_t cap,
                   float eps, uint32_t epoch, uint64_t timeout_ns) {
  __shared__ float shared[32];
  const int64_t in_off = (epoch & 1u) * cap;  // the same parity rule as one-shot, so the two can alternate
  const uint64_t deadline = global_ns() + timeout_ns;
  stage_input(v, partial, in_off, rows, d);
  if (!block_barrier(v, 0, epoch, deadline)) return;
  // This rank's token slice: rows [rank * rows / W, (rank + 1) * rows / W).
  const int64_t begin = rows * v.rank / v.ranks, end = rows * (v.rank + 1) / v.ranks;
  BFloat16* res_dst[kFusedMaxRanks];
  BFloat16* norm_dst[kFusedMaxRanks];
  for (int q = 0; q < v.ranks; ++q) {  // own buffers first: the second pass re-reads res_dst[0]
    const int p = (v.rank + q) % v.ranks;
    res_dst[q] = v.stage[p] + 2 * cap;
    norm_dst[q] = v.stage[p] + 3 * cap;
  }
  for (int64_t row = first_row(begin); row < end; row += gridDim.x)
    reduce_norm_row(v, in_off, row, d, residual, w, eps, res_dst, norm_dst, v.ranks, nullptr, shared);
  if (!block_barrier(v, 1, epoch, deadline)) return;
  const BFloat16* my_res = v.stage[v.rank] + 2 * cap;
  const BFloat16* my_norm = v.stage[v.rank] + 3 * cap;
  for (int64_t row = first_row(0); row < rows; row += gridDim.x) {
    for (int64_t p = threadIdx.x; p < d / kPack; p += blockDim.x) {
      copy_pack(residual_out + row * d + p * kPack, my_res + row * d + p * kPack);
      copy_pack(normed + row * d + p * kPack, my_norm + row * d + p * kPack);
    }
    if (rstd != nullptr) {
      const float rs = row_rstd(residual_out, row, d, eps, shared);  // this thread's own stores
      if (threadIdx.x == 0) rstd[row] = rs;
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    fused_one_shot(Views v, const BFloat16* partial, const BFloat16* residual, const BFloat16* w,
                   BFloat16* residual_out, BFloat16* normed, float* rstd, int64_t rows, int64_t d, int64_t cap,
                   float eps, uint32_t epoch, uint64_t timeout_ns) {
  __shared__ float shared[32];
  const int64_t in_off = (epoch & 1u) * cap;
  const uint64_t deadline = global_ns() + timeout_ns;
  stage_input(v, partial, in_off, rows, d);
  if (!block_barrier(v, 0, epoch, deadline)) return;
  BFloat16* res_dst[1] = {residual_out};
  BFloat16* norm_dst[1] = {normed};
  for (int64_t row = first_row(0); row < rows; row += gridDim.x)
    reduce_norm_row(v, in_off, row, d, residual, w, eps, res_dst, norm_dst, 1, rstd, shared);
}

__global__ void spin(uint64_t ns) {
  const uint64_t end = global_ns() + ns;
  while (global_ns() < end) {
  }
}

// CUDA loads kernels lazily (CUDA_MODULE_LOADING=LAZY, the default), and loading one can wait for the kernels
// already running: if those are fused kernels waiting for a peer whose next kernel is the one being loaded, the
// group deadlocks until the deadline (seen on H100 with the spin kernel launched between fused calls). So every
// kernel of this file is loaded before the first launch of any of them.
void load_kernels_once() {
  static const bool loaded = [] {
    cudaFuncAttributes attr;
    LOOM_CUDA_CHECK(cudaFuncGetAttributes(&attr, fused_two_shot));
    LOOM_CUDA_CHECK(cudaFuncGetAttributes(&attr, fused_one_shot));
    LOOM_CUDA_CHECK(cudaFuncGetAttributes(&attr, spin));
    return true;
  }();
  (void)loaded;
}

}  // namespace

void launch_spin(uint64_t ns, cudaStream_t stream) {
  load_kernels_once();
  spin<<<1, 1, 0, stream>>>(ns);
  LOOM_CUDA_CHECK_LAUNCH("spin");
}

int64_t fused_stage_bytes(int64_t rows, int64_t d) {
  return 4 * rows * d * static_cast<int64_t>(sizeof(BFloat16));
}

int64_t fused_stage_capacity(int64_t stage_bytes) {
  return stage_bytes / (4 * static_cast<int64_t>(sizeof(BFloat16))) / kPack * kPack;
}

const char* fused_error_kind(uint32_t error) {
  switch (error >> 8) {
    case 0: return "";
    case kFusedDeadline: return "a peer did not arrive before the deadline (dead or hung)";
    case kFusedAborted: return "aborted by the launcher";
  }
  return "unknown failure";
}

void launch_fused_allreduce_add_rmsnorm(const FusedNormGroup& g, const FusedNormArgs& a, cudaStream_t stream) {
  const char* op = "fused_allreduce_add_rmsnorm";
  LOOM_CHECK(g.ranks >= 1 && g.ranks <= kFusedMaxRanks && g.rank >= 0 && g.rank < g.ranks, kComm,
             op << ": group of " << g.ranks << " ranks (rank " << g.rank << "); 1.." << kFusedMaxRanks << " supported");
  LOOM_CHECK(a.d > 0 && a.d % kPack == 0, kShape, op << ": hidden size " << a.d << " must be a positive multiple of " << kPack);
  LOOM_CHECK(a.rows >= 0, kShape, op << ": negative row count");
  LOOM_CHECK(a.blocks >= 1 && a.blocks <= kFusedMaxBlocks, kConfig,
             op << ": blocks " << a.blocks << " out of 1.." << kFusedMaxBlocks);
  LOOM_CHECK(a.rows * a.d <= fused_stage_capacity(g.stage_bytes), kShape,
             op << ": " << a.rows << " x " << a.d << " needs " << fused_stage_bytes(a.rows, a.d)
                << " staging bytes per rank, the group has " << g.stage_bytes);
  LOOM_CHECK(g.abort != nullptr && g.error != nullptr, kComm, op << ": group without abort/error words");
  for (const void* p : {a.partial, a.residual, a.weight, static_cast<const void*>(a.residual_out),
                        static_cast<const void*>(a.normed)})
    LOOM_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, kShape, op << ": tensors must be 16-byte aligned");
  if (a.rows == 0) return;
  load_kernels_once();
  Views v{};
  v.ranks = g.ranks;
  v.rank = g.rank;
  for (int p = 0; p < g.ranks; ++p) {
    LOOM_CHECK(g.stage[p] != nullptr && g.flags[p] != nullptr, kComm, op << ": rank " << p << "'s buffers are missing");
    v.stage[p] = static_cast<BFloat16*>(g.stage[p]);
    v.flags[p] = g.flags[p];
  }
  v.abort = g.abort;
  v.error = g.error;
  const auto timeout_ns = static_cast<uint64_t>(a.timeout_s * 1e9);
  auto* partial = static_cast<const BFloat16*>(a.partial);
  auto* residual = static_cast<const BFloat16*>(a.residual);
  auto* w = static_cast<const BFloat16*>(a.weight);
  auto* res_out = static_cast<BFloat16*>(a.residual_out);
  auto* normed = static_cast<BFloat16*>(a.normed);
  const int64_t cap = fused_stage_capacity(g.stage_bytes);
  if (a.algo == FusedAlgo::kTwoShot)
    fused_two_shot<<<a.blocks, kThreads, 0, stream>>>(v, partial, residual, w, res_out, normed, a.rstd, a.rows, a.d,
                                                       cap, a.eps, a.epoch, timeout_ns);
  else
    fused_one_shot<<<a.blocks, kThreads, 0, stream>>>(v, partial, residual, w, res_out, normed, a.rstd, a.rows, a.d,
                                                       cap, a.eps, a.epoch, timeout_ns);
  LOOM_CUDA_CHECK_LAUNCH(op);
}

}  // namespace loom::cuda
