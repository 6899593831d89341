// Fused all-reduce + residual add + RMSNorm benchmark (issue 5, docs/fused_norm.md): Loom's one-kernel
// one-shot and two-shot paths (cuda::IpcFusedNorm, the kernels the TP op runs) against NCCL followed by a
// separate norm, on the GPUs of one node, one rank per GPU. Any rank count the node has (2, 4, 8).
//
// Protocol
//   - Layout: `mpirun -np W fused_norm_bench ...`; rank r uses GPU (node-local rank % visible GPUs). NCCL
//     refuses two ranks on one GPU: where ranks share a GPU the NCCL variants are skipped (with the reason in the
//     output) and Loom's are still run, so the program can be checked on one GPU — those figures say nothing
//     about NVLink (`shared_gpus: true` in the JSON).
//   - Data: bf16, hidden d in --hidden (default 2048, 4096, 8192), tokens in --tokens (default 1, 2, 4, ...,
//     16384); message = the partial, tokens * d * 2 bytes. partial differs per rank, residual and weight are the
//     same on every rank (a hash of the index, uniform in [-1, 1); weight in [0.5, 1.5)), eps 1e-5.
//   - Variants, each producing residual_out = residual + sum_r partial_r and normed = rmsnorm(residual_out) * w:
//       nccl_allreduce   ncclAllReduce of the partial alone (no norm): the communication floor, for reference
//       nccl_ar_norm     ncclAllReduce, then one fused add + RMSNorm kernel (this file; one block per row,
//                        16-byte loads): the peer every speed-up is against
//       nccl_rs_norm_ag  ncclReduceScatter (rows padded to a multiple of W), add + RMSNorm on the rank's rows,
//                        ncclAllGather of residual_out and of normed (one NCCL group)
//       ours_oneshot     IpcFusedNorm::run, one-shot, --blocks SMs (default 16)
//       ours_twoshot     IpcFusedNorm::run, two-shot, --blocks SMs
//       ours_ar_1shot    Loom's kernels as an all-reduce alone (FusedNormArgs::allreduce_only: no residual, no
//       ours_ar_2shot    norm), one-shot and two-shot, --blocks SMs: what the norm costs inside the kernel; their
//                        peer is nccl_allreduce (ar_speedup in the JSON: nccl_allreduce / the faster of the two)
//   - The backward, the same way: nccl_ar_norm_bwd (ncclAllReduce of the normalised rows' partial gradient, then
//     a plain RMSNorm backward in this file: dx one block per row, dw by 32 row chunks + a column sum) against
//     ours_bwd_1shot / ours_bwd_2shot (IpcFusedNorm::run_backward); dx and dw checked as below (dw from zero);
//     bwd_speedup in the JSON = nccl_ar_norm_bwd / the faster of ours. Not part of the goals; it tells what the
//     training step's backward gets.
//   - Correctness before timing, at every size: ours (both algorithms) against nccl_ar_norm: residual_out and
//     normed within 2e-2 norm-wise relative error (NCCL sums in its own order; both round to bf16), and equal
//     bit for bit on every rank; ours as an all-reduce alone against nccl_allreduce the same way. A mismatch is
//     reported and makes the exit status 1.
//   - Timing: each variant's call is captured --calls times (default 10) into one CUDA graph; 3 warm-up
//     replays; then --replays (default 30) replays, each after an MPI barrier, timed with CUDA events on each
//     rank; per replay the slowest rank's time / calls is the time of a call; reported: median and p99
//     (nearest rank) over the replays, algorithm bandwidth bytes / median, bus bandwidth algbw * 2(W-1)/W (the
//     all-reduce convention), and SMs used (ours: --blocks; NCCL: its own channels, not reported).
//   - Speed-up at each size = nccl_ar_norm median / the faster of ours_oneshot and ours_twoshot.
//     min_speedup_upto_2MiB = the worst speed-up over messages <= 2 MiB and every hidden size;
//     min_speedup_8_64MiB = the worst over 8 MiB <= message <= 64 MiB. Goals (issue 5): >= 1.5 and >= 1.15.
//   - Tuning: one_shot_max_bytes = for each hidden size the largest message at which one-shot is faster than
//     two-shot with two-shot faster at every larger size measured; the smallest of those over hidden sizes.
//     --tuning-out PATH writes it as a line `ranks W one_shot_max_bytes B` (replacing that rank count's line,
//     keeping the others), the table NcclCommunicator reads (parallel.fused_tuning).
//   - e2e_step_speedup is not measured here (the TP=2 training step with fusion + overlap on against off):
//     bench/fused_norm_e2e.py runs this program and both trainings and adds it to the JSON.
//   - Output: a table per hidden size on rank 0; --json PATH writes everything (bench/results/*rmsnorm*.json).
//
//   mpirun -np W fused_norm_bench [--hidden 2048,4096,8192] [--tokens 1,2,...] [--blocks 16] [--calls 10]
//                                 [--replays 30] [--quick] [--json PATH] [--tuning-out PATH]
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "core/cuda/cuda_check.h"
#include "core/error.h"
#include "parallel/cuda/ipc_fused_norm.h"
#include "parallel/fused_tuning.h"

namespace {

using loom::cuda::FusedAlgo;

#define BENCH_NCCL(expr)                                                                            \
  do {                                                                                              \
    ncclResult_t r_ = (expr);                                                                       \
    if (r_ != ncclSuccess) LOOM_THROW(kComm, #expr << " failed: " << ncclGetErrorString(r_));        \
  } while (0)

// ---- kernels: inputs and the peer's add + RMSNorm ---------------------------------------------------------

__device__ float hash_uniform(uint64_t seed, uint64_t i) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + i + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;  // [-1, 1)
}

__global__ void fill_kernel(__nv_bfloat16* out, int64_t n, uint64_t seed, float scale, float offset) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16(offset + scale * hash_uniform(seed, static_cast<uint64_t>(i)));
}

// residual_out = bf16(residual + sum), normed = bf16(residual_out * rstd * w); one block per row, 8 bf16 per
// 16-byte access (d % 8 == 0).
constexpr int kNormThreads = 256;

__global__ void add_rmsnorm_kernel(const __nv_bfloat16* sum, const __nv_bfloat16* residual, const __nv_bfloat16* w,
                                   __nv_bfloat16* residual_out, __nv_bfloat16* normed, float* rstd, int64_t d,
                                   float eps) {
  const int64_t row = blockIdx.x;
  const uint4* s4 = reinterpret_cast<const uint4*>(sum + row * d);
  const uint4* r4 = reinterpret_cast<const uint4*>(residual + row * d);
  uint4* o4 = reinterpret_cast<uint4*>(residual_out + row * d);
  const int64_t vecs = d / 8;
  float sq = 0;
  for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) {
    uint4 a = s4[v], b = r4[v], o;
    const __nv_bfloat16* pa = reinterpret_cast<const __nv_bfloat16*>(&a);
    const __nv_bfloat16* pb = reinterpret_cast<const __nv_bfloat16*>(&b);
    __nv_bfloat16* po = reinterpret_cast<__nv_bfloat16*>(&o);
    for (int k = 0; k < 8; ++k) {
      po[k] = __float2bfloat16(__bfloat162float(pa[k]) + __bfloat162float(pb[k]));
      const float x = __bfloat162float(po[k]);
      sq += x * x;
    }
    o4[v] = o;
  }
  __shared__ float partial[kNormThreads / 32];
  for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sq;
  __syncthreads();
  __shared__ float scale;
  if (threadIdx.x == 0) {
    float total = 0;
    for (int i = 0; i < kNormThreads / 32; ++i) total += partial[i];
    scale = rsqrtf(total / static_cast<float>(d) + eps);
    rstd[row] = scale;
  }
  __syncthreads();
  const uint4* w4 = reinterpret_cast<const uint4*>(w);
  uint4* n4 = reinterpret_cast<uint4*>(normed + row * d);
  for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) {
    uint4 x = o4[v], g = w4[v], n;
    const __nv_bfloat16* px = reinterpret_cast<const __nv_bfloat16*>(&x);
    const __nv_bfloat16* pg = reinterpret_cast<const __nv_bfloat16*>(&g);
    __nv_bfloat16* pn = reinterpret_cast<__nv_bfloat16*>(&n);
    for (int k = 0; k < 8; ++k) pn[k] = __float2bfloat16(__bfloat162float(px[k]) * scale * __bfloat162float(pg[k]));
    n4[v] = n;
  }
}

// The peer of the backward: dx = bf16(rstd * (w * dn - xhat * mean_d(w * dn * xhat))), xhat = x * rstd, one
// block per row; dw += sum over rows of dn * xhat by a grid of (column blocks, kDwChunks row chunks) writing f32
// partials, then a column sum over the chunks.
constexpr int kDwChunks = 32;

__global__ void rmsnorm_backward_dx_kernel(const __nv_bfloat16* dn, const __nv_bfloat16* x, const __nv_bfloat16* w,
                                           const float* rstd, __nv_bfloat16* dx, int64_t d) {
  const int64_t row = blockIdx.x, vecs = d / 8;
  const float rs = rstd[row];
  const uint4* dn4 = reinterpret_cast<const uint4*>(dn + row * d);
  const uint4* x4 = reinterpret_cast<const uint4*>(x + row * d);
  const uint4* w4 = reinterpret_cast<const uint4*>(w);
  float dot = 0;
  for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) {
    uint4 a = dn4[v], b = x4[v], c = w4[v];
    const __nv_bfloat16* pa = reinterpret_cast<const __nv_bfloat16*>(&a);
    const __nv_bfloat16* pb = reinterpret_cast<const __nv_bfloat16*>(&b);
    const __nv_bfloat16* pc = reinterpret_cast<const __nv_bfloat16*>(&c);
    for (int k = 0; k < 8; ++k)
      dot += __bfloat162float(pc[k]) * __bfloat162float(pa[k]) * __bfloat162float(pb[k]) * rs;
  }
  __shared__ float partial[kNormThreads / 32];
  for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = dot;
  __syncthreads();
  float total = 0;
  for (int i = 0; i < kNormThreads / 32; ++i) total += partial[i];
  const float mean = total / static_cast<float>(d);
  uint4* o4 = reinterpret_cast<uint4*>(dx + row * d);
  for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) {
    uint4 a = dn4[v], b = x4[v], c = w4[v], o;
    const __nv_bfloat16* pa = reinterpret_cast<const __nv_bfloat16*>(&a);
    const __nv_bfloat16* pb = reinterpret_cast<const __nv_bfloat16*>(&b);
    const __nv_bfloat16* pc = reinterpret_cast<const __nv_bfloat16*>(&c);
    __nv_bfloat16* po = reinterpret_cast<__nv_bfloat16*>(&o);
    for (int k = 0; k < 8; ++k) {
      const float xhat = __bfloat162float(pb[k]) * rs;
      po[k] = __float2bfloat16(rs * (__bfloat162float(pc[k]) * __bfloat162float(pa[k]) - xhat * mean));
    }
    o4[v] = o;
  }
}

__global__ void rmsnorm_backward_dw_partial_kernel(const __nv_bfloat16* dn, const __nv_bfloat16* x, const float* rstd,
                                                   float* partials, int64_t rows, int64_t d) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= d) return;
  float s = 0;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y)
    s += __bfloat162float(dn[r * d + c]) * __bfloat162float(x[r * d + c]) * rstd[r];
  partials[blockIdx.y * d + c] = s;
}

__global__ void rmsnorm_backward_dw_sum_kernel(const float* partials, float* dw, int64_t d) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= d) return;
  float s = 0;
  for (int k = 0; k < kDwChunks; ++k) s += partials[k * d + c];
  dw[c] += s;
}

__global__ void fill_f32_kernel(float* out, int64_t n, uint64_t seed, float scale, float offset) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = offset + scale * hash_uniform(seed, static_cast<uint64_t>(i));
}

void rmsnorm_backward(const __nv_bfloat16* dn, const __nv_bfloat16* x, const __nv_bfloat16* w, const float* rstd,
                      __nv_bfloat16* dx, float* dw, float* partials, int64_t rows, int64_t d, cudaStream_t s) {
  if (rows == 0) return;
  rmsnorm_backward_dx_kernel<<<static_cast<unsigned>(rows), kNormThreads, 0, s>>>(dn, x, w, rstd, dx, d);
  const dim3 grid(static_cast<unsigned>((d + 255) / 256), kDwChunks);
  rmsnorm_backward_dw_partial_kernel<<<grid, 256, 0, s>>>(dn, x, rstd, partials, rows, d);
  rmsnorm_backward_dw_sum_kernel<<<static_cast<unsigned>((d + 255) / 256), 256, 0, s>>>(partials, dw, d);
  LOOM_CUDA_CHECK_LAUNCH("rmsnorm_backward");
}

void fill(__nv_bfloat16* p, int64_t n, uint64_t seed, float scale, float offset, cudaStream_t s) {
  fill_kernel<<<1024, 256, 0, s>>>(p, n, seed, scale, offset);
  LOOM_CUDA_CHECK_LAUNCH("fill_kernel");
}

void add_rmsnorm(const __nv_bfloat16* sum, const __nv_bfloat16* residual, const __nv_bfloat16* w,
                 __nv_bfloat16* residual_out, __nv_bfloat16* normed, float* rstd, int64_t rows, int64_t d,
                 cudaStream_t s) {
  if (rows == 0) return;
  add_rmsnorm_kernel<<<static_cast<unsigned>(rows), kNormThreads, 0, s>>>(sum, residual, w, residual_out, normed,
                                                                          rstd, d, 1e-5f);
  LOOM_CUDA_CHECK_LAUNCH("add_rmsnorm_kernel");
}

// ---- host side --------------------------------------------------------------------------------------------

struct Options {
  std::vector<int64_t> hidden{2048, 4096, 8192};
  std::vector<int64_t> tokens;
  int blocks = 16;
  int calls = 10;
  int replays = 30;
  std::string json, tuning_out;
};

std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> v;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) {
    char* end = nullptr;
    const long long x = std::strtoll(item.c_str(), &end, 10);
    LOOM_CHECK(end != item.c_str() && *end == 0 && x > 0, kConfig, "not a positive integer in a list: '" << item << "'");
    v.push_back(x);
  }
  LOOM_CHECK(!v.empty(), kConfig, "empty list");
  return v;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int64_t t = 1; t <= 16384; t *= 2) o.tokens.push_back(t);
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      LOOM_CHECK(i + 1 < argc, kConfig, a << " needs a value");
      return argv[++i];
    };
    if (a == "--hidden") {
      o.hidden = parse_list(value());
    } else if (a == "--tokens") {
      o.tokens = parse_list(value());
    } else if (a == "--blocks") {
      o.blocks = std::atoi(value().c_str());
    } else if (a == "--calls") {
      o.calls = std::atoi(value().c_str());
    } else if (a == "--replays") {
      o.replays = std::atoi(value().c_str());
    } else if (a == "--quick") {
      o.hidden = {2048};
      o.tokens = {1, 64, 1024, 8192};
      o.replays = 10;
    } else if (a == "--json") {
      o.json = value();
    } else if (a == "--tuning-out") {
      o.tuning_out = value();
    } else {
      LOOM_THROW(kConfig, "unknown argument '" << a << "' (see the protocol at the top of bench/fused_norm_bench.cu)");
    }
  }
  LOOM_CHECK(o.blocks >= 1 && o.blocks <= loom::cuda::kFusedMaxBlocks, kConfig,
             "--blocks must be 1.." << loom::cuda::kFusedMaxBlocks);
  LOOM_CHECK(o.calls >= 1 && o.replays >= 1, kConfig, "--calls and --replays must be positive");
  for (int64_t d : o.hidden) LOOM_CHECK(d % 8 == 0, kConfig, "hidden sizes must be multiples of 8, got " << d);
  std::sort(o.tokens.begin(), o.tokens.end());  // one_shot_limit scans them from the largest
  o.tokens.erase(std::unique(o.tokens.begin(), o.tokens.end()), o.tokens.end());
  return o;
}

template <class T>
struct Device {
  T* p = nullptr;
  explicit Device(int64_t n) { LOOM_CUDA_CHECK(cudaMalloc(&p, static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T))); }
  ~Device() { cudaFree(p); }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
};

struct Timing {
  double median_us = 0, p99_us = 0;
};

struct Result {
  std::string variant;
  int64_t d = 0, tokens = 0, bytes = 0;
  bool ran = false;
  std::string why_not;
  Timing t;
  int sms = 0;  // 0: not reported
};

class Bench {
 public:
  Bench(const Options& o, int rank, int ranks, bool shared_gpus)
      : o_(o), rank_(rank), ranks_(ranks), shared_gpus_(shared_gpus) {
    LOOM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    LOOM_CUDA_CHECK(cudaEventCreate(&start_));
    LOOM_CUDA_CHECK(cudaEventCreate(&stop_));
    if (!shared_gpus_) {
      ncclUniqueId id{};
      if (rank_ == 0) BENCH_NCCL(ncclGetUniqueId(&id));
      MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
      BENCH_NCCL(ncclCommInitRank(&nccl_, ranks_, id, rank_));
    }
    const std::string why = loom::cuda::IpcFusedNorm::unavailable_reason(MPI_COMM_WORLD);
    LOOM_CHECK(why.empty(), kComm, "the fused kernels cannot run on these ranks: " << why);
    ours_ = std::make_unique<loom::cuda::IpcFusedNorm>(MPI_COMM_WORLD, stream_, 0, 30.0, "bench");
  }
  ~Bench() {
    cudaStreamSynchronize(stream_);
    ours_.reset();
    if (nccl_) ncclCommDestroy(nccl_);
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
    cudaStreamDestroy(stream_);
  }

  // Every variant at one size; returns false when a correctness check failed.
  bool run(int64_t d, int64_t tokens, std::vector<Result>& out) {
    const int64_t n = tokens * d, padded_rows = (tokens + ranks_ - 1) / ranks_ * ranks_;
    Device<__nv_bfloat16> partial(n), work(padded_rows * d), residual(padded_rows * d), weight(d), res_out(n),
        normed(n), slice_res(padded_rows / ranks_ * d), slice_norm(padded_rows / ranks_ * d), gather_res(padded_rows * d),
        gather_norm(padded_rows * d), ref_res(n), ref_norm(n);
    Device<float> rstd(padded_rows), rstd_b(tokens), dw(d), dw_ref(d), dw_scratch(kDwChunks * d);
    Device<__nv_bfloat16> dx(n), dx_ref(n);
    fill(partial.p, n, 1000 + static_cast<uint64_t>(rank_), 0.5f, 0.0f, stream_);
    fill(residual.p, padded_rows * d, 7, 1.0f, 0.0f, stream_);
    fill(weight.p, d, 8, 0.5f, 1.0f, stream_);
    fill_f32_kernel<<<64, 256, 0, stream_>>>(rstd_b.p, tokens, 9, 0.25f, 1.0f);  // the backward's rstd: [0.75, 1.25)
    const int64_t slice_rows = padded_rows / ranks_;
    const size_t bytes = static_cast<size_t>(n) * 2;

    // The variants write residual_out / normed; the all-reduce ones reduce a copy of the partial in `work`.
    auto nccl_ar = [&] {
      BENCH_NCCL(ncclAllReduce(partial.p, work.p, static_cast<size_t>(n), ncclBfloat16, ncclSum, nccl_, stream_));
    };
    auto nccl_ar_norm = [&] {
      nccl_ar();
      add_rmsnorm(work.p, residual.p, weight.p, res_out.p, normed.p, rstd.p, tokens, d, stream_);
    };
    auto nccl_rs_norm_ag = [&] {
      // The partial padded to whole slices: `work` holds it (pad rows zero, written once below).
      BENCH_NCCL(ncclReduceScatter(work.p, slice_res.p, static_cast<size_t>(slice_rows * d), ncclBfloat16, ncclSum,
                                   nccl_, stream_));
      add_rmsnorm(slice_res.p, residual.p + static_cast<int64_t>(rank_) * slice_rows * d, weight.p, slice_res.p,
                  slice_norm.p, rstd.p, slice_rows, d, stream_);
      BENCH_NCCL(ncclGroupStart());
      BENCH_NCCL(ncclAllGather(slice_res.p, gather_res.p, static_cast<size_t>(slice_rows * d), ncclBfloat16, nccl_,
                               stream_));
      BENCH_NCCL(ncclAllGather(slice_norm.p, gather_norm.p, static_cast<size_t>(slice_rows * d), ncclBfloat16, nccl_,
                               stream_));
      BENCH_NCCL(ncclGroupEnd());
    };
    // The backward: dn = the partial, x = the residual rows, rstd_b; dx overwritten, dw accumulated. Skipped for
    // widths the backward kernel does not take on this GPU.
    const bool backward = d <= loom::cuda::fused_backward_max_d();
    const std::string too_wide = "wider than the backward kernel takes on this GPU";
    ours_->reserve(tokens, d, backward);
    auto nccl_ar_norm_bwd = [&] {
      nccl_ar();
      rmsnorm_backward(work.p, residual.p, weight.p, rstd_b.p, dx.p, dw.p, dw_scratch.p, tokens, d, stream_);
    };
    auto ours_bwd = [&](FusedAlgo algo) {
      return [&, algo] {
        loom::cuda::FusedNormBackwardArgs a;
        a.dnormed = partial.p;
        a.x = residual.p;
        a.weight = weight.p;
        a.rstd = rstd_b.p;
        a.dx = dx.p;
        a.dw = dw.p;
        a.rows = tokens;
        a.d = d;
        a.blocks = o_.blocks;
        a.algo = algo;
        ours_->run_backward(a);
      };
    };
    // Ours: the fused op, or (norm false) the all-reduce alone into res_out.
    auto ours = [&](FusedAlgo algo, bool norm = true) {
      return [&, algo, norm] {
        loom::cuda::FusedNormArgs a;
        a.allreduce_only = !norm;
        a.partial = partial.p;
        a.residual_out = res_out.p;
        if (norm) {
          a.residual = residual.p;
          a.weight = weight.p;
          a.normed = normed.p;
          a.rstd = rstd.p;
        }
        a.rows = tokens;
        a.d = d;
        a.blocks = o_.blocks;
        a.algo = algo;
        ours_->run(a);
      };
    };

    bool ok = true;
    if (nccl_) {
      // The reference outputs, then each of ours against them.
      nccl_ar_norm();
      LOOM_CUDA_CHECK(cudaMemcpyAsync(ref_res.p, res_out.p, bytes, cudaMemcpyDeviceToDevice, stream_));
      LOOM_CUDA_CHECK(cudaMemcpyAsync(ref_norm.p, normed.p, bytes, cudaMemcpyDeviceToDevice, stream_));
      for (FusedAlgo algo : {FusedAlgo::kOneShot, FusedAlgo::kTwoShot}) {
        ours(algo)();
        ours_->synchronize();
        const std::string name = algo == FusedAlgo::kOneShot ? "ours_oneshot" : "ours_twoshot";
        ok = check(res_out.p, ref_res.p, n, name + " residual_out", d, tokens) && ok;
        ok = check(normed.p, ref_norm.p, n, name + " normed", d, tokens) && ok;
      }
      nccl_ar();
      LOOM_CUDA_CHECK(cudaMemcpyAsync(ref_res.p, work.p, bytes, cudaMemcpyDeviceToDevice, stream_));
      for (FusedAlgo algo : {FusedAlgo::kOneShot, FusedAlgo::kTwoShot}) {
        ours(algo, false)();
        ours_->synchronize();
        ok = check(res_out.p, ref_res.p, n, algo == FusedAlgo::kOneShot ? "ours_ar_1shot" : "ours_ar_2shot", d,
                   tokens) && ok;
      }
      if (backward) {
        const size_t dw_bytes = static_cast<size_t>(d) * sizeof(float);
        LOOM_CUDA_CHECK(cudaMemsetAsync(dw.p, 0, dw_bytes, stream_));
        nccl_ar_norm_bwd();
        LOOM_CUDA_CHECK(cudaMemcpyAsync(dx_ref.p, dx.p, bytes, cudaMemcpyDeviceToDevice, stream_));
        LOOM_CUDA_CHECK(cudaMemcpyAsync(dw_ref.p, dw.p, dw_bytes, cudaMemcpyDeviceToDevice, stream_));
        for (FusedAlgo algo : {FusedAlgo::kOneShot, FusedAlgo::kTwoShot}) {
          LOOM_CUDA_CHECK(cudaMemsetAsync(dw.p, 0, dw_bytes, stream_));
          ours_bwd(algo)();
          ours_->synchronize();
          const std::string name = algo == FusedAlgo::kOneShot ? "ours_bwd_1shot" : "ours_bwd_2shot";
          ok = check(dx.p, dx_ref.p, n, name + " dx", d, tokens) && ok;
          ok = check(dw.p, dw_ref.p, d, name + " dw", d, tokens) && ok;
        }
      }
      // work = the partial with zero pad rows, for reduce-scatter.
      LOOM_CUDA_CHECK(cudaMemsetAsync(work.p, 0, static_cast<size_t>(padded_rows * d) * 2, stream_));
      LOOM_CUDA_CHECK(cudaMemcpyAsync(work.p, partial.p, bytes, cudaMemcpyDeviceToDevice, stream_));
    }
    const std::string no_nccl = "ranks share a GPU: NCCL refuses them";
    add(out, "nccl_allreduce", d, tokens, nccl_ ? std::function<void()>(nccl_ar) : nullptr, no_nccl, 0);
    add(out, "nccl_ar_norm", d, tokens, nccl_ ? std::function<void()>(nccl_ar_norm) : nullptr, no_nccl, 0);
    add(out, "nccl_rs_norm_ag", d, tokens, nccl_ ? std::function<void()>(nccl_rs_norm_ag) : nullptr, no_nccl, 0);
    add(out, "ours_oneshot", d, tokens, ours(FusedAlgo::kOneShot), "", o_.blocks);
    add(out, "ours_twoshot", d, tokens, ours(FusedAlgo::kTwoShot), "", o_.blocks);
    add(out, "ours_ar_1shot", d, tokens, ours(FusedAlgo::kOneShot, false), "", o_.blocks);
    add(out, "ours_ar_2shot", d, tokens, ours(FusedAlgo::kTwoShot, false), "", o_.blocks);
    add(out, "nccl_ar_norm_bwd", d, tokens, nccl_ ? std::function<void()>(nccl_ar_norm_bwd) : nullptr, no_nccl, 0);
    add(out, "ours_bwd_1shot", d, tokens, backward ? std::function<void()>(ours_bwd(FusedAlgo::kOneShot)) : nullptr,
        too_wide, o_.blocks);
    add(out, "ours_bwd_2shot", d, tokens, backward ? std::function<void()>(ours_bwd(FusedAlgo::kTwoShot)) : nullptr,
        too_wide, o_.blocks);
    return ok;
  }

 private:
  // Outputs of ours against the reference: norm-wise relative error, and the same bits on every rank.
  // Elements bf16 (as uint16_t bits) or f32.
  template <class T>
  bool check(const T* got, const T* want, int64_t n, const std::string& what, int64_t d, int64_t tokens) {
    using Bits = std::conditional_t<sizeof(T) == 2, uint16_t, uint32_t>;
    std::vector<Bits> g(static_cast<size_t>(n)), w(static_cast<size_t>(n));
    LOOM_CUDA_CHECK(cudaMemcpy(g.data(), got, static_cast<size_t>(n) * sizeof(T), cudaMemcpyDeviceToHost));
    LOOM_CUDA_CHECK(cudaMemcpy(w.data(), want, static_cast<size_t>(n) * sizeof(T), cudaMemcpyDeviceToHost));
    auto f = [](Bits b) {
      uint32_t u = sizeof(Bits) == 2 ? static_cast<uint32_t>(b) << 16 : static_cast<uint32_t>(b);
      float x;
      std::memcpy(&x, &u, 4);
      return static_cast<double>(x);
    };
    double diff = 0, ref = 0;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < g.size(); ++i) {
      diff += (f(g[i]) - f(w[i])) * (f(g[i]) - f(w[i]));
      ref += f(w[i]) * f(w[i]);
      h = (h ^ g[i]) * 1099511628211ull;
    }
    const double err = std::sqrt(diff / std::max(ref, 1e-30));
    uint64_t lo = h, hi = h;
    MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD);
    const bool ok = err <= 2e-2 && lo == hi;
    if (!ok && rank_ == 0)
      std::printf("MISMATCH d %lld tokens %lld %s: relative error %.3g, %s on every rank\n", static_cast<long long>(d),
                  static_cast<long long>(tokens), what.c_str(), err, lo == hi ? "the same" : "NOT the same");
    return ok;
  }

  // Times one variant (see the protocol) and appends its result.
  void add(std::vector<Result>& out, const char* name, int64_t d, int64_t tokens, const std::function<void()>& call,
           const std::string& why_not, int sms) {
    Result r;
    r.variant = name;
    r.d = d;
    r.tokens = tokens;
    r.bytes = tokens * d * 2;
    r.sms = sms;
    if (!call) {
      r.why_not = why_not;
      out.push_back(r);
      return;
    }
    call();  // eager once (NCCL and the kernels set up outside the capture)
    LOOM_CUDA_CHECK(cudaStreamSynchronize(stream_));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    LOOM_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < o_.calls; ++i) call();
    LOOM_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    LOOM_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 0; i < 3; ++i) LOOM_CUDA_CHECK(cudaGraphLaunch(exec, stream_));
    LOOM_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::vector<double> per_call(static_cast<size_t>(o_.replays));
    for (int i = 0; i < o_.replays; ++i) {
      MPI_Barrier(MPI_COMM_WORLD);
      LOOM_CUDA_CHECK(cudaEventRecord(start_, stream_));
      LOOM_CUDA_CHECK(cudaGraphLaunch(exec, stream_));
      LOOM_CUDA_CHECK(cudaEventRecord(stop_, stream_));
      LOOM_CUDA_CHECK(cudaEventSynchronize(stop_));
      float ms = 0;
      LOOM_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
      per_call[static_cast<size_t>(i)] = 1e3 * ms / o_.calls;
    }
    ours_->check();
    MPI_Allreduce(MPI_IN_PLACE, per_call.data(), o_.replays, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    std::sort(per_call.begin(), per_call.end());
    r.t.median_us = per_call[per_call.size() / 2];
    r.t.p99_us = per_call[std::min(per_call.size() - 1, static_cast<size_t>(std::ceil(0.99 * per_call.size())) - 1)];
    r.ran = true;
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    out.push_back(r);
  }

  const Options& o_;
  int rank_, ranks_;
  bool shared_gpus_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
  ncclComm_t nccl_ = nullptr;
  std::unique_ptr<loom::cuda::IpcFusedNorm> ours_;
};

const Result* find(const std::vector<Result>& rs, const std::string& v, int64_t d, int64_t tokens) {
  for (const Result& r : rs)
    if (r.variant == v && r.d == d && r.tokens == tokens && r.ran) return &r;
  return nullptr;
}

double bus_gbps(const Result& r, int ranks) {
  const double algbw = static_cast<double>(r.bytes) / (r.t.median_us * 1e3);  // GB/s
  return algbw * 2.0 * (ranks - 1) / ranks;
}

// The one-shot limit of one hidden size: the largest message where one-shot wins and two-shot wins at every
// larger one (-1: no measurement).
int64_t one_shot_limit(const std::vector<Result>& rs, int64_t d, const std::vector<int64_t>& tokens) {
  int64_t limit = 0;
  bool any = false;
  for (auto it = tokens.rbegin(); it != tokens.rend(); ++it) {
    const Result* one = find(rs, "ours_oneshot", d, *it);
    const Result* two = find(rs, "ours_twoshot", d, *it);
    if (!one || !two) continue;
    any = true;
    if (one->t.median_us < two->t.median_us) {
      limit = one->bytes;
      break;
    }
  }
  return any ? limit : -1;
}

// Replaces this rank count's line of the table at `path` (kept otherwise; a new file if there is none).
void write_tuning(const std::string& path, int ranks, int64_t limit, const std::string& gpu) {
  loom::FusedTuning table;
  if (std::ifstream(path).good()) table = loom::FusedTuning::load(path);
  table.set(ranks, limit);
  std::ofstream out(path);
  LOOM_CHECK(out.good(), kIo, "cannot write " << path);
  table.write(out, "The fused all-reduce + RMSNorm kernels' algorithm table (parallel.fused_tuning): one-shot up to\n"
                   "one_shot_max_bytes of partial per call, two-shot above. Written by bench/fused_norm_bench (" +
                       gpu + ").");
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, ranks = 1, status = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  try {
    const Options o = parse(argc, argv);
    MPI_Comm local;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &local);
    int local_rank = 0, local_size = 1, gpus = 0;
    MPI_Comm_rank(local, &local_rank);
    MPI_Comm_size(local, &local_size);
    MPI_Comm_free(&local);
    LOOM_CUDA_CHECK(cudaGetDeviceCount(&gpus));
    LOOM_CHECK(gpus > 0, kCuda, "no GPU");
    LOOM_CUDA_CHECK(cudaSetDevice(local_rank % gpus));
    const bool shared = local_size > gpus;
    cudaDeviceProp prop{};
    LOOM_CUDA_CHECK(cudaGetDeviceProperties(&prop, local_rank % gpus));
    const std::string gpu = std::to_string(ranks) + " ranks on " + std::to_string(std::min(gpus, local_size)) + "x " +
                            prop.name;
    if (rank == 0) {
      std::printf("fused all-reduce + RMSNorm benchmark: %s, %d blocks, %d calls per graph, %d replays%s\n",
                  gpu.c_str(), o.blocks, o.calls, o.replays,
                  shared ? " (ranks share GPUs: NCCL variants skipped, timings not representative)" : "");
    }
    Bench bench(o, rank, ranks, shared);
    std::vector<Result> results;
    bool ok = true;
    const char* variants[] = {"nccl_allreduce", "nccl_ar_norm",     "nccl_rs_norm_ag", "ours_oneshot",
                              "ours_twoshot",   "ours_ar_1shot",    "ours_ar_2shot",   "nccl_ar_norm_bwd",
                              "ours_bwd_1shot", "ours_bwd_2shot"};
    for (int64_t d : o.hidden) {
      if (rank == 0) {
        std::printf("\nhidden %lld: median us per call (p99) and speed-up of the faster of ours over nccl_ar_norm\n",
                    static_cast<long long>(d));
        std::printf("%7s %10s", "tokens", "bytes");
        for (const char* v : variants) std::printf(" %22s", v);
        std::printf(" %8s\n", "speedup");
      }
      for (int64_t t : o.tokens) {
        ok = bench.run(d, t, results) && ok;
        if (rank != 0) continue;
        std::printf("%7lld %10lld", static_cast<long long>(t), static_cast<long long>(t * d * 2));
        for (const char* v : variants) {
          const Result* r = find(results, v, d, t);
          if (r) {
            std::printf(" %11.2f (%8.2f)", r->t.median_us, r->t.p99_us);
          } else {
            std::printf(" %22s", "-");
          }
        }
        const Result* peer = find(results, "nccl_ar_norm", d, t);
        const Result* one = find(results, "ours_oneshot", d, t);
        const Result* two = find(results, "ours_twoshot", d, t);
        if (peer && one && two) {
          std::printf(" %8.2f", peer->t.median_us / std::min(one->t.median_us, two->t.median_us));
        }
        std::printf("\n");
        std::fflush(stdout);
      }
    }
    // Speed-ups and goals.
    double min_small = INFINITY, min_large = INFINITY;
    std::ostringstream speedups;
    bool first = true;
    for (int64_t d : o.hidden)
      for (int64_t t : o.tokens) {
        const Result* peer = find(results, "nccl_ar_norm", d, t);
        const Result* one = find(results, "ours_oneshot", d, t);
        const Result* two = find(results, "ours_twoshot", d, t);
        if (!peer || !one || !two) continue;
        const double best = std::min(one->t.median_us, two->t.median_us);
        const double s = peer->t.median_us / best;
        const int64_t bytes = t * d * 2;
        if (bytes <= (int64_t{2} << 20)) min_small = std::min(min_small, s);
        if (bytes >= (int64_t{8} << 20) && bytes <= (int64_t{64} << 20)) min_large = std::min(min_large, s);
        speedups << (first ? "" : ",\n    ") << "{\"hidden\": " << d << ", \"tokens\": " << t << ", \"bytes\": " << bytes
                 << ", \"best\": \"" << (one->t.median_us <= two->t.median_us ? "oneshot" : "twoshot")
                 << "\", \"speedup\": " << s;
        const Result* nar = find(results, "nccl_allreduce", d, t);
        const Result* ar1 = find(results, "ours_ar_1shot", d, t);
        const Result* ar2 = find(results, "ours_ar_2shot", d, t);
        if (nar && ar1 && ar2)
          speedups << ", \"ar_speedup\": " << nar->t.median_us / std::min(ar1->t.median_us, ar2->t.median_us);
        const Result* nbw = find(results, "nccl_ar_norm_bwd", d, t);
        const Result* bw1 = find(results, "ours_bwd_1shot", d, t);
        const Result* bw2 = find(results, "ours_bwd_2shot", d, t);
        if (nbw && bw1 && bw2)
          speedups << ", \"bwd_speedup\": " << nbw->t.median_us / std::min(bw1->t.median_us, bw2->t.median_us);
        speedups << "}";
        first = false;
      }
    int64_t limit = -1;
    for (int64_t d : o.hidden) {
      const int64_t l = one_shot_limit(results, d, o.tokens);
      if (l >= 0) limit = limit < 0 ? l : std::min(limit, l);
    }
    auto num = [](double x) { return std::isfinite(x) ? std::to_string(x) : std::string("null"); };
    if (rank == 0) {
      std::printf("\nmin speed-up up to 2 MiB: %s (goal >= 1.5); 8..64 MiB: %s (goal >= 1.15); one-shot up to %lld "
                  "bytes\n",
                  num(min_small).c_str(), num(min_large).c_str(), static_cast<long long>(limit));
      if (!o.tuning_out.empty()) {
        if (limit >= 0 && !shared && ranks >= 2) {
          write_tuning(o.tuning_out, ranks, limit, gpu);
        } else {
          std::printf("no tuning line written: %s\n", shared ? "ranks share GPUs" : "fewer than 2 ranks");
        }
      }
      if (!o.json.empty()) {
        std::ofstream js(o.json);
        LOOM_CHECK(js.good(), kIo, "cannot write " << o.json);
        char date[32];
        const std::time_t now = std::time(nullptr);
        std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
        js << "{\n  \"benchmark\": \"fused_allreduce_add_rmsnorm\",\n  \"machine\": \"" << gpu << "\",\n  \"ranks\": "
           << ranks << ",\n  \"shared_gpus\": " << (shared ? "true" : "false") << ",\n  \"date\": \"" << date
           << "\",\n  \"blocks\": " << o.blocks << ",\n  \"calls_per_graph\": " << o.calls << ",\n  \"replays\": "
           << o.replays << ",\n  \"protocol\": \"bench/fused_norm_bench.cu (top comment)\",\n  \"results\": [\n";
        for (size_t i = 0; i < results.size(); ++i) {
          const Result& r = results[i];
          js << "    {\"variant\": \"" << r.variant << "\", \"hidden\": " << r.d << ", \"tokens\": " << r.tokens
             << ", \"bytes\": " << r.bytes;
          if (r.ran) {
            js << ", \"median_us\": " << r.t.median_us << ", \"p99_us\": " << r.t.p99_us
               << ", \"busbw_gbps\": " << bus_gbps(r, ranks) << ", \"sms\": " << (r.sms > 0 ? std::to_string(r.sms) : "null");
          } else {
            js << ", \"skipped\": \"" << r.why_not << "\"";
          }
          js << "}" << (i + 1 < results.size() ? "," : "") << "\n";
        }
        js << "  ],\n  \"speedups\": [\n    " << speedups.str() << "\n  ],\n  \"min_speedup_upto_2MiB\": "
           << num(min_small) << ",\n  \"min_speedup_8_64MiB\": " << num(min_large)
           << ",\n  \"e2e_step_speedup\": null,\n  \"one_shot_max_bytes\": " << limit
           << ",\n  \"goals\": {\"min_speedup_upto_2MiB\": 1.5, \"min_speedup_8_64MiB\": 1.15, "
              "\"e2e_step_speedup\": 1.05},\n  \"correct\": "
           << (ok ? "true" : "false") << "\n}\n";
      }
    }
    status = ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fused_norm_bench (rank %d): %s\n", rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  MPI_Finalize();
  return status;
}
