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

constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // 16-byte accesses a thread has in flight per stream of data

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
// at least kWarps rows, more threads per row when it has fewer, so one wide row is not walked by one warp);
// the rows of a block (first_row(begin) + k * gridDim.x) are dealt to its groups in turn. Thread l of a group
// takes packs l, l + threads, ...; its sum of squares adds them in that order, then a fixed shuffle tree sums
// each warp and the group adds its warps' totals in warp order. row_rstd repeats exactly this with the same
// group size (it depends only on the call's rows), so a row's rstd has the same bits wherever it is computed.
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
  __device__ int64_t step() const { return static_cast<int64_t>(gridDim.x) * (kThreads / threads); }
  // The sum of x over the group, the same bits in every thread of it. red: kWarps floats of shared memory.
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

// Threads per row for a call of `rows` rows of `d` over `blocks` blocks (host side): the most (up to kThreads)
// that still give every row of a block its own group, and no more than the row has packs.
int row_threads(int64_t rows, int blocks, int64_t d) {
  const int64_t per_block = (rows + blocks - 1) / blocks;
  int t = 32;
  while (t < kThreads && per_block * (2 * t) <= kThreads && 2 * t <= d / kPack) t *= 2;
  return t;
}

__device__ __forceinline__ float rstd_of(float sum_sq, int64_t d, float eps) {
  return static_cast<float>(1.0 / sqrt(static_cast<double>(sum_sq) / static_cast<double>(d) + static_cast<double>(eps)));
}

__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[kPack]) {
  const BFloat16* h = reinterpret_cast<const BFloat16*>(&raw);
#pragma unroll
  for (int k = 0; k < kPack; ++k) out[k] = __bfloat162float(h[k]);
}

// Loads that bypass L1 (a buffer a peer rewrote since this SM last read it must not come from a stale L1 line).
__device__ __forceinline__ void load_pack_cg(const BFloat16* p, float (&out)[kPack]) {
  unpack(__ldcg(reinterpret_cast<const uint4*>(p)), out);
}

// One row, by one row group: r = bf16(sum over ranks 0..W-1 of in_p[row] + residual[row]) written to
// res_dst[0..n_dst) (the same row offset in each), then y = bf16(r * rstd * w) written to norm_dst[...]. rstd as
// the backend's RMSNorm: 1 / sqrt(mean(r^2) + eps) in double, rounded once. res_dst[0] is re-read (this lane's
// own stores) for the second pass.
template <class Group>
__device__ void reduce_norm_row(const Views& v, int64_t in_off, int64_t row, int64_t d, const BFloat16* residual,
                                const BFloat16* w, float eps, BFloat16* const* res_dst, BFloat16* const* norm_dst,
                                int n_dst, float* rstd, const Group& grp, float* red) {
  constexpr int T = Group::threads;
  const int lane = grp.lane;
  const int64_t packs = d / kPack, base = row * d;
  float sum_sq = 0.0f;
  for (int64_t p0 = lane; p0 < packs; p0 += static_cast<int64_t>(T) * kUnroll) {
    float acc[kUnroll][kPack];
    uint4 raw[kUnroll] = {};  // packs past the row's end stay zero (unpacked, never stored)
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (p0 + T * u < packs) raw[u] = __ldcg(reinterpret_cast<const uint4*>(v.stage[0] + in_off + base + (p0 + T * u) * kPack));
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) unpack(raw[u], acc[u]);
    for (int q = 1; q < v.ranks; ++q) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (p0 + T * u < packs) raw[u] = __ldcg(reinterpret_cast<const uint4*>(v.stage[q] + in_off + base + (p0 + T * u) * kPack));
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float x[kPack];
        unpack(raw[u], x);
#pragma unroll
        for (int k = 0; k < kPack; ++k) acc[u][k] += x[k];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (p0 + T * u < packs) raw[u] = *reinterpret_cast<const uint4*>(residual + base + (p0 + T * u) * kPack);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (p0 + T * u >= packs) break;
      float x[kPack];
      unpack(raw[u], x);
      uint4 out;
      BFloat16* o = reinterpret_cast<BFloat16*>(&out);
#pragma unroll
      for (int k = 0; k < kPack; ++k) {
        o[k] = __float2bfloat16_rn(acc[u][k] + x[k]);
        const float r = __bfloat162float(o[k]);
        sum_sq += r * r;
      }
      for (int i = 0; i < n_dst; ++i) *reinterpret_cast<uint4*>(res_dst[i] + base + (p0 + T * u) * kPack) = out;
    }
  }
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
      for (int i = 0; i < n_dst; ++i) *reinterpret_cast<uint4*>(norm_dst[i] + base + (p0 + T * u) * kPack) = out;
    }
  }
}

// The rstd of a row of this rank's residual output, summed exactly as reduce_norm_row sums it (the same
// thread-to-pack mapping, the same order within a thread, the same reduction), so every rank gets the owner's
// value bit for bit. By one row group.
template <class Group>
__device__ float row_rstd(const BFloat16* res, int64_t row, int64_t d, float eps, const Group& grp, float* red) {
  float sum_sq = 0.0f;
  for (int64_t p = grp.lane; p < d / kPack; p += grp.threads) {
    float r[kPack];
    unpack(*reinterpret_cast<const uint4*>(res + row * d + p * kPack), r);
#pragma unroll
    for (int k = 0; k < kPack; ++k) sum_sq += r[k] * r[k];
  }
  return rstd_of(grp.total(sum_sq, red), d, eps);
}

// Staging layout per rank (bf16 elements; cap = the capacity of the staging buffer / 4, the same for every call
// whatever its shape, so the parity rule holds when shapes change between calls):
// [in 0][in 1][out 0][out 1]. Forward: out 0 = new residual rows, out 1 = normalised rows. Backward: out 0 = the
// input-gradient rows, out 1 = the summed gradient of the normalised rows.
struct Region {
  int64_t cap;
  __device__ int64_t in(uint32_t epoch) const { return (epoch & 1u) * cap; }  // the same parity rule everywhere
  __device__ int64_t out(int k) const { return (2 + k) * cap; }
};

// Destinations of this rank's token slice in two-shot: out region k of every rank, this rank's own first (the
// second pass of a row re-reads dst[0], its own stores).
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
  int row_threads;  // row_threads(rows, blocks, d)
};

template <int kRowThreads>
__device__ void forward_two_shot(const Views& v, const ForwardArgs& a, const Region& reg, uint32_t epoch,
                                 uint64_t deadline, float* red) {
  const int64_t in_off = reg.in(epoch);
  const RowGroup<kRowThreads> grp;
  stage_input(v, a.partial, in_off, a.rows, a.d);
  if (!block_barrier(v, 0, epoch, deadline)) return;
  BFloat16* res_dst[kFusedMaxRanks];
  BFloat16* norm_dst[kFusedMaxRanks];
  slice_destinations(v, reg, 0, res_dst);
  slice_destinations(v, reg, 1, norm_dst);
  const int64_t end = slice_end(v, a.rows);
  for (int64_t row = grp.first(slice_begin(v, a.rows)); row < end; row += grp.step())
    reduce_norm_row(v, in_off, row, a.d, a.residual, a.w, a.eps, res_dst, norm_dst, v.ranks, nullptr, grp, red);
  if (!block_barrier(v, 1, epoch, deadline)) return;
  copy_block_rows(a.residual_out, v.stage[v.rank] + reg.out(0), a.rows, a.d);
  copy_block_rows(a.normed, v.stage[v.rank] + reg.out(1), a.rows, a.d);
  if (a.rstd == nullptr) return;
  // From the copied-out rows: each row's copy is done by its block, whose threads must see each other's stores.
  __syncthreads();
  for (int64_t row = grp.first(0); row < a.rows; row += grp.step()) {
    const float rs = row_rstd(a.residual_out, row, a.d, a.eps, grp, red);
    if (grp.lane == 0) a.rstd[row] = rs;
  }
}

template <int kRowThreads>
__device__ void forward_one_shot(const Views& v, const ForwardArgs& a, const Region& reg, uint32_t epoch,
                                 uint64_t deadline, float* red) {
  const int64_t in_off = reg.in(epoch);
  const RowGroup<kRowThreads> grp;
  stage_input(v, a.partial, in_off, a.rows, a.d);
  if (!block_barrier(v, 0, epoch, deadline)) return;
  BFloat16* res_dst[1] = {a.residual_out};
  BFloat16* norm_dst[1] = {a.normed};
  for (int64_t row = grp.first(0); row < a.rows; row += grp.step())
    reduce_norm_row(v, in_off, row, a.d, a.residual, a.w, a.eps, res_dst, norm_dst, 1, a.rstd, grp, red);
}

__global__ void __launch_bounds__(kThreads)
    fused_forward(Views v, ForwardArgs a, int64_t cap, bool two_shot, uint32_t epoch_arg, uint64_t timeout_ns) {
  __shared__ float red[kWarps];
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
//   dw_partials[block, :] = sum over the block's rows of dn * xhat     (rows dealt by row % blocks, as ever)
// and a second small kernel adds the column sums of dw_partials (in block order) to dw. Both algorithms compute
// dn, g, the dw partial sums and dx with the same arithmetic in the same order: bit-identical to each other and
// on every rank.

struct BackwardArgs {
  const BFloat16 *dn, *x, *w;
  const float* rstd;
  BFloat16* dx;
  bool accumulate;
  float* dw_partials;
  int64_t rows, d;
};

// One row, pass 1: dn summed from every rank's input buffer, rounded, written to dn_dst[0..n); the row's mean.
// Pass 2: dn re-read from dn_dst[0] (this thread's own stores), g written to g_dst[0..n) (+ the old value of
// g_dst[0] when accumulating); dw_acc (shared, d floats) += dn * xhat when given.
__device__ void backward_row(const Views& v, int64_t in_off, int64_t row, const BackwardArgs& a,
                             BFloat16* const* dn_dst, BFloat16* const* g_dst, int n_dst, bool accumulate,
                             float* dw_acc, float* shared) {
  const int64_t d = a.d, packs = d / kPack, base = row * d;
  const float rs = a.rstd[row];
  float dot = 0.0f;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    float acc[kPack], y[kPack], xv[kPack], wv[kPack];
    load_pack_cg(v.stage[0] + in_off + base + p * kPack, acc);
    for (int q = 1; q < v.ranks; ++q) {
      load_pack_cg(v.stage[q] + in_off + base + p * kPack, y);
#pragma unroll
      for (int k = 0; k < kPack; ++k) acc[k] += y[k];
    }
    load_pack<kPack>(a.x + base + p * kPack, xv);
    load_pack<kPack>(a.w + p * kPack, wv);
    uint4 out;
    BFloat16* o = reinterpret_cast<BFloat16*>(&out);
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      o[k] = __float2bfloat16_rn(acc[k]);
      dot += (wv[k] * __bfloat162float(o[k])) * (xv[k] * rs);
    }
    for (int i = 0; i < n_dst; ++i) *reinterpret_cast<uint4*>(dn_dst[i] + base + p * kPack) = out;
  }
  const float mean = block_sum(dot, shared) / static_cast<float>(d);
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    float dn[kPack], xv[kPack], wv[kPack], g[kPack];
    load_pack<kPack>(dn_dst[0] + base + p * kPack, dn);
    load_pack<kPack>(a.x + base + p * kPack, xv);
    load_pack<kPack>(a.w + p * kPack, wv);
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      const float xhat = xv[k] * rs;
      g[k] = __bfloat162float(__float2bfloat16_rn(rs * (wv[k] * dn[k] - xhat * mean)));
      if (dw_acc != nullptr) dw_acc[p * kPack + k] += dn[k] * xhat;
    }
    if (accumulate) {
      float old[kPack];
      load_pack<kPack>(g_dst[0] + base + p * kPack, old);
#pragma unroll
      for (int k = 0; k < kPack; ++k) g[k] += old[k];
    }
    uint4 out;
    BFloat16* o = reinterpret_cast<BFloat16*>(&out);
#pragma unroll
    for (int k = 0; k < kPack; ++k) o[k] = __float2bfloat16_rn(g[k]);
    for (int i = 0; i < n_dst; ++i) *reinterpret_cast<uint4*>(g_dst[i] + base + p * kPack) = out;
  }
}

__device__ void backward_two_shot(const Views& v, const BackwardArgs& a, const Region& reg, uint32_t epoch,
                                  uint64_t deadline, float* dw_acc, float* shared) {
  const int64_t in_off = reg.in(epoch), d = a.d;
  stage_input(v, a.dn, in_off, a.rows, d);
  if (!block_barrier(v, 0, epoch, deadline)) return;
  BFloat16* g_dst[kFusedMaxRanks];
  BFloat16* dn_dst[kFusedMaxRanks];
  slice_destinations(v, reg, 0, g_dst);
  slice_destinations(v, reg, 1, dn_dst);
  for (int64_t row = first_row(slice_begin(v, a.rows)); row < slice_end(v, a.rows); row += gridDim.x)
    backward_row(v, in_off, row, a, dn_dst, g_dst, v.ranks, false, nullptr, shared);
  if (!block_barrier(v, 1, epoch, deadline)) return;
  // Copy out every row (dealt as in one-shot), and the dw sums from the summed dn, in one-shot's order.
  const BFloat16* my_g = v.stage[v.rank] + reg.out(0);
  const BFloat16* my_dn = v.stage[v.rank] + reg.out(1);
  for (int64_t row = first_row(0); row < a.rows; row += gridDim.x) {
    const float rs = a.rstd[row];
    for (int64_t p = threadIdx.x; p < d / kPack; p += blockDim.x) {
      const int64_t at = row * d + p * kPack;
      float g[kPack], dn[kPack], xv[kPack];
      load_pack_cg(my_g + at, g);
      load_pack_cg(my_dn + at, dn);
      load_pack<kPack>(a.x + at, xv);
#pragma unroll
      for (int k = 0; k < kPack; ++k) dw_acc[p * kPack + k] += dn[k] * (xv[k] * rs);
      if (a.accumulate) {
        float old[kPack];
        load_pack<kPack>(a.dx + at, old);
#pragma unroll
        for (int k = 0; k < kPack; ++k) g[k] += old[k];
      }
      store_pack<kPack>(a.dx + at, g);
    }
  }
}

__device__ void backward_one_shot(const Views& v, const BackwardArgs& a, const Region& reg, uint32_t epoch,
                                  uint64_t deadline, float* dw_acc, float* shared) {
  const int64_t in_off = reg.in(epoch);
  stage_input(v, a.dn, in_off, a.rows, a.d);
  if (!block_barrier(v, 0, epoch, deadline)) return;
  BFloat16* dn_dst[1] = {v.stage[v.rank] + reg.out(1)};  // local: only this rank reads it
  BFloat16* g_dst[1] = {a.dx};
  for (int64_t row = first_row(0); row < a.rows; row += gridDim.x)
    backward_row(v, in_off, row, a, dn_dst, g_dst, 1, a.accumulate, dw_acc, shared);
}

__global__ void __launch_bounds__(kThreads)
    fused_backward(Views v, BackwardArgs a, int64_t cap, bool two_shot, uint32_t epoch_arg, uint64_t timeout_ns) {
  extern __shared__ float dw_acc[];  // d floats: this block's dw sums (each column touched by one thread only)
  __shared__ float shared[32];
  for (int64_t c = threadIdx.x; c < a.d; c += blockDim.x) dw_acc[c] = 0.0f;
  const uint32_t epoch = begin_call(v, epoch_arg);  // its __syncthreads orders the zeroing too
  const uint64_t deadline = global_ns() + timeout_ns;
  if (two_shot) backward_two_shot(v, a, Region{cap}, epoch, deadline, dw_acc, shared);
  else backward_one_shot(v, a, Region{cap}, epoch, deadline, dw_acc, shared);
  __syncthreads();
  float* out = a.dw_partials + static_cast<int64_t>(blockIdx.x) * a.d;
  for (int64_t c = threadIdx.x; c < a.d; c += blockDim.x) out[c] = dw_acc[c];
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

// CUDA loads kernels lazily (CUDA_MODULE_LOADING=LAZY, the default), and loading one can wait for the kernels
// already running: if those are fused kernels waiting for a peer whose next kernel is the one being loaded, the
// group deadlocks until the deadline (seen on H100 with the spin kernel launched between fused calls). So every
// kernel of this file is loaded before the first launch of any of them.
void load_kernels_once() {
  static const bool loaded = [] {
    cudaFuncAttributes attr;
    LOOM_CUDA_CHECK(cudaFuncGetAttributes(&attr, fused_forward));
    LOOM_CUDA_CHECK(cudaFuncGetAttributes(&attr, fused_backward));
    LOOM_CUDA_CHECK(cudaFuncGetAttributes(&attr, dw_column_sum<float>));
    LOOM_CUDA_CHECK(cudaFuncGetAttributes(&attr, dw_column_sum<BFloat16>));
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
  const char* op = "fused_allreduce_add_rmsnorm";
  const Views v = group_views(g, op, a.rows, a.d, a.blocks,
                              {a.partial, a.residual, a.weight, static_cast<const void*>(a.residual_out),
                               static_cast<const void*>(a.normed)});
  if (a.rows == 0) return;
  load_kernels_once();
  ForwardArgs fa{static_cast<const BFloat16*>(a.partial), static_cast<const BFloat16*>(a.residual),
                 static_cast<const BFloat16*>(a.weight),  static_cast<BFloat16*>(a.residual_out),
                 static_cast<BFloat16*>(a.normed),        a.rstd,
                 a.rows,                                  a.d,
                 a.eps,                                   row_threads(a.rows, a.blocks, a.d)};
  fused_forward<<<a.blocks, kThreads, 0, stream>>>(v, fa, fused_stage_capacity(g.stage_bytes),
                                                   a.algo == FusedAlgo::kTwoShot, a.epoch, timeout_ns(a.timeout_s));
  LOOM_CUDA_CHECK_LAUNCH(op);
}

void launch_fused_rmsnorm_backward(const FusedNormGroup& g, const FusedNormBackwardArgs& a, cudaStream_t stream) {
  const char* op = "fused_allreduce_rmsnorm_backward";
  const Views v = group_views(g, op, a.rows, a.d, a.blocks,
                              {a.dnormed, a.x, a.weight, static_cast<const void*>(a.dx)});
  LOOM_CHECK(a.d <= kFusedBackwardMaxD, kShape,
             op << ": hidden size " << a.d << " above " << kFusedBackwardMaxD << " (the dw sums of a block live in shared memory)");
  LOOM_CHECK(a.rstd != nullptr && a.dw != nullptr && a.dw_partials != nullptr, kShape,
             op << ": rstd, dw and dw_partials are required");
  if (a.rows == 0) return;  // dw += an empty sum; no call, so no epoch either (every rank alike)
  load_kernels_once();
  BackwardArgs ba{static_cast<const BFloat16*>(a.dnormed), static_cast<const BFloat16*>(a.x),
                  static_cast<const BFloat16*>(a.weight), a.rstd, static_cast<BFloat16*>(a.dx), a.accumulate,
                  a.dw_partials, a.rows, a.d};
  const size_t shared_bytes = static_cast<size_t>(a.d) * sizeof(float);
  fused_backward<<<a.blocks, kThreads, shared_bytes, stream>>>(
      v, ba, fused_stage_capacity(g.stage_bytes), a.algo == FusedAlgo::kTwoShot, a.epoch, timeout_ns(a.timeout_s));
  LOOM_CUDA_CHECK_LAUNCH(op);
  const unsigned col_blocks = static_cast<unsigned>((a.d + kThreads - 1) / kThreads);
  if (a.dw_bf16)
    dw_column_sum<BFloat16><<<col_blocks, kThreads, 0, stream>>>(static_cast<BFloat16*>(a.dw), a.dw_partials, a.blocks, a.d);
  else
    dw_column_sum<float><<<col_blocks, kThreads, 0, stream>>>(static_cast<float*>(a.dw), a.dw_partials, a.blocks, a.d);
  LOOM_CUDA_CHECK_LAUNCH("dw_column_sum");
}

}  // namespace loom::cuda
