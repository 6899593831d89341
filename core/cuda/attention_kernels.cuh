// Causal self-attention kernels of the CUDA backend (flash-style, bf16 in and out, f32 accumulation), and their
// host launchers. core/cuda/attention.cu wraps them as CudaBackend::attention_forward / attention_backward;
// bench/attention_bench.cu includes this header directly to test and time them without the rest of the backend.
//
// Layout (core/backend.h): q, k, v, out, dout, dq, dk, dv are [B, T, H, Dh] bf16, row-major, so the row of token
// t of head h starts at ((b*T + t)*H + h)*Dh and consecutive tokens of a head are H*Dh elements apart; lse is
// f32 [B, H, T], the natural log-sum-exp of the scaled scores s[t,u] = scale * <q[t], k[u]>, u <= t.
//
// Two paths:
//   fast     Dh in {32, 64, 128} with every bf16 pointer 16-byte aligned: FlashAttention-2 structure on tensor
//            cores (mma.sync m16n8k16 bf16 -> f32, operands through ldmatrix), tiles staged in shared memory by
//            cp.async with double buffering, causal tile skipping, online softmax in registers (exp2 of
//            log2(e)-prescaled scores). Each warp owns whole rows (32 in the forward, 16 in the backward), so
//            softmax statistics never leave the quad of threads that holds a row.
//   generic  any Dh from 1 to 256 and any alignment: one warp per row, f32 arithmetic, scalar loads. Slow,
//            but exact enough to serve as the fallback for unusual head sizes.
//
// Backward is deterministic by construction (no atomics): a pre-pass writes delta[t] = <dout[t], out[t]> (f32,
// caller's scratch), one kernel over key blocks owns dk and dv of its 64 keys and loops over the query tiles
// that see them, and one kernel over query blocks owns dq of its 64 rows and loops over key tiles. The
// probabilities are recomputed from q, k and lse (p = exp2(s*scale*log2e - lse*log2e)); nothing T x T is
// stored. The price of determinism is recomputing S and dP in the dq kernel: 7 tile products instead of the 5
// of an atomic dq, so the useful-FLOP rate is at most 5/7 of the raw tensor-core rate.
//
// FLOPs (causal, counted as the useful half of the dense product): forward 4*B*H*T^2*Dh/2, backward 2.5x
// forward. At B=8, H=16, T=2048, Dh=128: 137.4 GFLOP forward, 343.6 GFLOP backward; the targets on an H100
// (250 and 150 TFLOP/s) mean 0.55 ms and 2.29 ms. Measured on an H100 80GB HBM3 (bench/attention_bench.cu,
// bench/results/attention_h100.json): forward 0.48 ms (284 TFLOP/s), backward 1.91 ms (180 TFLOP/s); at
// T=4096 309 and 195; Dh=64 (H=32) 271 and 148; Dh=32 (T=1024) 155 and 110.
//
// Resources of the fast kernels (nvcc 13.0, sm_90, -Xptxas -v; no spills), 128 threads per block, registers
// per thread / shared memory per block (blocks per SM that fit):
//   forward   Dh 32: 168 / 30 KiB (3)   Dh 64: 225 / 54 KiB (2)   Dh 128: 245 / 68 KiB (2)   [Bn 64, 64, 32]
//   dk, dv    Dh 32: 141 / 31 KiB (3)   Dh 64: 175 / 55 KiB (2)   Dh 128: 254 / 103 KiB (2)
//   dq        Dh 32: 101 / 30 KiB (4)   Dh 64: 133 / 54 KiB (3)   Dh 128: 173 / 102 KiB (2)
// (regenerate with -DCMAKE_CUDA_FLAGS="-Xptxas -v" after any change here).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <initializer_list>

#include "core/cuda/cuda_check.h"

namespace loom::cuda::attention {

using bf16_t = __nv_bfloat16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxGenericDim = 256;

struct ForwardParams {
  const bf16_t* q;  // [B, T, H, Dh]
  const bf16_t* k;  // [B, T, H, Dh]
  const bf16_t* v;  // [B, T, H, Dh]
  bf16_t* out;      // [B, T, H, Dh]
  float* lse;       // [B, H, T]
  int batch, seq, heads, dim;
  float scale;
};

struct BackwardParams {
  bf16_t* dq;          // [B, T, H, Dh]
  bf16_t* dk;          // [B, T, H, Dh]
  bf16_t* dv;          // [B, T, H, Dh]
  const bf16_t* dout;  // [B, T, H, Dh]
  const bf16_t* q;     // [B, T, H, Dh]
  const bf16_t* k;     // [B, T, H, Dh]
  const bf16_t* v;     // [B, T, H, Dh]
  const bf16_t* out;   // [B, T, H, Dh]
  const float* lse;    // [B, H, T]
  float* delta;        // [B, H, T] scratch, written by the pre-pass
  bool accumulate;     // false: d* = result; true: d* += result
  int batch, seq, heads, dim;
  float scale;
};

// kAuto takes the tensor-core path where it applies; kGeneric forces the warp-per-row path (tests compare both).
enum class Path { kAuto, kGeneric };

// ---- PTX wrappers ------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; zero-fills the destination when !valid (rows past T).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                  uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}

// d[16x8] += a[16x16] b[16x8], bf16 operands, f32 accumulators. Fragment layouts (g = lane/4, c = lane%4):
//   a: {a0: (g, 2c..2c+1), a1: (g+8, 2c..), a2: (g, 8+2c..), a3: (g+8, 8+2c..)}   (row, col)
//   b: {b0: (2c..2c+1, g), b1: (8+2c.., g)}                                      (k, n)
//   d: {d0, d1: (g, 2c..2c+1), d2, d3: (g+8, 2c..2c+1)}
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a bf16x2 register, the first in the low half (the lower-indexed element of a fragment pair).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float fast_exp2(float x) {  // exp2(-inf) = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Element offset of token 0 of head (b, h).
__device__ __forceinline__ int64_t head_offset(int b, int h, int seq, int heads, int dim) {
  return (static_cast<int64_t>(b) * seq * heads + h) * dim;
}

// ---- fast path: tiles and fragments ------------------------------------------------------------------------

// Every tile is 64 rows (query or key) of Dh bf16. Shared-memory rows are padded by 16 bytes so that the eight
// row addresses of one ldmatrix fall into eight different 16-byte bank groups (stride 2*Dh+16 bytes is an odd
// multiple of 16 for Dh = 32, 64, 128): conflict-free without a swizzle.
template <int kDim>
struct Tile {
  static_assert(kDim == 32 || kDim == 64 || kDim == 128, "fast attention path supports Dh 32, 64, 128");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16 * kWarps;  // 64: 16 rows per warp
  static constexpr int kStride = kDim + 8;   // elements per shared-memory row
  static constexpr int kElems = kRows * kStride;
  static constexpr int kBytes = kElems * 2;
  static constexpr int kChunks = kDim / 8;  // 16-byte chunks per row
  static_assert(kThreads % kChunks == 0, "a row's chunks must not straddle threads");
};

// Issues cp.async for rows [row0, row0 + kTileRows) of one head into a tile; rows at or past `seq` become zeros.
// Thread i copies chunk i % kChunks of rows i / kChunks + j * kRowStep.
template <int kDim, int kTileRows = Tile<kDim>::kRows>
__device__ __forceinline__ void load_tile(bf16_t* tile, const bf16_t* head, int row0, int seq, int64_t stride) {
  using C = Tile<kDim>;
  constexpr int kRowStep = C::kThreads / C::kChunks;
  static_assert(kTileRows % kRowStep == 0, "tile copy must divide evenly");
  const int r = static_cast<int>(threadIdx.x) / C::kChunks, c = static_cast<int>(threadIdx.x) % C::kChunks;
  const bf16_t* src = head + (row0 + r) * stride + c * 8;
  const uint32_t dst = smem_addr(tile + r * C::kStride + c * 8);
#pragma unroll
  for (int j = 0; j < kTileRows / kRowStep; ++j) {
    const bool valid = row0 + r + j * kRowStep < seq;
    cp_async_16(dst + j * kRowStep * C::kStride * 2, valid ? src + j * kRowStep * stride : head, valid);
  }
}

// Byte offset of element (row, col) inside a tile.
template <int kDim>
__device__ __forceinline__ constexpr uint32_t tile_offset(int row, int col) {
  return static_cast<uint32_t>((row * Tile<kDim>::kStride + col) * 2);
}

// Each thread's part of an ldmatrix.x4 address, relative to the fragment's top-left element: fragment loads are
// then a shared-space base plus compile-time offsets.
//   rows16: lane l points at row l%16, column 8*(l/16). As A (16 x 16, row-major tile) the four matrices are
//           a0..a3; as .trans B where B[k][n] = tile[k][n] (k = rows, e.g. V in P V) they are b0, b1 of n-tile
//           0 and b0, b1 of n-tile 8.
//   rows8:  lane l points at row l%8 + 8*(l/16), column 8*((l/8)%2): B where B[k][n] = tile[n][k] (n = rows,
//           e.g. K in Q K^T), giving b0, b1 of n-tile 0 and b0, b1 of n-tile 8.
template <int kDim>
struct LaneOffsets {
  uint32_t rows16, rows8;
  __device__ __forceinline__ explicit LaneOffsets(int lane)
      : rows16(tile_offset<kDim>(lane & 15, (lane >> 4) * 8)),
        rows8(tile_offset<kDim>((lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 8)) {}
};

// acc[16 x 64] = A[16 x Dh] B^T with A the 16 rows of the tile at a_rows (shared address of its first row) and B
// the 64 rows of the tile at b_tile: scores of 16 rows against the rows of a tile.
template <int kDim>
__device__ __forceinline__ void tile_scores(float (&acc)[8][4], uint32_t a_rows, uint32_t b_tile,
                                            const LaneOffsets<kDim>& lo) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < kDim / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a_rows + lo.rows16 + tile_offset<kDim>(0, kk * 16), a[0], a[1], a[2], a[3]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t b0, b1, b2, b3;
      ldmatrix_x4(b_tile + lo.rows8 + tile_offset<kDim>(j * 16, kk * 16), b0, b1, b2, b3);
      mma_16816(acc[2 * j], a, b0, b1);
      mma_16816(acc[2 * j + 1], a, b2, b3);
    }
  }
}

// A 16 x (8 kNT) product's f32 accumulator fragments as bf16 A fragments of kNT/2 16-column k-chunks: the
// accumulator layout of n-tiles 2c and 2c+1 is the A layout of k-chunk c.
template <int kNT = 8>
__device__ __forceinline__ void pack_fragments(uint32_t (&a)[kNT / 2][4], const float (&p)[kNT][4]) {
#pragma unroll
  for (int c = 0; c < kNT / 2; ++c) {
    a[c][0] = pack_bf16(p[2 * c][0], p[2 * c][1]);
    a[c][1] = pack_bf16(p[2 * c][2], p[2 * c][3]);
    a[c][2] = pack_bf16(p[2 * c + 1][0], p[2 * c + 1][1]);
    a[c][3] = pack_bf16(p[2 * c + 1][2], p[2 * c + 1][3]);
  }
}
// Element e of n-tile nt of the accumulator layout, back from packed A fragments (the inverse of the above).
__device__ __forceinline__ float unpack_fragment(const uint32_t (&a)[4][4], int nt, int e) {
  const uint32_t word = a[nt / 2][(nt & 1) * 2 + (e >> 1)];
  return __uint_as_float((e & 1) ? (word & 0xffff0000u) : (word << 16));
}

// acc[16 x Dh] += P[16 x 64] B[64 x Dh], B the tile at b_tile as stored, P as packed A fragments or as f32
// accumulator fragments (rounded to bf16 here).
template <int kDim>
__device__ __forceinline__ void tile_accumulate(float (&acc)[kDim / 8][4], const uint32_t (&a)[4][4], uint32_t b_tile,
                                                const LaneOffsets<kDim>& lo) {
#pragma unroll
  for (int c = 0; c < 4; ++c) {
#pragma unroll
    for (int j = 0; j < kDim / 16; ++j) {
      uint32_t b0, b1, b2, b3;
      ldmatrix_x4_trans(b_tile + lo.rows16 + tile_offset<kDim>(c * 16, j * 16), b0, b1, b2, b3);
      mma_16816(acc[2 * j], a[c], b0, b1);
      mma_16816(acc[2 * j + 1], a[c], b2, b3);
    }
  }
}
template <int kDim>
__device__ __forceinline__ void tile_accumulate(float (&acc)[kDim / 8][4], const float (&p)[8][4], uint32_t b_tile,
                                                const LaneOffsets<kDim>& lo) {
  uint32_t a[4][4];
  pack_fragments(a, p);
  tile_accumulate<kDim>(acc, a, b_tile, lo);
}

// Writes 16 rows x Dh of accumulators (times `mul`) into a [.., Dh] head with row stride `stride`; rows at or
// past `seq` are skipped; `accumulate` adds to what is there.
template <int kDim>
__device__ __forceinline__ void store_rows(bf16_t* head, int64_t stride, int row_a, int seq,
                                           const float (&acc)[kDim / 8][4], float mul0, float mul1, bool accumulate,
                                           int lane) {
  const int c = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_a + 8 * r;
    if (row >= seq) continue;
    const float mul = r == 0 ? mul0 : mul1;
    bf16_t* dst = head + row * stride + 2 * c;
#pragma unroll
    for (int dt = 0; dt < kDim / 8; ++dt) {
      float x0 = acc[dt][2 * r] * mul, x1 = acc[dt][2 * r + 1] * mul;
      __nv_bfloat162* d2 = reinterpret_cast<__nv_bfloat162*>(dst + dt * 8);
      if (accumulate) {
        const float2 old = __bfloat1622float2(*d2);
        x0 += old.x;
        x1 += old.y;
      }
      *d2 = __floats2bfloat162_rn(x0, x1);
    }
  }
}

// ---- fast path: forward ------------------------------------------------------------------------------------
//
// 128 query rows per block, 4 warps of 32 rows: two 16-row MMA tiles per warp, so each K and V fragment read
// from shared memory feeds two MMAs and each K/V tile brought from L2 serves 128 rows. (The first version, 64 rows
// per block and 16 per warp with Q in registers, was L2- and ldmatrix-bound: 230 against 284 TFLOP/s at the
// target shape.) Key tiles of kBlockN rows, double-buffered; Q stays in shared memory and its fragments are
// reloaded per tile, because registers go to the two output accumulators. Grid (B*H, ceil(T/128)), longest
// blocks first.
template <int kDim, int kBlockN, int kMinBlocks>
__global__ void __launch_bounds__(Tile<kDim>::kThreads, kMinBlocks) flash_forward_kernel(ForwardParams p) {
  using C = Tile<kDim>;
  static_assert(kBlockN == 32 || kBlockN == 64, "key tiles of 32 or 64 rows");
  constexpr int kBlockM = 2 * C::kRows;  // 128 query rows
  constexpr int kNT = kBlockN / 8;       // 8-key MMA tiles per key tile
  constexpr int kKvElems = kBlockN * C::kStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16_t* s_q = reinterpret_cast<bf16_t*>(smem_raw);  // [128][kStride]
  bf16_t* s_k = s_q + 2 * C::kElems;                  // [2][kBlockN][kStride]
  bf16_t* s_v = s_k + 2 * kKvElems;                   // [2][kBlockN][kStride]

  const int bh = static_cast<int>(blockIdx.x);
  const int b = bh / p.heads, h = bh % p.heads;
  const int m_block = static_cast<int>(gridDim.y - 1 - blockIdx.y);
  const int q0 = m_block * kBlockM;
  const int n_tiles = (min(p.seq, q0 + kBlockM) + kBlockN - 1) / kBlockN;  // key tiles up to the block's last row
  const int64_t stride = static_cast<int64_t>(p.heads) * kDim;
  const int64_t base = head_offset(b, h, p.seq, p.heads, kDim);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int quad = lane & 3;
  const int warp_row0 = q0 + warp * 32;    // the warp's rows: warp_row0 .. warp_row0 + 31
  const int row_a = warp_row0 + lane / 4;  // row of elements 0, 1 of MMA tile i is row_a + 16 i; +8 for 2, 3
  const LaneOffsets<kDim> lo(lane);
  const uint32_t q_rows = smem_addr(s_q) + tile_offset<kDim>(warp * 32, 0);
  // |scale| with the sign folded into q below, so the softmax works with a positive multiplier; at least FLT_MIN
  // so that masked scores (-inf) stay -inf when scale is 0.
  const float scale_log2 = fmaxf(fabsf(p.scale) * kLog2e, FLT_MIN);

  load_tile<kDim, kBlockM>(s_q, p.q + base, q0, p.seq, stride);
  load_tile<kDim, kBlockN>(s_k, p.k + base, 0, p.seq, stride);
  load_tile<kDim, kBlockN>(s_v, p.v + base, 0, p.seq, stride);
  cp_async_commit();
  if (p.scale < 0.0f) {  // flip the sign bits of q in shared memory once (exact); visible after the loop's barrier
    cp_async_wait<0>();
    __syncthreads();
    for (int i = static_cast<int>(threadIdx.x); i < kBlockM * kDim / 2; i += C::kThreads) {
      uint32_t* word = reinterpret_cast<uint32_t*>(s_q + (i / (kDim / 2)) * C::kStride) + i % (kDim / 2);
      *word ^= 0x80008000u;
    }
  }

  float o[2][kDim / 8][4];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int dt = 0; dt < kDim / 8; ++dt) o[i][dt][0] = o[i][dt][1] = o[i][dt][2] = o[i][dt][3] = 0.0f;
  }
  float m_run[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};  // [tile][row half], log2 domain
  float l_run[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};                      // this thread's part of the sums

  for (int n = 0; n < n_tiles; ++n) {
    if (n + 1 < n_tiles) {
      const int nb = (n + 1) & 1;
      load_tile<kDim, kBlockN>(s_k + nb * kKvElems, p.k + base, (n + 1) * kBlockN, p.seq, stride);
      load_tile<kDim, kBlockN>(s_v + nb * kKvElems, p.v + base, (n + 1) * kBlockN, p.seq, stride);
    }
    cp_async_commit();  // possibly empty: keeps the group count uniform for wait<1>
    cp_async_wait<1>();
    __syncthreads();
    const uint32_t t_k = smem_addr(s_k) + (n & 1) * kKvElems * 2;
    const uint32_t t_v = smem_addr(s_v) + (n & 1) * kKvElems * 2;
    const int key_first = n * kBlockN;

    // Warp rows and tile keys start at multiples of 32: a warp either has no row at or after the tile's
    // first key (nothing to do) or every row has at least that key.
    if (warp_row0 + 31 >= key_first) {
      float s[2][kNT][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) s[i][nt][0] = s[i][nt][1] = s[i][nt][2] = s[i][nt][3] = 0.0f;
      }
#pragma unroll
      for (int kk = 0; kk < kDim / 16; ++kk) {
        uint32_t a0[4], a1[4];
        ldmatrix_x4(q_rows + lo.rows16 + tile_offset<kDim>(0, kk * 16), a0[0], a0[1], a0[2], a0[3]);
        ldmatrix_x4(q_rows + lo.rows16 + tile_offset<kDim>(16, kk * 16), a1[0], a1[1], a1[2], a1[3]);
#pragma unroll
        for (int j = 0; j < kNT / 2; ++j) {
          uint32_t b0, b1, b2, b3;
          ldmatrix_x4(t_k + lo.rows8 + tile_offset<kDim>(j * 16, kk * 16), b0, b1, b2, b3);
          mma_16816(s[0][2 * j], a0, b0, b1);
          mma_16816(s[0][2 * j + 1], a0, b2, b3);
          mma_16816(s[1][2 * j], a1, b0, b1);
          mma_16816(s[1][2 * j + 1], a1, b2, b3);
        }
      }

      if (key_first + kBlockN - 1 > warp_row0) {  // some key of the tile comes after some row of the warp
        const int key0 = key_first + 2 * quad;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if (key0 + nt * 8 + (e & 1) > row_a + 16 * i + (e >> 1) * 8) s[i][nt][e] = -INFINITY;
          }
        }
      }
      // Online softmax on raw scores: scale_log2 > 0, so max(s) * scale_log2 is the max of the scaled scores,
      // and each probability is one FFMA and one ex2.
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[i][nt][2 * r], s[i][nt][2 * r + 1]));
          const float m_new = fmaxf(m_run[i][r], quad_max(mx) * scale_log2);
          const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with no key yet stays all-zero
          const float corr = fast_exp2(m_run[i][r] - m_use);
          m_run[i][r] = m_new;
          float sum = 0.0f;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
            s[i][nt][2 * r] = fast_exp2(fmaf(s[i][nt][2 * r], scale_log2, -m_use));
            s[i][nt][2 * r + 1] = fast_exp2(fmaf(s[i][nt][2 * r + 1], scale_log2, -m_use));
            sum += s[i][nt][2 * r] + s[i][nt][2 * r + 1];
          }
          l_run[i][r] = l_run[i][r] * corr + sum;
#pragma unroll
          for (int dt = 0; dt < kDim / 8; ++dt) {
            o[i][dt][2 * r] *= corr;
            o[i][dt][2 * r + 1] *= corr;
          }
        }
      }

      uint32_t pa[2][kNT / 2][4];
      pack_fragments<kNT>(pa[0], s[0]);
      pack_fragments<kNT>(pa[1], s[1]);
#pragma unroll
      for (int c = 0; c < kNT / 2; ++c) {
#pragma unroll
        for (int j = 0; j < kDim / 16; ++j) {
          uint32_t b0, b1, b2, b3;
          ldmatrix_x4_trans(t_v + lo.rows16 + tile_offset<kDim>(c * 16, j * 16), b0, b1, b2, b3);
          mma_16816(o[0][2 * j], pa[0][c], b0, b1);
          mma_16816(o[0][2 * j + 1], pa[0][c], b2, b3);
          mma_16816(o[1][2 * j], pa[1][c], b0, b1);
          mma_16816(o[1][2 * j + 1], pa[1][c], b2, b3);
        }
      }
    }
    __syncthreads();  // every warp is done with buffer n&1 before iteration n+1 prefetches into it
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(l_run[i][r]);
      inv[r] = l > 0.0f ? 1.0f / l : 0.0f;
      const int row = row_a + 16 * i + 8 * r;
      if (quad == 0 && row < p.seq)
        p.lse[(static_cast<int64_t>(b) * p.heads + h) * p.seq + row] = m_run[i][r] * kLn2 + logf(l);
    }
    store_rows<kDim>(p.out + base, stride, row_a + 16 * i, p.seq, o[i], inv[0], inv[1], false, lane);
  }
}

// ---- fast path: backward -----------------------------------------------------------------------------------

// Per-row statistics of 64 query rows into shared memory: lse in the log2 domain (+inf past T, so that p = 0
// there) and delta (0 past T). Plain loads and stores, made visible by the next __syncthreads.
__device__ __forceinline__ void load_row_stats(float* s_lse, float* s_delta, const float* lse, const float* delta,
                                               int row0, int seq, int threads) {
  for (int i = static_cast<int>(threadIdx.x); i < 64; i += threads) {
    const int row = row0 + i;
    s_lse[i] = row < seq ? lse[row] * kLog2e : INFINITY;
    s_delta[i] = row < seq ? delta[row] : 0.0f;
  }
}

// dk, dv of 64 keys. Grid (B*H, ceil(T/64)); key block y sees query tiles y .. end, so block 0 (the longest)
// starts first. Each warp owns 16 keys and works on the transposed products:
//   S^T = K Q^T, P^T = exp2(S^T scale log2e - lse2[q]), dV += P^T dO, dP^T = V dO^T,
//   dS^T = P^T (dP^T - delta[q]), dK += dS^T Q; finally dK *= scale.
// Shared memory: K, V of the block; Q, dO tiles and their row statistics, two buffers each.
template <int kDim>
__global__ void __launch_bounds__(Tile<kDim>::kThreads) flash_backward_dkdv_kernel(BackwardParams p) {
  using C = Tile<kDim>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16_t* s_k = reinterpret_cast<bf16_t*>(smem_raw);              // [64][kStride]
  bf16_t* s_v = s_k + C::kElems;                                  // [64][kStride]
  bf16_t* s_q = s_v + C::kElems;                                  // [2][64][kStride]
  bf16_t* s_do = s_q + 2 * C::kElems;                             // [2][64][kStride]
  float* s_lse = reinterpret_cast<float*>(s_do + 2 * C::kElems);  // [2][64]
  float* s_delta = s_lse + 2 * C::kRows;                          // [2][64]

  const int bh = static_cast<int>(blockIdx.x);
  const int b = bh / p.heads, h = bh % p.heads;
  const int n_block = static_cast<int>(blockIdx.y);
  const int k0 = n_block * C::kRows;
  const int m_tiles = (p.seq + C::kRows - 1) / C::kRows;
  const int64_t stride = static_cast<int64_t>(p.heads) * kDim;
  const int64_t base = head_offset(b, h, p.seq, p.heads, kDim);
  const int64_t stat_base = (static_cast<int64_t>(b) * p.heads + h) * p.seq;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int key_a = k0 + warp * 16 + lane / 4;  // key of accumulator elements 0, 1; +8 for 2, 3
  const int quad = lane & 3;
  const float scale_log2 = p.scale * kLog2e;
  const LaneOffsets<kDim> lo(lane);
  const uint32_t k_rows = smem_addr(s_k) + tile_offset<kDim>(warp * 16, 0);  // this warp's 16 keys
  const uint32_t v_rows = smem_addr(s_v) + tile_offset<kDim>(warp * 16, 0);

  load_tile<kDim>(s_k, p.k + base, k0, p.seq, stride);
  load_tile<kDim>(s_v, p.v + base, k0, p.seq, stride);
  load_tile<kDim>(s_q, p.q + base, k0, p.seq, stride);
  load_tile<kDim>(s_do, p.dout + base, k0, p.seq, stride);
  load_row_stats(s_lse, s_delta, p.lse + stat_base, p.delta + stat_base, k0, p.seq, C::kThreads);
  cp_async_commit();

  float dk[kDim / 8][4], dv[kDim / 8][4];
#pragma unroll
  for (int dt = 0; dt < kDim / 8; ++dt) {
    dk[dt][0] = dk[dt][1] = dk[dt][2] = dk[dt][3] = 0.0f;
    dv[dt][0] = dv[dt][1] = dv[dt][2] = dv[dt][3] = 0.0f;
  }

  for (int m = n_block; m < m_tiles; ++m) {
    const int buf = (m - n_block) & 1;
    if (m + 1 < m_tiles) {
      const int nb = buf ^ 1;
      load_tile<kDim>(s_q + nb * C::kElems, p.q + base, (m + 1) * C::kRows, p.seq, stride);
      load_tile<kDim>(s_do + nb * C::kElems, p.dout + base, (m + 1) * C::kRows, p.seq, stride);
      load_row_stats(s_lse + nb * C::kRows, s_delta + nb * C::kRows, p.lse + stat_base, p.delta + stat_base,
                     (m + 1) * C::kRows, p.seq, C::kThreads);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint32_t t_q = smem_addr(s_q) + buf * C::kBytes;
    const uint32_t t_do = smem_addr(s_do) + buf * C::kBytes;
    const float* t_lse = s_lse + buf * C::kRows;
    const float* t_delta = s_delta + buf * C::kRows;

    float pt[8][4];  // S^T, then P^T
    tile_scores<kDim>(pt, k_rows, t_q, lo);
    const bool diagonal = m == n_block;
    const int q_base = m * C::kRows + 2 * quad;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const float2 lse2 = *reinterpret_cast<const float2*>(t_lse + nt * 8 + 2 * quad);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = fast_exp2(pt[nt][e] * scale_log2 - ((e & 1) ? lse2.y : lse2.x));
        if (diagonal && q_base + nt * 8 + (e & 1) < key_a + (e >> 1) * 8) x = 0.0f;
        pt[nt][e] = x;
      }
    }
    // P^T lives on in bf16 only (the precision the dV product uses anyway): 16 registers instead of 32 while
    // dP^T is computed.
    uint32_t pf[4][4];
    pack_fragments(pf, pt);
    tile_accumulate<kDim>(dv, pf, t_do, lo);

    float dst[8][4];  // dP^T, then dS^T
    tile_scores<kDim>(dst, v_rows, t_do, lo);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const float2 d2 = *reinterpret_cast<const float2*>(t_delta + nt * 8 + 2 * quad);
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[nt][e] = unpack_fragment(pf, nt, e) * (dst[nt][e] - ((e & 1) ? d2.y : d2.x));
    }
    tile_accumulate<kDim>(dk, dst, t_q, lo);
    __syncthreads();
  }

  store_rows<kDim>(p.dk + base, stride, key_a, p.seq, dk, p.scale, p.scale, p.accumulate, lane);
  store_rows<kDim>(p.dv + base, stride, key_a, p.seq, dv, 1.0f, 1.0f, p.accumulate, lane);
}

// dq of 64 query rows. Grid (B*H, ceil(T/64)); block y counts down so the longest blocks start first. Each warp
// owns 16 rows: S = Q K^T, P = exp2(S scale log2e - lse2), dP = dO V^T, dS = P (dP - delta), dQ += dS K;
// finally dQ *= scale. Q and dO stay in shared memory (their fragments are reloaded per key tile: registers
// go to the accumulators); K and V tiles are double-buffered.
template <int kDim>
__global__ void __launch_bounds__(Tile<kDim>::kThreads) flash_backward_dq_kernel(BackwardParams p) {
  using C = Tile<kDim>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16_t* s_q = reinterpret_cast<bf16_t*>(smem_raw);  // [64][kStride]
  bf16_t* s_do = s_q + C::kElems;                     // [64][kStride]
  bf16_t* s_k = s_do + C::kElems;                     // [2][64][kStride]
  bf16_t* s_v = s_k + 2 * C::kElems;                  // [2][64][kStride]

  const int bh = static_cast<int>(blockIdx.x);
  const int b = bh / p.heads, h = bh % p.heads;
  const int m_block = static_cast<int>(gridDim.y - 1 - blockIdx.y);
  const int q0 = m_block * C::kRows;
  const int64_t stride = static_cast<int64_t>(p.heads) * kDim;
  const int64_t base = head_offset(b, h, p.seq, p.heads, kDim);
  const int64_t stat_base = (static_cast<int64_t>(b) * p.heads + h) * p.seq;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int row_a = q0 + warp * 16 + lane / 4;
  const int quad = lane & 3;
  const float scale_log2 = p.scale * kLog2e;
  const int n_tiles = m_block + 1;
  const LaneOffsets<kDim> lo(lane);
  const uint32_t q_rows = smem_addr(s_q) + tile_offset<kDim>(warp * 16, 0);  // this warp's 16 rows
  const uint32_t do_rows = smem_addr(s_do) + tile_offset<kDim>(warp * 16, 0);

  load_tile<kDim>(s_q, p.q + base, q0, p.seq, stride);
  load_tile<kDim>(s_do, p.dout + base, q0, p.seq, stride);
  load_tile<kDim>(s_k, p.k + base, 0, p.seq, stride);
  load_tile<kDim>(s_v, p.v + base, 0, p.seq, stride);
  cp_async_commit();

  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_a + 8 * r;
    lse2[r] = row < p.seq ? p.lse[stat_base + row] * kLog2e : INFINITY;
    delta[r] = row < p.seq ? p.delta[stat_base + row] : 0.0f;
  }
  float dq[kDim / 8][4];
#pragma unroll
  for (int dt = 0; dt < kDim / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.0f;

  for (int n = 0; n < n_tiles; ++n) {
    if (n + 1 < n_tiles) {
      const int nb = (n + 1) & 1;
      load_tile<kDim>(s_k + nb * C::kElems, p.k + base, (n + 1) * C::kRows, p.seq, stride);
      load_tile<kDim>(s_v + nb * C::kElems, p.v + base, (n + 1) * C::kRows, p.seq, stride);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint32_t t_k = smem_addr(s_k) + (n & 1) * C::kBytes;
    const uint32_t t_v = smem_addr(s_v) + (n & 1) * C::kBytes;

    float ps[8][4];  // S, then P, then dS
    tile_scores<kDim>(ps, q_rows, t_k, lo);
    const bool diagonal = n == m_block;
    const int key0 = n * C::kRows + 2 * quad;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = fast_exp2(ps[nt][e] * scale_log2 - lse2[e >> 1]);
        if (diagonal && key0 + nt * 8 + (e & 1) > row_a + (e >> 1) * 8) x = 0.0f;
        ps[nt][e] = x;
      }
    }
    float dp[8][4];
    tile_scores<kDim>(dp, do_rows, t_v, lo);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) ps[nt][e] *= dp[nt][e] - delta[e >> 1];
    }
    tile_accumulate<kDim>(dq, ps, t_k, lo);
    __syncthreads();
  }
  store_rows<kDim>(p.dq + base, stride, row_a, p.seq, dq, p.scale, p.scale, p.accumulate, lane);
}

// ---- backward pre-pass -------------------------------------------------------------------------------------

// delta[b, h, t] = sum_d dout[b, t, h, d] * out[b, t, h, d]; one warp per (b, t, h) row, in memory order.
__global__ void attention_delta_kernel(float* delta, const bf16_t* dout, const bf16_t* out, int batch, int seq,
                                       int heads, int dim) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t rows = static_cast<int64_t>(batch) * seq * heads;
  if (row >= rows) return;
  const bf16_t* a = dout + row * dim;
  const bf16_t* o = out + row * dim;
  float sum = 0.0f;
  for (int d = lane; d < dim; d += 32) sum += __bfloat162float(a[d]) * __bfloat162float(o[d]);
  sum = warp_sum(sum);
  if (lane == 0) {
    const int64_t b = row / (static_cast<int64_t>(seq) * heads);
    const int64_t rem = row % (static_cast<int64_t>(seq) * heads);
    const int64_t t = rem / heads, h = rem % heads;
    delta[(b * heads + h) * seq + t] = sum;
  }
}

// ---- generic path: one warp per row ------------------------------------------------------------------------
//
// Lane j holds dimensions j, j+32, ... (kPer of them, kPer*32 >= Dh); dot products are warp sums. Rows are
// numbered (b*H + h)*T + t with t counting down inside a head, so the longest rows start first.

template <int kPer>
__device__ __forceinline__ void load_row(float (&x)[kPer], const bf16_t* row, int dim, int lane, float mul) {
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    x[i] = d < dim ? __bfloat162float(row[d]) * mul : 0.0f;
  }
}
template <int kPer>
__device__ __forceinline__ float row_dot(const float (&x)[kPer], const bf16_t* row, int dim, int lane) {
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    if (d < dim) s += x[i] * __bfloat162float(row[d]);
  }
  return warp_sum(s);
}
template <int kPer>
__device__ __forceinline__ void row_axpy(float (&acc)[kPer], float a, const bf16_t* row, int dim, int lane) {
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    if (d < dim) acc[i] += a * __bfloat162float(row[d]);
  }
}
template <int kPer>
__device__ __forceinline__ void store_row(bf16_t* row, const float (&acc)[kPer], float mul, bool accumulate, int dim,
                                          int lane) {
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    if (d < dim) {
      float x = acc[i] * mul;
      if (accumulate) x += __bfloat162float(row[d]);
      row[d] = __float2bfloat16_rn(x);
    }
  }
}

struct GenericRow {
  int b, h, t;
  int64_t base;  // element offset of token 0 of the head
  int64_t stat;  // offset of the head's [T] statistics
};
__device__ __forceinline__ bool generic_row(GenericRow& r, int batch, int seq, int heads, int dim) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= static_cast<int64_t>(batch) * heads * seq) return false;
  const int64_t bh = row / seq;
  r.t = seq - 1 - static_cast<int>(row % seq);
  r.b = static_cast<int>(bh / heads);
  r.h = static_cast<int>(bh % heads);
  r.base = head_offset(r.b, r.h, seq, heads, dim);
  r.stat = bh * seq;
  return true;
}

template <int kPer>
__global__ void generic_forward_kernel(ForwardParams p) {
  GenericRow r;
  if (!generic_row(r, p.batch, p.seq, p.heads, p.dim)) return;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t stride = static_cast<int64_t>(p.heads) * p.dim;
  float q[kPer], acc[kPer];
  load_row<kPer>(q, p.q + r.base + r.t * stride, p.dim, lane, p.scale * kLog2e);
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int u = 0; u <= r.t; ++u) {
    const float s = row_dot<kPer>(q, p.k + r.base + u * stride, p.dim, lane);
    const float m_new = fmaxf(m, s);
    const float corr = exp2f(m - m_new), e = exp2f(s - m_new);
    l = l * corr + e;
#pragma unroll
    for (int i = 0; i < kPer; ++i) acc[i] *= corr;
    row_axpy<kPer>(acc, e, p.v + r.base + u * stride, p.dim, lane);
    m = m_new;
  }
  store_row<kPer>(p.out + r.base + r.t * stride, acc, 1.0f / l, false, p.dim, lane);
  if (lane == 0) p.lse[r.stat + r.t] = m * kLn2 + logf(l);
}

// dq of one query row t: sum over keys u <= t.
template <int kPer>
__global__ void generic_backward_dq_kernel(BackwardParams p) {
  GenericRow r;
  if (!generic_row(r, p.batch, p.seq, p.heads, p.dim)) return;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t stride = static_cast<int64_t>(p.heads) * p.dim;
  float q[kPer], g[kPer], acc[kPer];
  load_row<kPer>(q, p.q + r.base + r.t * stride, p.dim, lane, p.scale * kLog2e);
  load_row<kPer>(g, p.dout + r.base + r.t * stride, p.dim, lane, 1.0f);
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.0f;
  const float lse2 = p.lse[r.stat + r.t] * kLog2e, delta = p.delta[r.stat + r.t];
  for (int u = 0; u <= r.t; ++u) {
    const float pr = exp2f(row_dot<kPer>(q, p.k + r.base + u * stride, p.dim, lane) - lse2);
    const float dp = row_dot<kPer>(g, p.v + r.base + u * stride, p.dim, lane);
    row_axpy<kPer>(acc, pr * (dp - delta), p.k + r.base + u * stride, p.dim, lane);
  }
  store_row<kPer>(p.dq + r.base + r.t * stride, acc, p.scale, p.accumulate, p.dim, lane);
}

// dk and dv of one key row u (the generic row index t plays u here): sum over queries t >= u.
template <int kPer>
__global__ void generic_backward_dkdv_kernel(BackwardParams p) {
  GenericRow r;
  if (!generic_row(r, p.batch, p.seq, p.heads, p.dim)) return;
  const int u = p.seq - 1 - r.t;  // rows with small u (many queries) start first
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t stride = static_cast<int64_t>(p.heads) * p.dim;
  float k[kPer], v[kPer], dk[kPer], dv[kPer];
  load_row<kPer>(k, p.k + r.base + u * stride, p.dim, lane, p.scale * kLog2e);
  load_row<kPer>(v, p.v + r.base + u * stride, p.dim, lane, 1.0f);
#pragma unroll
  for (int i = 0; i < kPer; ++i) dk[i] = dv[i] = 0.0f;
  for (int t = u; t < p.seq; ++t) {
    const float pr = exp2f(row_dot<kPer>(k, p.q + r.base + t * stride, p.dim, lane) - p.lse[r.stat + t] * kLog2e);
    const float dp = row_dot<kPer>(v, p.dout + r.base + t * stride, p.dim, lane);
    row_axpy<kPer>(dv, pr, p.dout + r.base + t * stride, p.dim, lane);
    row_axpy<kPer>(dk, pr * (dp - p.delta[r.stat + t]), p.q + r.base + t * stride, p.dim, lane);
  }
  store_row<kPer>(p.dk + r.base + u * stride, dk, p.scale, p.accumulate, p.dim, lane);
  store_row<kPer>(p.dv + r.base + u * stride, dv, 1.0f, p.accumulate, p.dim, lane);
}

// ---- launchers ---------------------------------------------------------------------------------------------

inline bool fast_path_applies(int dim, std::initializer_list<const void*> ptrs) {
  if (dim != 32 && dim != 64 && dim != 128) return false;
  for (const void* ptr : ptrs)
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  return true;
}

constexpr int kGenericWarps = 4;

inline unsigned generic_blocks(const ForwardParams& p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seq;
  return static_cast<unsigned>((rows + kGenericWarps - 1) / kGenericWarps);
}

// Lanes' share of a row in the generic kernels: the smallest kPer in {1, 2, 4, 8} with 32*kPer >= dim.
inline int generic_per_lane(int dim) {
  return dim <= 32 ? 1 : dim <= 64 ? 2 : dim <= 128 ? 4 : 8;
}

template <int kPer>
void launch_generic_forward(const ForwardParams& p, cudaStream_t stream) {
  generic_forward_kernel<kPer><<<generic_blocks(p), 32 * kGenericWarps, 0, stream>>>(p);
  LOOM_CUDA_CHECK_LAUNCH("generic_forward_kernel");
}

template <int kPer>
void launch_generic_backward(const BackwardParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seq;
  const unsigned blocks = static_cast<unsigned>((rows + kGenericWarps - 1) / kGenericWarps);
  generic_backward_dq_kernel<kPer><<<blocks, 32 * kGenericWarps, 0, stream>>>(p);
  LOOM_CUDA_CHECK_LAUNCH("generic_backward_dq_kernel");
  generic_backward_dkdv_kernel<kPer><<<blocks, 32 * kGenericWarps, 0, stream>>>(p);
  LOOM_CUDA_CHECK_LAUNCH("generic_backward_dkdv_kernel");
}

template <class Kernel>
void prepare_fast_kernel(Kernel kernel, size_t smem_bytes) {
  LOOM_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
  LOOM_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
}

// Forward configuration per head size, chosen by bench/attention_bench.cu on an H100 (fwd:* rows): blocks per SM
// (__launch_bounds__ caps registers at 64K / (128 * blocks)) and keys per tile. At Dh 128, 64-key tiles need more
// than 255 registers (100 bytes of spills, 268 TFLOP/s); 32-key tiles fit (245, 284 TFLOP/s). At Dh 64, 64-key
// tiles win (271 against 235-268).
template <int kDim>
constexpr int kForwardMinBlocks = 2;
template <int kDim>
constexpr int kForwardBlockN = kDim == 128 ? 32 : 64;

template <int kDim, int kBlockN = kForwardBlockN<kDim>, int kMinBlocks = kForwardMinBlocks<kDim>>
void launch_forward_fast(const ForwardParams& p, cudaStream_t stream) {
  using C = Tile<kDim>;
  const size_t smem = (2 * C::kRows + 4 * kBlockN) * static_cast<size_t>(C::kStride) * 2;
  prepare_fast_kernel(flash_forward_kernel<kDim, kBlockN, kMinBlocks>, smem);
  const dim3 grid(static_cast<unsigned>(p.batch * p.heads),
                  static_cast<unsigned>((p.seq + 2 * C::kRows - 1) / (2 * C::kRows)));
  flash_forward_kernel<kDim, kBlockN, kMinBlocks><<<grid, C::kThreads, smem, stream>>>(p);
  LOOM_CUDA_CHECK_LAUNCH("flash_forward_kernel");
}

template <int kDim>
void launch_backward_fast(const BackwardParams& p, cudaStream_t stream) {
  using C = Tile<kDim>;
  const dim3 grid(static_cast<unsigned>(p.batch * p.heads), static_cast<unsigned>((p.seq + C::kRows - 1) / C::kRows));
  const size_t smem_dkdv = 6 * static_cast<size_t>(C::kBytes) + 4 * C::kRows * sizeof(float);
  prepare_fast_kernel(flash_backward_dkdv_kernel<kDim>, smem_dkdv);
  flash_backward_dkdv_kernel<kDim><<<grid, C::kThreads, smem_dkdv, stream>>>(p);
  LOOM_CUDA_CHECK_LAUNCH("flash_backward_dkdv_kernel");
  const size_t smem_dq = 6 * static_cast<size_t>(C::kBytes);
  prepare_fast_kernel(flash_backward_dq_kernel<kDim>, smem_dq);
  flash_backward_dq_kernel<kDim><<<grid, C::kThreads, smem_dq, stream>>>(p);
  LOOM_CUDA_CHECK_LAUNCH("flash_backward_dq_kernel");
}

// Shapes are checked by the caller: 1 <= dim <= kMaxGenericDim, batch*heads < 2^31, ceil(seq/64) <= 65535.
inline void launch_forward(const ForwardParams& p, Path path, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.seq == 0) return;
  if (path == Path::kAuto && fast_path_applies(p.dim, {p.q, p.k, p.v, p.out})) {
    if (p.dim == 32) launch_forward_fast<32>(p, stream);
    if (p.dim == 64) launch_forward_fast<64>(p, stream);
    if (p.dim == 128) launch_forward_fast<128>(p, stream);
    return;
  }
  switch (generic_per_lane(p.dim)) {
    case 1: launch_generic_forward<1>(p, stream); break;
    case 2: launch_generic_forward<2>(p, stream); break;
    case 4: launch_generic_forward<4>(p, stream); break;
    default: launch_generic_forward<8>(p, stream); break;
  }
}

// p.delta must hold batch*heads*seq floats.
inline void launch_backward(const BackwardParams& p, Path path, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.seq == 0) return;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.seq * p.heads;
  constexpr int kDeltaWarps = 8;
  attention_delta_kernel<<<static_cast<unsigned>((rows + kDeltaWarps - 1) / kDeltaWarps), 32 * kDeltaWarps, 0,
                           stream>>>(p.delta, p.dout, p.out, p.batch, p.seq, p.heads, p.dim);
  LOOM_CUDA_CHECK_LAUNCH("attention_delta_kernel");
  if (path == Path::kAuto && fast_path_applies(p.dim, {p.q, p.k, p.v, p.dout, p.dq, p.dk, p.dv})) {
    if (p.dim == 32) launch_backward_fast<32>(p, stream);
    if (p.dim == 64) launch_backward_fast<64>(p, stream);
    if (p.dim == 128) launch_backward_fast<128>(p, stream);
    return;
  }
  switch (generic_per_lane(p.dim)) {
    case 1: launch_generic_backward<1>(p, stream); break;
    case 2: launch_generic_backward<2>(p, stream); break;
    case 4: launch_generic_backward<4>(p, stream); break;
    default: launch_generic_backward<8>(p, stream); break;
  }
}

}  // namespace loom::cuda::attention
