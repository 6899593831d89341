// IpcFusedNorm: the symmetric memory of the fused all-reduce + residual add + RMSNorm kernels
// (parallel/cuda/fused_norm_kernel.h) across the processes of one node, over CUDA IPC: each rank allocates one
// device buffer (its flag words, then its staging buffer), exports it (cudaIpcGetMemHandle), the handles are
// all-gathered over MPI, and every rank maps its peers' buffers. No NVLink multicast: peer pointers only.
//
// Creation, growth and the calls are collective over the group's MPI communicator: every rank makes the same
// calls with the same shapes in the same order (the TP ranks of one group do: they run the same layers).
//
//   - Availability: unavailable_reason() says why a group cannot use it (ranks on different hosts, more than
//     kFusedMaxRanks ranks, a peer's GPU not visible or not reachable peer-to-peer, a GPU in exclusive-process
//     mode shared by two ranks); the same answer on every rank, so every rank takes the same path.
//   - Epochs: a per-group call counter kept here, never reset; flags are zeroed only with a new buffer.
//   - Growth: a call larger than the staging capacity first waits for this rank's stream, meets every peer at
//     an MPI barrier (so no kernel of the group still reads the old buffers), then reallocates and re-exchanges.
//   - Errors: a kernel that gave up (a peer missed the deadline, or the abort word) leaves (kind, peer) in its
//     device error word; after every call the word is copied to pinned host memory on the stream, so run() and
//     check() see failures of completed calls without waiting. The group is unusable after a failure (peers'
//     flags are mid-call): make a new one.
//   - abort() sets this rank's abort word (mapped host memory): its waiting kernels return at once.
#pragma once

#include <cuda_runtime.h>
#include "parallel/mpi_check.h"

#include <cstdint>
#include <string>
#include <vector>

#include "parallel/cuda/fused_norm_kernel.h"

namespace loom::cuda {

class IpcFusedNorm {
 public:
  // Collective over comm: "" when the group can use CUDA IPC with this process's current device; otherwise why
  // not (the first failing rank's reason, identical on every rank).
  static std::string unavailable_reason(MPI_Comm comm);

  // Collective over comm (requires unavailable_reason(comm) to be ""). Calls are enqueued on `stream`; each
  // wait of a kernel gives up after timeout_s. `name` is the group's, for messages.
  IpcFusedNorm(MPI_Comm comm, cudaStream_t stream, int64_t stage_bytes, double timeout_s, std::string name);
  ~IpcFusedNorm();
  IpcFusedNorm(const IpcFusedNorm&) = delete;
  IpcFusedNorm& operator=(const IpcFusedNorm&) = delete;

  // Enqueues one fused call (a.epoch and a.timeout_s are the group's, set here). Collective.
  // Throws kComm when an earlier call of this group failed.
  void run(FusedNormArgs a);
  // Throws kComm naming the peer when a completed call failed. Does not wait.
  void check() const;
  // Waits for the stream, then check().
  void synchronize() const;
  // This rank's waiting kernels give up now (and later calls fail at once).
  void abort();

  int rank() const { return rank_; }
  int size() const { return size_; }
  uint32_t epoch() const { return epoch_; }
  int64_t stage_bytes() const { return stage_bytes_; }
  const std::string& name() const { return name_; }

 private:
  void map(int64_t stage_bytes);  // allocate, export, all-gather, open (collective)
  void unmap();

  MPI_Comm comm_ = MPI_COMM_NULL;
  cudaStream_t stream_;
  double timeout_s_;
  std::string name_;
  int rank_ = 0, size_ = 0;
  uint32_t epoch_ = 0;
  int64_t stage_bytes_ = 0;
  void* mine_ = nullptr;           // [flags][stage]
  std::vector<void*> peers_;       // rank p's buffer as mapped here (mine_ for this rank)
  uint32_t* error_dev_ = nullptr;  // this rank's error word
  uint32_t* error_host_ = nullptr; // pinned copy, refreshed after every call
  uint32_t* abort_host_ = nullptr; // mapped abort word
  uint32_t* abort_dev_ = nullptr;
};

}  // namespace loom::cuda
