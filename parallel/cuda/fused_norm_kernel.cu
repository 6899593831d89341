// The fused all-reduce + residual add + RMSNorm kernels; the protocol is in fused_norm_kernel.h.
#include "parallel/cuda/fused_norm_kernel.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>

#include "core/cuda/cuda_check.h"
#include "core/cuda/reduce.cuh"
#include "core/error.h"

namespace loom::cuda {
namespace {

// Threads per block: 256 for small calls (the fewest instructions per barrier), 512 from kWideElems elements on
// (twice the loads in flight per SM). Chosen on one H100 with builds of fixed block sizes (docs/fused_norm.md).
// A function of the call's shape, so the same on every rank.
constexpr int kSmallBlock = 256, kWideBlock = 512;
constexpr int64_t kWideElems = int64_t{256} << 10;
constexpr int kMaxRowThreads = 256;  // a row group has 32..256 threads
constexpr int kPack = 8;  // bf16 elements per 16-byte access

struct Views {  // the kernel's copy of the group, by value
  int ranks, rank;
  BFloat16* stage[kFusedMaxRanks];
  uint32_t* flags[kFusedMaxRanks];
  const volatile uint32_t* abort;
  uint32_t* error;
  uint32_t* error_host;  // mapped host mirror of the first failure, or null
  uint32_t* counter;  // [last epoch, blocks finished]; null: the epoch is the launch argument
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

// The release pattern of the PTX memory model: one fence.acq_rel at system scope, then relaxed stores at system
// scope (a flag to each peer), instead of a release store (which carries its own fence) per peer.
__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
__device__ __forceinline__ void store_relaxed_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// The call's epoch, the same in every block: the launch argument, or one more than the group's device counter
// (graph replays: the argument frozen into a graph would repeat).
__device__ __forceinline__ uint32_t begin_call(const Views& v, uint32_t epoch) {
  __shared__ uint32_t e;
  if (threadIdx.x == 0) e = v.counter != nullptr ? *reinterpret_cast<volatile uint32_t*>(v.counter) + 1u : epoch;
  __syncthreads();
  return e;
}

// Every block, on every exit: the last block to finish stores the call's epoch in the device counter (every
// block has read the counter before it counts itself finished; the next call starts after this kernel ends).
__device__ __forceinline__ void end_call(const Views& v, uint32_t epoch) {
  if (v.counter == nullptr) return;
  __syncthreads();
  if (threadIdx.x == 0 && atomicAdd(v.counter + 1, 1u) == gridDim.x - 1) {
    v.counter[1] = 0;
    v.counter[0] = epoch;
  }
}

// Barrier `which` of block blockIdx.x: tell every peer this block arrived at `epoch`, then wait until each
// peer's block did. False (after recording why) when the abort word is set, another block of this rank already
// failed, or the deadline passes. Called by every thread of the block; returns the same to all.
__device__ bool block_barrier(const Views& v, int which, uint32_t epoch, uint64_t deadline) {
  __shared__ int ok;
  __syncthreads();  // this block's stores of the phase are issued
  if (threadIdx.x == 0) {
    ok = 1;
    fence_acq_rel_sys();  // this block's stores (ordered before by __syncthreads) before the flags
    const int64_t slot = (static_cast<int64_t>(which) * kFusedMaxRanks + v.rank) * kFusedMaxBlocks + blockIdx.x;
    for (int p = 0; p < v.ranks; ++p) store_relaxed_sys(v.flags[p] + slot, epoch);
    const uint32_t* mine = v.flags[v.rank];
    for (int p = 0; p < v.ranks && ok; ++p) {
      const uint32_t* f = mine + (static_cast<int64_t>(which) * kFusedMaxRanks + p) * kFusedMaxBlocks + blockIdx.x;
      while (static_cast<int32_t>(load_acquire_sys(f) - epoch) < 0) {
        uint32_t why = 0;
        if (*v.abort != 0) why = kFusedAborted;
        else if (global_ns() > deadline) why = kFusedDeadline;
        else if (*reinterpret_cast<volatile uint32_t*>(v.error) != 0) why = 0xffffffffu;  // a sibling block failed
        if (why != 0) {
          const uint32_t code = (why << 8) | static_cast<uint32_t>(p);
          if (why != 0xffffffffu && atomicCAS(v.error, 0u, code) == 0u && v.error_host != nullptr) {
            *reinterpret_cast<volatile uint32_t*>(v.error_host) = code;
            __threadfence_system();
          }
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

constexpr int kMaxWarps = kWideBlock / 32;
// 16-byte accesses a thread has in flight per stream of data: 4 in the forward and the copies, 2 in the backward
// (which holds more per pack; with 4 it spills at 512 threads).
constexpr int kUnroll = 4;
constexpr int kBackwardUnroll = 2;

// Copies rows [first_row(0) + k * gridDim.x] (this block's rows) of src to dst, as one flat range of packs with
// kUnroll loads in flight per thread. Loads bypass L1 (src may be a buffer a peer rewrote).
__device__ void copy_block_rows(BFloat16* dst, const BFloat16* src, int64_t rows, int64_t d) {
  const int64_t first = first_row(0);
  if (first >= rows) return;
  const int64_t packs = d / kPack, blocks = gridDim.x;
  const int64_t total = (rows - first + blocks - 1) / blocks * packs;
  for (int64_t i0 = threadIdx.x; i0 < total; i0 += static_cast<int64_t>(blockDim.x) * kUnroll) {
    uint4 raw[kUnroll];
    int64_t at[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + static_cast<int64_t>(u) * blockDim.x;
      at[u] = i < total ? ((first + (i / packs) * blocks) * d + (i % packs) * kPack) : -1;
      if (at[u] >= 0) raw[u] = __ldcg(reinterpret_cast<const uint4*>(src + at[u]));
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (at[u] >= 0) *reinterpret_cast<uint4*>(dst + at[u]) = raw[u];
  }
}

// Copies this block's rows of the partial into this rank's input buffer `in_off` (bf16 elements).
__device__ void stage_input(const Views& v, const BFloat16* partial, int64_t in_off, int64_t rows, int64_t d) {
  copy_block_rows(v.stage[v.rank] + in_off, partial, rows, d);
}

// The forward works a row per group of `threads` threads (32, 64, 128 or 256: a warp per row when a block has
// at least a warp per row, more threads per row when it has fewer, so one wide row is not walked by one warp);
// the rows of a block (first_row(begin) + k * gridDim.x) are dealt to its groups in turn. Thread l of a group
// takes packs l, l + threads, ...; its sum of squares adds them in that order, then a fixed shuffle tree sums
// each warp and the group adds its warps' totals in warp order. The group size depends only on the call's shape
// (rows, d, blocks; block threads), so both algorithms norm a row with the same arithmetic and a row's rstd has the same bits wherever it is computed.
__device__ __forceinline__ float warp_total(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  return __shfl_sync(0xffffffffu, x, 0);
}

__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

template <int kRowThreads>
struct RowGroup {
  static constexpr int threads = kRowThreads;  // per row
  int index;                                   // this thread's group in the block
  int lane;                                    // this thread's index in the group
  __device__ RowGroup() : index(static_cast<int>(threadIdx.x) / threads), lane(static_cast<int>(threadIdx.x) % threads) {}
  __device__ int64_t first(int64_t begin) const { return first_row(begin) + static_cast<int64_t>(index) * gridDim.x; }
  __device__ int64_t step() const { return static_cast<int64_t>(gridDim.x) * (blockDim.x / threads); }
  // The sum of x over the group, the same bits in every thread of it. red: a float per warp of shared memory.
  __device__ float total(float x, float* red) const {
    x = warp_total(x);
    if constexpr (threads == 32) return x;
    const int warps = threads / 32, first_warp = index * warps;
    if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = x;
    named_barrier(1 + index, threads);
    float sum = 0.0f;
    for (int w = 0; w < warps; ++w) sum += red[first_warp + w];
    named_barrier(1 + index, threads);  // red is reused by the group's next row
    return sum;
  }
};

// Host side, from the call's shape only (so the same on every rank and for both algorithms).
int block_threads(int64_t rows, int64_t d) {
  return rows * d >= kWideElems ? kWideBlock : kSmallBlock;
}

// Threads per row for a call of `rows` rows of `d` over `blocks` blocks of `block` threads: the most (up to
// kMaxRowThreads) that still give every row of a block its own group, and no more than the row has packs.
int row_threads(int64_t rows, int blocks, int64_t d, int block) {
  const int64_t per_block = (rows + blocks - 1) / blocks;
  int t = 32;
  while (t < kMaxRowThreads && per_block * (2 * t) <= block && 2 * t <= d / kPack) t *= 2;
  return t;
}

// The backward's launch: block threads and row threads as the forward's, then (fewer threads per block and)
// more threads per row until the groups' dw sums (block / T groups of d floats) fit `shared_budget` bytes.
struct BackwardShape {
  int block, row_threads;
};
BackwardShape backward_shape(int64_t rows, int blocks, int64_t d, int64_t shared_budget) {
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(float));
  int block = block_threads(rows, d);
  if (block / kMaxRowThreads * row_bytes > shared_budget) block = kSmallBlock;
  int t = row_threads(rows, blocks, d, block);
  while (t < kMaxRowThreads && (block / t) * row_bytes > shared_budget) t *= 2;
  return {block, t};
}

__device__ __forceinline__ float rstd_of(float sum_sq, int64_t d, float eps) {
  return static_cast<float>(1.0 / sqrt(static_cast<double>(sum_sq) / static_cast<double>(d) + static_cast<double>(eps)));
}

__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[kPack]) {
  const BFloat16* h = reinterpret_cast<const BFloat16*>(&raw);
#pragma unroll
  for (int k = 0; k < kPack; ++k) out[k] = __bfloat162float(h[k]);
}

// acc[u] = the sum over q = 0..n_src-1, in that order, of pack p0 + T * u of src[q] + at (U packs of a lane,
// loaded around L1: peers rewrite the sources; packs at or past `packs` are left zero).
template <int T, int U>
__device__ __forceinline__ void sum_sources(BFloat16* const* src, int n_src, int64_t at, int64_t p0, int64_t packs,
                                            float (&acc)[U][kPack]) {
  uint4 raw[U] = {};
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (p0 + T * u < packs) raw[u] = __ldcg(reinterpret_cast<const uint4*>(src[0] + at + (p0 + T * u) * kPack));
#pragma unroll
  for (int u = 0; u < U; ++u) unpack(raw[u], acc[u]);
  for (int q = 1; q < n_src; ++q) {
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (p0 + T * u < packs) raw[u] = __ldcg(reinterpret_cast<const uint4*>(src[q] + at + (p0 + T * u) * kPack));
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float y[kPack];
      unpack(raw[u], y);
#pragma unroll
      for (int k = 0; k < kPack; ++k) acc[u][k] += y[k];
    }
  }
}

// One row, by one row group: r = bf16(sum over q = 0..n_src-1 of src[q][src_off + row] (in that order), + the
// residual row when given), written to res_dst[0..n_dst) (the same row offset in each). With a weight w, also
// rstd = 1 / sqrt(mean(r^2) + eps) (in double, rounded once, as the backend's RMSNorm) and y = bf16(r * rstd * w)
// into normed (+ rstd[row] when given); the second pass re-reads res_dst[0] (this lane's own stores). Sources are
// loaded around L1 (peers rewrite them). A lane adds its squares in the order of its packs (lane, lane + T, ...)
// and the group total is fixed (RowGroup::total), so a row's rstd has the same bits wherever the row is normed
// with the same group size: two-shot norms the copied-out rows and gets one-shot's bits.
template <class Group>
__device__ void reduce_norm_row(BFloat16* const* src, int n_src, int64_t src_off, int64_t row, int64_t d,
                                const BFloat16* residual, BFloat16* const* res_dst, int n_dst, const BFloat16* w,
                                float eps, BFloat16* normed, float* rstd, const Group& grp, float* red) {
  constexpr int T = Group::threads;
  const int lane = grp.lane;
  const int64_t packs = d / kPack, base = row * d;
  float sum_sq = 0.0f;
  for (int64_t p0 = lane; p0 < packs; p0 += static_cast<int64_t>(T) * kUnroll) {
    float acc[kUnroll][kPack];
    uint4 raw[kUnroll] = {};  // packs past the row's end stay zero (unpacked, never stored)
    sum_sources<T>(src, n_src, src_off + base, p0, packs, acc);
    if (residual != nullptr) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (p0 + T * u < packs) raw[u] = *reinterpret_cast<const uint4*>(residual + base + (p0 + T * u) * kPack);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float x[kPack];
        unpack(raw[u], x);
#pragma unroll
        for (int k = 0; k < kPack; ++k) acc[u][k] += x[k];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (p0 + T * u >= packs) break;
      uint4 out;
      BFloat16* o = reinterpret_cast<BFloat16*>(&out);
#pragma unroll
      for (int k = 0; k < kPack; ++k) {
        o[k] = __float2bfloat16_rn(acc[u][k]);
        const float r = __bfloat162float(o[k]);
        sum_sq += r * r;
      }
      for (int i = 0; i < n_dst; ++i) *reinterpret_cast<uint4*>(res_dst[i] + base + (p0 + T * u) * kPack) = out;
    }
  }
  if (w == nullptr) return;  // no norm (the same for the whole block: the group total below is skipped by all)
  const float rs = rstd_of(grp.total(sum_sq, red), d, eps);
  if (rstd != nullptr && lane == 0) rstd[row] = rs;
  for (int64_t p0 = lane; p0 < packs; p0 += static_cast<int64_t>(T) * kUnroll) {
    uint4 rr[kUnroll], ww[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (p0 + T * u < packs) {
        rr[u] = *reinterpret_cast<const uint4*>(res_dst[0] + base + (p0 + T * u) * kPack);
        ww[u] = *reinterpret_cast<const uint4*>(w + (p0 + T * u) * kPack);
      }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (p0 + T * u >= packs) break;
      float r[kPack], wv[kPack];
      unpack(rr[u], r);
      unpack(ww[u], wv);
      uint4 out;
      BFloat16* o = reinterpret_cast<BFloat16*>(&out);
#pragma unroll
      for (int k = 0; k < kPack; ++k) o[k] = __float2bfloat16_rn(r[k] * rs * wv[k]);
      *reinterpret_cast<uint4*>(normed + base + (p0 + T * u) * kPack) = out;
    }
  }
}

// Staging layout per rank (bf16 elements; cap = the capacity of the staging buffer / 4, the same for every call
// whatever its shape, so the parity rule holds when shapes change between calls):
// [in 0][in 1][out 0][out 1]. Forward: out 0 = the new residual rows (or the sums, all-reduce alone). Backward:
// out 1 = the summed gradient of the normalised rows (out 0 unused).
struct Region {
  int64_t cap;
  __device__ int64_t in(uint32_t epoch) const { return (epoch & 1u) * cap; }  // the same parity rule everywhere
  __device__ int64_t out(int k) const { return (2 + k) * cap; }
};

// Destinations of this rank's token slice in two-shot: out region k of every rank, this rank's own first.
__device__ __forceinline__ void slice_destinations(const Views& v, const Region& reg, int k, BFloat16** dst) {
  for (int q = 0; q < v.ranks; ++q) dst[q] = v.stage[(v.rank + q) % v.ranks] + reg.out(k);
}

// This rank's token slice in two-shot: rows [rank * rows / W, (rank + 1) * rows / W).
__device__ __forceinline__ int64_t slice_begin(const Views& v, int64_t rows) {
  return rows * v.rank / v.ranks;
}
__device__ __forceinline__ int64_t slice_end(const Views& v, int64_t rows) {
  return rows * (v.rank + 1) / v.ranks;
}

struct ForwardArgs {
  const BFloat16 *partial, *residual, *w;
  BFloat16 *residual_out, *normed;
  float* rstd;
  int64_t rows, d;
  float eps;
  int row_threads;  // row_threads(rows, blocks, d, block threads)
};

// Two-shot: phase 1 reduces this rank's token slice (+ residual) and writes only the new residual rows to every
// peer's output buffer 0 (half the NVLink writes of sending the normalised rows too); phase 2 norms every row
// from the copied-out residual rows locally, with the group size one-shot uses, so the bits are one-shot's.
template <int kRowThreads>
__device__ void forward_two_shot(const Views& v, const ForwardArgs& a, const Region& reg, uint32_t epoch,
                                 uint64_t deadline, float* red) {
  const int64_t in_off = reg.in(epoch);
  const RowGroup<kRowThreads> grp;
  stage_input(v, a.partial, in_off, a.rows, a.d);
  if (!block_barrier(v, 0, epoch, deadline)) return;
  BFloat16* res_dst[kFusedMaxRanks];
  slice_destinations(v, reg, 0, res_dst);
  const int64_t end = slice_end(v, a.rows);
  for (int64_t row = grp.first(slice_begin(v, a.rows)); row < end; row += grp.step())
    reduce_norm_row(v.stage, v.ranks, in_off, row, a.d, a.residual, res_dst, v.ranks, nullptr, 0.0f, nullptr,
                    nullptr, grp, red);
  if (!block_barrier(v, 1, epoch, deadline)) return;
  if (a.w == nullptr) {  // all-reduce alone: the sums are the output
    copy_block_rows(a.residual_out, v.stage[v.rank] + reg.out(0), a.rows, a.d);
    return;
  }
  BFloat16* const mine[1] = {v.stage[v.rank]};
  BFloat16* const out[1] = {a.residual_out};
  for (int64_t row = grp.first(0); row < a.rows; row += grp.step())
    reduce_norm_row(mine, 1, reg.out(0), row, a.d, nullptr, out, 1, a.w, a.eps, a.normed, a.rstd, grp, red);
}

template <int kRowThreads>
__device__ void forward_one_shot(const Views& v, const ForwardArgs& a, const Region& reg, uint32_t epoch,
                                 uint64_t deadline, float* red) {
  const int64_t in_off = reg.in(epoch);
  const RowGroup<kRowThreads> grp;
  stage_input(v, a.partial, in_off, a.rows, a.d);
  if (!block_barrier(v, 0, epoch, deadline)) return;
  BFloat16* const out[1] = {a.residual_out};
  for (int64_t row = grp.first(0); row < a.rows; row += grp.step())
    reduce_norm_row(v.stage, v.ranks, in_off, row, a.d, a.residual, out, 1, a.w, a.eps, a.normed, a.rstd, grp, red);
}

template <int kBlock>
__global__ void __launch_bounds__(kBlock)
    fused_forward(Views v, ForwardArgs a, int64_t cap, bool two_shot, uint32_t epoch_arg, uint64_t timeout_ns) {
  __shared__ float red[kMaxWarps];
  const uint32_t epoch = begin_call(v, epoch_arg);
  const uint64_t deadline = global_ns() + timeout_ns;
  // Threads per row as a compile-time constant (index arithmetic and unrolling); the same branch in every block.
  switch (a.row_threads) {
#define LOOM_FORWARD_ROWS(T)                                                 \
  case T:                                                                    \
    if (two_shot) forward_two_shot<T>(v, a, Region{cap}, epoch, deadline, red); \
    else forward_one_shot<T>(v, a, Region{cap}, epoch, deadline, red);         \
    break;
    LOOM_FORWARD_ROWS(32)
    LOOM_FORWARD_ROWS(64)
    LOOM_FORWARD_ROWS(128)
    LOOM_FORWARD_ROWS(256)
#undef LOOM_FORWARD_ROWS
  }
  end_call(v, epoch);
}

// ---- backward ---------------------------------------------------------------------------------------------
//
// dn = bf16(sum over ranks of the partial gradients of the normalised rows, in rank order) — what a bf16
// all-reduce gives — then, with xhat = x * rstd and mean = mean_d(w * dn * xhat):
//   g  = bf16(rstd * (w * dn - xhat * mean))         the RMSNorm backward
//   dx = g, or bf16(dx + g) when accumulating          (+ the residual stream's gradient)
//   dw_partials[block, :] = sum over the block's row groups, in group order, of the group's sum over its rows
//                           (in row order) of dn * xhat
// and a second small kernel adds the column sums of dw_partials (in block order) to dw.
//
// Rows are worked a row per group of T threads as in the forward (backward_shape: T also large enough
// that every group's dw sums, d floats each, fit the block's shared memory). one-shot: every rank reduces dn
// for every row from every peer and norms it. two-shot: rank r reduces the dn rows of its token slice and writes
// them to every peer (an all-reduce of dn; the gradient rows are not sent), then every rank norms every row from
// the dn rows it now holds, with the same groups: dn, g, dw and dx are bit-identical between the algorithms and
// on every rank.

struct BackwardArgs {
  const BFloat16 *dn, *x, *w;
  const float* rstd;
  BFloat16* dx;
  bool accumulate;
  float* dw_partials;
  int64_t rows, d;
  int row_threads;  // backward_shape(rows, blocks, d, budget).row_threads
};

// One row, by one row group. Pass 1: dn = bf16(sum over q < n_src of src[q][src_off + row]) (one source: the
// summed rows themselves), stored to dn_store when given; the row's mean. Pass 2: dn re-read from dn_again (the
// lane's own stores, or src[0] again), g, dx written (+ its old value when accumulating); dw_acc += dn * xhat,
// dw_acc laid out [kPack][d / kPack] (element k of pack p at k * packs + p: consecutive lanes, consecutive banks).
template <class Group>
__device__ void backward_row(BFloat16* const* src, int n_src, int64_t src_off, BFloat16* dn_store,
                             const BFloat16* dn_again, int64_t row, const BackwardArgs& a, float* dw_acc,
                             const Group& grp, float* red) {
  constexpr int T = Group::threads;
  const int lane = grp.lane;
  const int64_t d = a.d, packs = d / kPack, base = row * d;
  const float rs = a.rstd[row];
  float dot = 0.0f;
  for (int64_t p0 = lane; p0 < packs; p0 += static_cast<int64_t>(T) * kBackwardUnroll) {
    float acc[kBackwardUnroll][kPack];
    sum_sources<T>(src, n_src, src_off + base, p0, packs, acc);
    uint4 xx[kBackwardUnroll], ww[kBackwardUnroll];
#pragma unroll
    for (int u = 0; u < kBackwardUnroll; ++u)
      if (p0 + T * u < packs) {
        xx[u] = *reinterpret_cast<const uint4*>(a.x + base + (p0 + T * u) * kPack);
        ww[u] = *reinterpret_cast<const uint4*>(a.w + (p0 + T * u) * kPack);
      }
#pragma unroll
    for (int u = 0; u < kBackwardUnroll; ++u) {
      if (p0 + T * u >= packs) break;
      float xv[kPack], wv[kPack];
      unpack(xx[u], xv);
      unpack(ww[u], wv);
      uint4 out;
      BFloat16* o = reinterpret_cast<BFloat16*>(&out);
#pragma unroll
      for (int k = 0; k < kPack; ++k) {
        o[k] = __float2bfloat16_rn(acc[u][k]);
        dot += (wv[k] * __bfloat162float(o[k])) * (xv[k] * rs);
      }
      if (dn_store != nullptr) *reinterpret_cast<uint4*>(dn_store + base + (p0 + T * u) * kPack) = out;
    }
  }
  const float mean = grp.total(dot, red) / static_cast<float>(d);
  for (int64_t p0 = lane; p0 < packs; p0 += static_cast<int64_t>(T) * kBackwardUnroll) {
    uint4 dd[kBackwardUnroll], xx[kBackwardUnroll], ww[kBackwardUnroll], old[kBackwardUnroll];
#pragma unroll
    for (int u = 0; u < kBackwardUnroll; ++u)
      if (p0 + T * u < packs) {
        const int64_t at = base + (p0 + T * u) * kPack;
        dd[u] = __ldcg(reinterpret_cast<const uint4*>(dn_again + at));
        xx[u] = *reinterpret_cast<const uint4*>(a.x + at);
        ww[u] = *reinterpret_cast<const uint4*>(a.w + (p0 + T * u) * kPack);
        if (a.accumulate) old[u] = *reinterpret_cast<const uint4*>(a.dx + at);
      }
#pragma unroll
    for (int u = 0; u < kBackwardUnroll; ++u) {
      const int64_t p = p0 + T * u;
      if (p >= packs) break;
      float dn[kPack], xv[kPack], wv[kPack], g[kPack];
      unpack(dd[u], dn);
      unpack(xx[u], xv);
      unpack(ww[u], wv);
#pragma unroll
      for (int k = 0; k < kPack; ++k) {
        const float xhat = xv[k] * rs;
        g[k] = __bfloat162float(__float2bfloat16_rn(rs * (wv[k] * dn[k] - xhat * mean)));
        dw_acc[k * packs + p] += dn[k] * xhat;
      }
      if (a.accumulate) {
        float prev[kPack];
        unpack(old[u], prev);
#pragma unroll
        for (int k = 0; k < kPack; ++k) g[k] += prev[k];
      }
      uint4 out;
      BFloat16* o = reinterpret_cast<BFloat16*>(&out);
#pragma unroll
      for (int k = 0; k < kPack; ++k) o[k] = __float2bfloat16_rn(g[k]);
      *reinterpret_cast<uint4*>(a.dx + base + p * kPack) = out;
    }
  }
}

template <int kRowThreads>
__device__ void backward_two_shot(const Views& v, const BackwardArgs& a, const Region& reg, uint32_t epoch,
                                  uint64_t deadline, float* dw_acc, float* red) {
  const int64_t in_off = reg.in(epoch), d = a.d;
  const RowGroup<kRowThreads> grp;
  stage_input(v, a.dn, in_off, a.rows, d);
  if (!block_barrier(v, 0, epoch, deadline)) return;
  BFloat16* dn_dst[kFusedMaxRanks];
  slice_destinations(v, reg, 1, dn_dst);
  const int64_t end = slice_end(v, a.rows);
  for (int64_t row = grp.first(slice_begin(v, a.rows)); row < end; row += grp.step())
    reduce_norm_row(v.stage, v.ranks, in_off, row, d, nullptr, dn_dst, v.ranks, nullptr, 0.0f, nullptr, nullptr,
                    grp, red);
  if (!block_barrier(v, 1, epoch, deadline)) return;
  BFloat16* const mine[1] = {v.stage[v.rank]};
  const BFloat16* summed = v.stage[v.rank] + reg.out(1);
  for (int64_t row = grp.first(0); row < a.rows; row += grp.step())
    backward_row(mine, 1, reg.out(1), nullptr, summed, row, a, dw_acc + grp.index * d, grp, red);
}

template <int kRowThreads>
__device__ void backward_one_shot(const Views& v, const BackwardArgs& a, const Region& reg, uint32_t epoch,
                                  uint64_t deadline, float* dw_acc, float* red) {
  const int64_t in_off = reg.in(epoch);
  const RowGroup<kRowThreads> grp;
  stage_input(v, a.dn, in_off, a.rows, a.d);
  if (!block_barrier(v, 0, epoch, deadline)) return;
  BFloat16* dn = v.stage[v.rank] + reg.out(1);  // local: only this rank reads it
  for (int64_t row = grp.first(0); row < a.rows; row += grp.step())
    backward_row(v.stage, v.ranks, in_off, dn, dn, row, a, dw_acc + grp.index * a.d, grp, red);
}

template <int kBlock>
__global__ void __launch_bounds__(kBlock)
    fused_backward(Views v, BackwardArgs a, int64_t cap, bool two_shot, uint32_t epoch_arg, uint64_t timeout_ns) {
  extern __shared__ float dw_acc[];  // [groups][kPack][d / kPack]: each group's dw sums (a column: one lane)
  __shared__ float red[kMaxWarps];
  const int groups = kBlock / a.row_threads;
  for (int64_t c = threadIdx.x; c < groups * a.d; c += blockDim.x) dw_acc[c] = 0.0f;
  const uint32_t epoch = begin_call(v, epoch_arg);  // its __syncthreads orders the zeroing too
  const uint64_t deadline = global_ns() + timeout_ns;
  switch (a.row_threads) {
#define LOOM_BACKWARD_ROWS(T)                                                       \
  case T:                                                                           \
    if (two_shot) backward_two_shot<T>(v, a, Region{cap}, epoch, deadline, dw_acc, red); \
    else backward_one_shot<T>(v, a, Region{cap}, epoch, deadline, dw_acc, red);          \
    break;
    LOOM_BACKWARD_ROWS(32)
    LOOM_BACKWARD_ROWS(64)
    LOOM_BACKWARD_ROWS(128)
    LOOM_BACKWARD_ROWS(256)
#undef LOOM_BACKWARD_ROWS
  }
  __syncthreads();
  // The block's sums: its groups' in group order, back to column order.
  const int64_t packs = a.d / kPack;
  float* out = a.dw_partials + static_cast<int64_t>(blockIdx.x) * a.d;
  for (int64_t c = threadIdx.x; c < a.d; c += blockDim.x) {
    const int64_t at = (c % kPack) * packs + c / kPack;
    float s = dw_acc[at];
    for (int grp = 1; grp < groups; ++grp) s += dw_acc[grp * a.d + at];
    out[c] = s;
  }
  end_call(v, epoch);
}

// dw[c] += the sum of partials[b, c] over b = 0..blocks-1, in that order.
template <class T>
__global__ void dw_column_sum(T* dw, const float* partials, int blocks, int64_t d) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= d) return;
  float s = 0.0f;
  for (int b = 0; b < blocks; ++b) s += partials[static_cast<int64_t>(b) * d + c];
  dw[c] = from_float<T>(to_float(dw[c]) + s);
}

__global__ void spin(uint64_t ns) {
  const uint64_t end = global_ns() + ns;
  while (global_ns() < end) {
  }
}

// Shared memory for the backward's dw sums on the current device: 128 KiB, or what the device allows a block
// (less 4 KiB for the kernel's own) when that is less; the first call per device also lets the backward kernels
// use that much there (the attribute belongs to the device's context).
// Read on every backward call (and by the communicator's path check): a lock-free slot per device, 0 until
// known; two threads filling one slot at once both set the same attribute and store the same value.
constexpr int kMaxDevices = 64;
int64_t backward_shared_budget() {
  static std::atomic<int64_t> budgets[kMaxDevices];  // zero-initialised (static storage)
  int device = 0;
  LOOM_CUDA_CHECK(cudaGetDevice(&device));
  LOOM_CHECK(device >= 0 && device < kMaxDevices, kCuda, "device " << device << " above " << kMaxDevices - 1);
  std::atomic<int64_t>& slot = budgets[device];
  if (const int64_t known = slot.load(std::memory_order_acquire)) return known;
  int optin = 0;
  LOOM_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t budget = std::min<int64_t>(int64_t{128} << 10, static_cast<int64_t>(optin) - 4096);
  for (auto* kernel : {fused_backward<kSmallBlock>, fused_backward<kWideBlock>})
    LOOM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(budget)));
  slot.store(budget, std::memory_order_release);
  return budget;
}

// The widest row whose dw sums (one group: d floats) fit `budget`.
int64_t backward_max_d(int64_t budget) {
  return std::min<int64_t>(kFusedBackwardMaxD, budget / static_cast<int64_t>(sizeof(float)));
}

// CUDA loads kernels lazily (CUDA_MODULE_LOADING=LAZY, the default), and loading one can wait for the kernels
// already running: if those are fused kernels waiting for a peer whose next kernel is the one being loaded, the
// group deadlocks until the deadline (seen on H100 with the spin kernel launched between fused calls). So every
// kernel of this file is loaded before the first launch of any of them.
void load_kernels_once() {
  static const bool loaded = [] {
    cudaFuncAttributes attr;
    LOOM_CUDA_CHECK(cudaFuncGetAttributes(&attr, fused_forward<kSmallBlock>));
    LOOM_CUDA_CHECK(cudaFuncGetAttributes(&attr, fused_forward<kWideBlock>));
    LOOM_CUDA_CHECK(cudaFuncGetAttributes(&attr, fused_backward<kSmallBlock>));
    LOOM_CUDA_CHECK(cudaFuncGetAttributes(&attr, fused_backward<kWideBlock>));
    LOOM_CUDA_CHECK(cudaFuncGetAttributes(&attr, dw_column_sum<float>));
    LOOM_CUDA_CHECK(cudaFuncGetAttributes(&attr, dw_column_sum<BFloat16>));
    LOOM_CUDA_CHECK(cudaFuncGetAttributes(&attr, spin));
    return true;
  }();
  (void)loaded;
}

}  // namespace

int64_t fused_backward_max_d() {
  return backward_max_d(backward_shared_budget());
}

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

namespace {

// The checks every launch makes, and the kernel's copy of the group.
Views group_views(const FusedNormGroup& g, const char* op, int64_t rows, int64_t d, int blocks,
                  std::initializer_list<const void*> tensors) {
  LOOM_CHECK(g.ranks >= 1 && g.ranks <= kFusedMaxRanks && g.rank >= 0 && g.rank < g.ranks, kComm,
             op << ": group of " << g.ranks << " ranks (rank " << g.rank << "); 1.." << kFusedMaxRanks << " supported");
  LOOM_CHECK(d > 0 && d % kPack == 0, kShape, op << ": hidden size " << d << " must be a positive multiple of " << kPack);
  LOOM_CHECK(rows >= 0, kShape, op << ": negative row count");
  LOOM_CHECK(blocks >= 1 && blocks <= kFusedMaxBlocks, kConfig,
             op << ": blocks " << blocks << " out of 1.." << kFusedMaxBlocks);
  LOOM_CHECK(rows * d <= fused_stage_capacity(g.stage_bytes), kShape,
             op << ": " << rows << " x " << d << " needs " << fused_stage_bytes(rows, d)
                << " staging bytes per rank, the group has " << g.stage_bytes);
  LOOM_CHECK(g.abort != nullptr && g.error != nullptr, kComm, op << ": group without abort/error words");
  for (const void* p : tensors)
    LOOM_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, kShape, op << ": tensors must be 16-byte aligned");
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
  v.error_host = g.error_host;
  v.counter = g.epoch_counter;
  return v;
}

uint64_t timeout_ns(double s) {
  return static_cast<uint64_t>(s * 1e9);
}

}  // namespace

void launch_fused_allreduce_add_rmsnorm(const FusedNormGroup& g, const FusedNormArgs& a, cudaStream_t stream) {
  const char* op = a.allreduce_only ? "fused_allreduce" : "fused_allreduce_add_rmsnorm";
  const Views v = group_views(g, op, a.rows, a.d, a.blocks,
                              {a.partial, a.residual, a.weight, static_cast<const void*>(a.residual_out),
                               static_cast<const void*>(a.normed)});
  LOOM_CHECK(a.partial != nullptr && a.residual_out != nullptr, kShape, op << ": partial and residual_out are required");
  if (a.allreduce_only)
    LOOM_CHECK(a.residual == nullptr && a.weight == nullptr && a.normed == nullptr && a.rstd == nullptr, kShape,
               op << ": all-reduce alone takes no residual, weight, normed or rstd");
  else
    LOOM_CHECK(a.residual != nullptr && a.weight != nullptr && a.normed != nullptr, kShape,
               op << ": residual, weight and normed are required");
  if (a.rows == 0) return;
  load_kernels_once();
  ForwardArgs fa{static_cast<const BFloat16*>(a.partial), static_cast<const BFloat16*>(a.residual),
                 static_cast<const BFloat16*>(a.weight),  static_cast<BFloat16*>(a.residual_out),
                 static_cast<BFloat16*>(a.normed),        a.rstd,
                 a.rows,                                  a.d,
                 a.eps,                                   0};
  const int block = block_threads(a.rows, a.d);
  fa.row_threads = row_threads(a.rows, a.blocks, a.d, block);
  const int64_t cap = fused_stage_capacity(g.stage_bytes);
  const bool two_shot = a.algo == FusedAlgo::kTwoShot;
  if (block == kWideBlock)
    fused_forward<kWideBlock><<<a.blocks, block, 0, stream>>>(v, fa, cap, two_shot, a.epoch, timeout_ns(a.timeout_s));
  else
    fused_forward<kSmallBlock><<<a.blocks, block, 0, stream>>>(v, fa, cap, two_shot, a.epoch, timeout_ns(a.timeout_s));
  LOOM_CUDA_CHECK_LAUNCH(op);
}

void launch_fused_rmsnorm_backward(const FusedNormGroup& g, const FusedNormBackwardArgs& a, cudaStream_t stream) {
  const char* op = "fused_allreduce_rmsnorm_backward";
  const Views v = group_views(g, op, a.rows, a.d, a.blocks,
                              {a.dnormed, a.x, a.weight, static_cast<const void*>(a.dx)});
  const int64_t budget = backward_shared_budget();
  LOOM_CHECK(a.d <= backward_max_d(budget), kShape,
             op << ": hidden size " << a.d << " above " << backward_max_d(budget)
                << " on this GPU (a row group's dw sums live in shared memory)");
  LOOM_CHECK(a.rstd != nullptr && a.dw != nullptr && a.dw_partials != nullptr, kShape,
             op << ": rstd, dw and dw_partials are required");
  if (a.rows == 0) return;  // dw += an empty sum; no call, so no epoch either (every rank alike)
  load_kernels_once();
  BackwardArgs ba{static_cast<const BFloat16*>(a.dnormed), static_cast<const BFloat16*>(a.x),
                  static_cast<const BFloat16*>(a.weight), a.rstd, static_cast<BFloat16*>(a.dx), a.accumulate,
                  a.dw_partials, a.rows, a.d, 0};
  const BackwardShape shape = backward_shape(a.rows, a.blocks, a.d, budget);
  ba.row_threads = shape.row_threads;
  const size_t shared_bytes = static_cast<size_t>(shape.block / shape.row_threads * a.d) * sizeof(float);
  const int64_t cap = fused_stage_capacity(g.stage_bytes);
  const bool two_shot = a.algo == FusedAlgo::kTwoShot;
  if (shape.block == kWideBlock)
    fused_backward<kWideBlock><<<a.blocks, shape.block, shared_bytes, stream>>>(v, ba, cap, two_shot, a.epoch,
                                                                                 timeout_ns(a.timeout_s));
  else
    fused_backward<kSmallBlock><<<a.blocks, shape.block, shared_bytes, stream>>>(v, ba, cap, two_shot, a.epoch,
                                                                                  timeout_ns(a.timeout_s));
  LOOM_CUDA_CHECK_LAUNCH(op);
  const unsigned col_blocks = static_cast<unsigned>((a.d + kSmallBlock - 1) / kSmallBlock);
  if (a.dw_bf16)
    dw_column_sum<BFloat16><<<col_blocks, kSmallBlock, 0, stream>>>(static_cast<BFloat16*>(a.dw), a.dw_partials, a.blocks, a.d);
  else
    dw_column_sum<float><<<col_blocks, kSmallBlock, 0, stream>>>(static_cast<float*>(a.dw), a.dw_partials, a.blocks, a.d);
  LOOM_CUDA_CHECK_LAUNCH("dw_column_sum");
}

}  // namespace loom::cuda
