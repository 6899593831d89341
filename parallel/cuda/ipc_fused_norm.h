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
//   - Epochs: a device counter in this rank's buffer (the kernels read and advance it), zeroed only with a new
//     buffer, as the flags are; so calls may be captured in a CUDA graph and replayed, between eager calls.
//   - Growth: a call larger than the staging capacity first waits for this rank's stream, meets every peer at
//     an MPI barrier (so no kernel of the group still reads the old buffers), then reallocates and re-exchanges.
//   - Errors: a kernel that gave up (a peer missed the deadline, or the abort word) leaves (kind, peer) in its
//     device error word and in a mapped host word (no copy per call), so run() and check() see failures of
//     completed calls without waiting. The group is unusable after a failure (peers'
//     flags are mid-call): make a new one.
//   - abort() sets this rank's abort word (mapped host memory): its waiting kernels return at once.
//   - Destruction meets the peers at a bounded barrier first (a late peer may still read this rank's buffer
//     after a one-shot call): 10 s, 1 s after abort(); when a peer does not come, the buffer is left mapped
//     rather than freed under a peer that might still read it.
#pragma once

#include <cuda_runtime.h>
#include "parallel/mpi_check.h"

#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "parallel/cuda/fused_norm_kernel.h"

namespace loom::cuda {

// Each rank's GPU as every rank of comm sees it (collective; the same vector on every rank): its machine (the
// kernel's boot id, shared by the containers of one machine, which may share a host name with another machine;
// the host name where the kernel gives none), host name, PCI bus id ("" when the rank has no usable device) and
// compute mode. Ranks share a GPU when machine and bus id are equal.
struct RankGpu {
  std::string machine, host, bus_id;
  int compute_mode = 0;
};
std::vector<RankGpu> gather_rank_gpus(MPI_Comm comm);

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

  // Enqueue one fused forward / backward call (a.timeout_s is the group's; the epoch comes from the device
  // counter; the backward's dw_partials scratch is the group's). Collective. Throw kComm when an earlier call of
  // this group failed. May be captured in a CUDA graph on the group's stream, once the buffers are large enough
  // (growth cannot happen during a capture: reserve() first).
  void run(FusedNormArgs a);
  void run_backward(FusedNormBackwardArgs a);
  // The same for the op's tensors (validated by Communicator: [rows, d] bf16, weight [d], rstd f32 [rows], dw
  // f32 or bf16 [d]).
  void run(const Tensor& partial, const Tensor& residual, const Tensor& weight, float eps, const Tensor& residual_out,
           const Tensor& normed, const Tensor& rstd, FusedAlgo algo);
  void run_backward(const Tensor& dnormed, const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dx,
                    bool accumulate, const Tensor& dw, FusedAlgo algo);
  // Calls from now on are enqueued on `stream` (a backend's side stream, say). The caller orders it after the
  // streams of earlier calls: a growth and synchronize() wait for the current stream only.
  void set_stream(cudaStream_t stream) { stream_ = stream; }
  // Grows the buffers (collectively) to take rows x d calls now.
  void reserve(int64_t rows, int64_t d, bool backward = true);
  // Throws kComm naming the peer when a completed call failed. Does not wait.
  void check() const;
  // Waits for the stream, then check().
  void synchronize() const;
  // This rank's waiting kernels give up now (and later calls fail at once).
  void abort();

  int rank() const { return rank_; }
  int size() const { return size_; }
  uint64_t calls() const { return calls_; }  // calls enqueued (a graph's captured calls once)
  int64_t stage_bytes() const { return stage_bytes_; }
  const std::string& name() const { return name_; }

 private:
  void map(int64_t stage_bytes);  // allocate, export, all-gather, open (collective)
  void unmap();
  FusedNormGroup prepare(int64_t rows, int64_t d, bool backward);  // check, grow if needed; the kernels' view

  MPI_Comm comm_ = MPI_COMM_NULL;
  cudaStream_t stream_;
  double timeout_s_;
  std::string name_;
  int rank_ = 0, size_ = 0;
  uint64_t calls_ = 0;
  int64_t stage_bytes_ = 0;
  void* mine_ = nullptr;           // [flags][epoch counter][stage]
  float* dw_partials_ = nullptr;   // the backward's scratch, [kFusedMaxBlocks, dw_partials_d_]
  int64_t dw_partials_d_ = 0;
  std::vector<void*> peers_;       // rank p's buffer as mapped here (mine_ for this rank)
  uint32_t* error_dev_ = nullptr;  // this rank's error word
  uint32_t* error_host_ = nullptr; // mapped host mirror the kernels write a failure to
  uint32_t* error_host_dev_ = nullptr;
  uint32_t* abort_host_ = nullptr; // mapped abort word
  uint32_t* abort_dev_ = nullptr;
};

}  // namespace loom::cuda
