// HostStagedCommunicator: the Communicator for device memory where NCCL cannot serve a group — its ranks share
// a GPU (NCCL refuses two ranks of a communicator on one device), or the build has no NCCL. Each call copies its
// tensors to pinned host memory, runs MpiCommunicator's ring on them and copies the result back, so it is
// MpiCommunicator's collective, bit for bit, on the values the device holds: the same per-link timing and fault
// injection (parallel/link_trace.h), the same one trace record per call.
//
// dtypes: as NcclCommunicator — f32 and i32 move and reduce; bf16 moves, and reduces through f32 (each element
// converted to f32 on the host, reduced there in the ring's fixed order, rounded back to bf16 once; identical on
// every rank); u16 moves only.
//
// Stream contract: unlike NcclCommunicator, a call blocks the host. Its copies run on the backend's collective
// stream (CudaBackend::collective_stream: the compute stream after it has joined all side work, or the side
// stream inside a side region), so it reads what the kernels enqueued before it wrote, and it returns after the
// result is back on the device. A group of one rank copies on the device only, without waiting. A slow path for development and for machines with fewer GPUs than ranks; it
// serialises communication with compute.
//
// With fused_kernel, the group also offers the one-kernel fused all-reduce + RMSNorm over CUDA IPC
// (parallel/cuda/fused_path.h) exactly as NcclCommunicator does; ranks sharing one GPU can map each other's
// memory, so on a one-GPU machine a TP group of several processes runs the fused kernels, asynchronously, on the
// collective stream.
#pragma once

#include <cuda_runtime.h>
#include <mpi.h>

#include <memory>
#include <string>

#include "parallel/fused_tuning.h"
#include "parallel/mpi_communicator.h"

namespace loom {

namespace cuda {
class CudaBackend;
class FusedNormPath;
}

class HostStagedCommunicator final : public MpiCommunicator {
 public:
  // Collective over comm (every rank of it builds one, with the same fused_kernel).
  HostStagedCommunicator(MPI_Comm comm, std::string name, uint32_t group_id, cuda::CudaBackend& backend,
                         bool fused_kernel = false, FusedTuning tuning = FusedTuning());
  ~HostStagedCommunicator() override;

  Device device() const override { return Device::kCuda; }
  const char* backend_name() const override { return "MPI via host"; }

  // The one-kernel fused path (its call counts), or null when the group has none.
  const cuda::FusedNormPath* fused_path() const;

  // Collective over comm: why NCCL cannot serve this group ("" when it can): which ranks share which GPU. A GPU
  // is named by its machine (the kernel's boot id, so containers with one host name on two machines differ;
  // the host name where there is none) and its PCI bus id. The same answer on every rank.
  static std::string nccl_unusable_reason(MPI_Comm comm);

 protected:
  bool supports(DType dtype, bool reduction) const override;
  void do_all_reduce(const Tensor& t, ReduceOp op) override;
  void do_reduce_scatter(const Tensor& out, const Tensor& in, ReduceOp op) override;
  void do_all_gather(const Tensor& out, const Tensor& in) override;
  void do_broadcast(const Tensor& t, int root) override;
  void do_send(const Tensor& t, int peer) override;
  void do_recv(const Tensor& t, int peer) override;
  void do_barrier() override;

 private:
  // A pinned host buffer that only grows.
  struct Pinned {
    void* ptr = nullptr;
    size_t bytes = 0;
    void* reserve(size_t n);
    Pinned() = default;
    Pinned(const Pinned&) = delete;
    Pinned& operator=(const Pinned&) = delete;
    ~Pinned();
  };
  // A host buffer of n elements for device tensors of dtype `dtype`: of that dtype, or of f32 for a bf16
  // reduction (`wide`). Valid until the next call; one of each kind at a time.
  Tensor host_buffer(DType dtype, bool wide, int64_t n);
  // host = dev (dev's elements; host f32 when dev is bf16 and host wide), after the collective stream's work.
  void to_host(const Tensor& host, const Tensor& dev);
  // dev = host, waiting until the copy is done.
  void to_device(const Tensor& dev, const Tensor& host);
  void copy_on_device(const Tensor& out, const Tensor& in);
  cudaStream_t stream();

  cuda::CudaBackend& backend_;
  Pinned raw_;   // the device's elements
  Pinned wide_;  // f32 values of a bf16 reduction
};

}  // namespace loom
