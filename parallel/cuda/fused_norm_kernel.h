// The one-kernel fused all-reduce + residual add + RMSNorm of the TP hot path (docs/fused_norm.md), over
// symmetric buffers that every rank of the group can read and write (CUDA IPC mappings of the peers' buffers
// on NVLink; in the tests, buffers of one GPU shared by "virtual ranks" on separate streams). No NVLink
// multicast: every remote access is an ordinary load or store through a peer pointer.
//
//   two-shot  each rank copies its partial rows into its own input buffer (epoch & 1); barrier; rank r reduces the rows of
//             its token slice from every peer in the fixed rank order 0..W-1 (so every rank gets bit-identical
//             results), adds the residual and writes the new residual rows into every peer's output buffer;
//             barrier; each rank copies the residual rows out and RMSNorms them locally (the normalised rows are
//             not sent: half the writes over NVLink), with one-shot's arithmetic, so the bits are one-shot's.
//   one-shot  each rank copies its partial into input buffer (epoch & 1); barrier; every rank reduces every
//             row from all peers in the same fixed order (the same arithmetic everywhere: bit-identical).
//             Double-buffered inputs make one barrier enough: a rank can only overwrite buffer (epoch & 1) two
//             calls later, after every peer passed the barrier of the call in between (which it reaches only
//             once its previous kernel, the reads included, is complete). Both algorithms follow the same
//             parity rule, so calls may alternate between them.
//
// Synchronisation: flags are 32-bit epochs (a per-group call counter kept by the caller, never reset from the
// host; compared wrap-safely). Block b of rank r only ever waits for block b of its peers (rows are dealt to
// blocks by row % blocks on every rank). Signal: the block's stores, __syncthreads, then one thread issues a
// fence.acq_rel at system scope and stores the epoch (relaxed, system scope) into every peer's flag slot — the
// PTX release pattern; wait: one thread loads with acquire semantics at system scope, then __syncthreads. Every
// spin is bounded by the abort word (host memory the launcher can set) and a deadline on the global timer; a
// failed wait records (kind, peer) in the error word (and, when the group has one, a mapped host word) and the
// kernel returns, so a dead or hung peer gives an error, not a hang.
//
// Epochs: a launch argument (the caller's call counter), or, when the group has a device epoch counter, read
// from it by every block at the start (last epoch + 1) and stored back by the last block to finish. Nothing is
// allocated or synchronised inside the launches, so with the counter they can be captured in a CUDA graph and
// replayed any number of times, interleaved with eager calls (an epoch frozen into a graph would repeat).
//
// Backward (launch_fused_rmsnorm_backward): the mirror image, on the same buffers, flags and epochs (forward and
// backward calls may follow each other in any order). The partial gradients of the normalised rows are summed
// in rank order (what an all-reduce gives), pushed through the RMSNorm backward and added to the residual
// stream's gradient; two-shot reduces the summed gradient of a token slice per rank and writes it to every peer,
// then every rank works the RMSNorm backward of every row locally; one-shot reduces every row on every rank.
// The weight's gradient is summed per row group (rows worked a row per group of threads, as in the forward) in
// shared memory, over the groups of a block, then over blocks by a second small kernel: the same order in both
// algorithms, so dx and dw are bit-identical across algorithms and ranks.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace loom::cuda {

constexpr int kFusedMaxRanks = 8;
constexpr int kFusedMaxBlocks = 32;
// Flag words per rank: [2 barriers][kFusedMaxRanks senders][kFusedMaxBlocks blocks].
constexpr int64_t kFusedFlagWords = 2 * kFusedMaxRanks * kFusedMaxBlocks;

// Error word values: 0 = fine; otherwise (kind << 8) | peer.
enum FusedError : uint32_t { kFusedDeadline = 1, kFusedAborted = 2 };

// One rank's view of the group's symmetric memory.
struct FusedNormGroup {
  int ranks = 0, rank = 0;
  // Rank p's staging buffer and flag words, as this rank addresses them.
  void* stage[kFusedMaxRanks] = {};
  uint32_t* flags[kFusedMaxRanks] = {};
  int64_t stage_bytes = 0;            // of each staging buffer
  const volatile uint32_t* abort = nullptr;  // mapped host word: non-zero stops every wait
  uint32_t* error = nullptr;          // this rank's device error word (first failure wins)
  // Optional: a mapped host word the first failure is also written to, so the host sees it without a copy per
  // call (IpcFusedNorm::check).
  uint32_t* error_host = nullptr;
  // Optional: 2 device words of this rank, zeroed with the flags ([last epoch, blocks finished]); when set, the
  // kernels take their epoch from it and ignore the argument (CUDA-graph replays).
  uint32_t* epoch_counter = nullptr;
};

enum class FusedAlgo { kOneShot, kTwoShot };

struct FusedNormArgs {
  // All-reduce alone (no residual, weight, normed or rstd): residual_out = bf16(sum of the partials in rank
  // order). The benchmark's measure of what the norm costs inside the kernel.
  bool allreduce_only = false;
  const void* partial = nullptr;   // bf16 [rows, d], this rank's partial sums
  const void* residual = nullptr;  // bf16 [rows, d], identical on every rank
  const void* weight = nullptr;    // bf16 [d]
  void* residual_out = nullptr;    // bf16 [rows, d]
  void* normed = nullptr;          // bf16 [rows, d]
  float* rstd = nullptr;           // optional f32 [rows]: 1 / sqrt(mean(residual_out^2) + eps), for the backward
  int64_t rows = 0, d = 0;
  float eps = 1e-5f;
  uint32_t epoch = 0;       // > every epoch used before on this group
  int blocks = 16;          // SMs it occupies (1..kFusedMaxBlocks)
  double timeout_s = 10.0;  // per wait
  FusedAlgo algo = FusedAlgo::kTwoShot;
};

// The backward: dx (+)= the RMSNorm backward of the summed dnormed; dw += the weight's gradient.
constexpr int64_t kFusedBackwardMaxD = 32768;  // a block's dw sums live in shared memory (128 KiB at most)

struct FusedNormBackwardArgs {
  const void* dnormed = nullptr;  // bf16 [rows, d]: this rank's partial gradient of the normalised rows
  const void* x = nullptr;        // bf16 [rows, d]: the forward's residual_out (the same on every rank)
  const void* weight = nullptr;   // bf16 [d]
  const float* rstd = nullptr;    // f32 [rows]: the forward's
  void* dx = nullptr;             // bf16 [rows, d]
  bool accumulate = false;        // dx = bf16(dx + g) instead of dx = g (g rounded to bf16 first)
  void* dw = nullptr;             // [d], f32 (or bf16 with dw_bf16): always accumulated into
  bool dw_bf16 = false;
  float* dw_partials = nullptr;   // f32 [blocks, d] scratch of this rank
  int64_t rows = 0, d = 0;
  uint32_t epoch = 0;
  int blocks = 16;
  double timeout_s = 10.0;
  FusedAlgo algo = FusedAlgo::kTwoShot;
};

// The widest hidden size the backward takes on the current device: kFusedBackwardMaxD, or less where the GPU
// offers a block less than 132 KiB of shared memory (a row group's dw sums live there).
int64_t fused_backward_max_d();

// Staging bytes each rank needs for `rows` x `d` bf16 (two input buffers and two output buffers).
int64_t fused_stage_bytes(int64_t rows, int64_t d);
// The largest rows x d a staging buffer of `stage_bytes` takes. The buffer's regions are laid out by this
// capacity, not by the call's shape, so calls of different shapes may follow each other on a group.
int64_t fused_stage_capacity(int64_t stage_bytes);

// Enqueues the kernel on `stream`. Throws (kShape/kComm) on arguments that cannot work; a failure during the
// kernel shows in *g.error after the stream is synchronised (fused_error_message() explains it).
void launch_fused_allreduce_add_rmsnorm(const FusedNormGroup& g, const FusedNormArgs& a, cudaStream_t stream);
// The backward: two kernels on `stream` (the fused one, then dw's column sums); errors as above.
void launch_fused_rmsnorm_backward(const FusedNormGroup& g, const FusedNormBackwardArgs& a, cudaStream_t stream);

// Occupies `stream` for about `ns` nanoseconds (one thread spinning on the global timer): a late rank in the
// tests and benchmarks.
void launch_spin(uint64_t ns, cudaStream_t stream);

// "" for 0; else what went wrong (the peer is error & 0xff).
const char* fused_error_kind(uint32_t error);

}  // namespace loom::cuda
