// NcclCommunicator: the Communicator (parallel/communicator.h) for device memory, over NCCL.
//
// Stream contract: every call is enqueued on the CUDA backend's current stream (its compute stream, or its side
// stream inside a side region: Backend::begin_side) and returns without waiting, so collectives are ordered
// with the kernels that produce and consume their tensors and the host never blocks — except barrier(), which
// waits for the stream. A call on the compute stream first joins all side work (CudaBackend::collective_stream),
// so the group's collectives run in the order they were enqueued, the same on every rank, whichever stream
// they are on. Its trace records are closed from CUDA events (parallel/cuda/device_trace_timer.h): they span
// from when the stream reached the call to when the collective completed, not the enqueue.
//
// Creation is collective over the group's MPI communicator: rank 0 makes the NCCL unique id and broadcasts it
// over MPI. A failed NCCL call marks the communicator broken; it is then aborted (ncclCommAbort) rather than
// destroyed, so a dead peer cannot hang the teardown. NVLink multicast (NVLS) is never requested.
//
// With fused_kernel, a group whose ranks are on one node (CUDA IPC reachable) also offers the fused all-reduce +
// residual add + RMSNorm as one kernel, and its backward as one (parallel/cuda/fused_path.h says for which
// tensors); otherwise, or when the group cannot map its peers' memory (the reason is logged once), the fused op
// composes NCCL's all-reduce with the norm kernels.
//
// NCCL refuses two ranks of a communicator on one GPU: a group whose ranks share a GPU takes
// HostStagedCommunicator instead (parallel/cuda/host_staged_communicator.h; the choice is in loom/session.cc).
#pragma once

#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <memory>
#include <string>

#include "parallel/communicator.h"
#include "parallel/fused_tuning.h"

#define LOOM_NCCL_CHECK(comm_obj, expr)                                                              \
  do {                                                                                               \
    ncclResult_t loom_nccl_ = (expr);                                                                \
    if (loom_nccl_ != ncclSuccess && loom_nccl_ != ncclInProgress) {                                 \
      (comm_obj)->mark_broken();                                                                     \
      LOOM_THROW(kComm, #expr << " failed: " << ncclGetErrorString(loom_nccl_) << " ("               \
                              << ncclGetLastError(nullptr) << ")");                                  \
    }                                                                                                \
  } while (0)

namespace loom {

namespace cuda {
class CudaBackend;
class DeviceTraceTimer;
}

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `comm` (every rank of it calls this with the same name/group id).
  // tuning: the fused kernel's one-shot/two-shot table (parallel/fused_tuning.h).
  NcclCommunicator(MPI_Comm comm, std::string name, uint32_t group_id, cuda::CudaBackend& backend,
                   bool fused_kernel = false, FusedTuning tuning = FusedTuning());
  ~NcclCommunicator() override;

  Device device() const override { return Device::kCuda; }
  const char* backend_name() const override { return "NCCL"; }
  // Aborts the NCCL communicator (idempotent): in-flight collectives are cancelled and peers see an error.
  void abort();
  void mark_broken() { broken_ = true; }
  void flush_trace(double timeout_s) override;
  // Receives timed from CUDA events on the collective stream (the link probe).
  std::unique_ptr<TransferTimer> make_transfer_timer() override;

 protected:
  bool supports(DType dtype, bool reduction) const override;
  void do_all_reduce(const Tensor& t, ReduceOp op) override;
  void do_reduce_scatter(const Tensor& out, const Tensor& in, ReduceOp op) override;
  void do_all_gather(const Tensor& out, const Tensor& in) override;
  void do_broadcast(const Tensor& t, int root) override;
  void do_send(const Tensor& t, int peer) override;
  void do_recv(const Tensor& t, int peer) override;
  void do_barrier() override;
  bool device_timed() const override { return timer_ != nullptr; }
  void before_enqueue() override;
  void after_enqueue(uint64_t seq) override;

 private:
  cudaStream_t stream();  // where the next call goes (CudaBackend::collective_stream)

  ncclComm_t comm_ = nullptr;
  cuda::CudaBackend& backend_;
  void* barrier_buf_ = nullptr;
  bool broken_ = false;
  std::unique_ptr<cuda::DeviceTraceTimer> timer_;
};

}  // namespace loom
