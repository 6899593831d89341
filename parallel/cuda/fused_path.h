// FusedNormPath: the one-kernel fused all-reduce + residual add + RMSNorm (and its backward) that a device
// communicator of a TP group offers through Communicator::fused_allreduce_add_rmsnorm / fused_rmsnorm_backward.
// It owns the group's cuda::IpcFusedNorm and the algorithm table (parallel/fused_tuning.h); NcclCommunicator and
// HostStagedCommunicator both delegate to it, so the two take the same path under the same conditions:
// bf16 rows whose width is a multiple of 8 (the backward also at most cuda::fused_backward_max_d() wide), on a
// group whose ranks can map each other's memory (cuda::IpcFusedNorm::unavailable_reason).
#pragma once

#include <cuda_runtime.h>
#include <mpi.h>

#include <memory>
#include <string>

#include "core/tensor.h"
#include "parallel/fused_tuning.h"

namespace loom::cuda {

class IpcFusedNorm;

class FusedNormPath {
 public:
  // The fused kernels' waits give up after this long (a dead or hung peer becomes an error, not a hang).
  static constexpr double kTimeoutS = 30.0;

  // Collective over comm (the group's MPI communicator). Null when the group cannot map its peers' memory;
  // rank 0 then logs why, once, and that the communicator composes its all-reduce with the norm kernels.
  static std::unique_ptr<FusedNormPath> create(MPI_Comm comm, cudaStream_t stream, const std::string& group_name,
                                               FusedTuning tuning);
  ~FusedNormPath();

  bool fits_forward(const Tensor& partial) const;
  bool fits_backward(const Tensor& dnormed) const;
  // Enqueue one call on `stream` (the communicator's collective stream). Collective over the group.
  void forward(cudaStream_t stream, const Tensor& partial, const Tensor& residual, const Tensor& weight, float eps,
               const Tensor& residual_out, const Tensor& normed, const Tensor& rstd);
  void backward(cudaStream_t stream, const Tensor& dnormed, const Tensor& x, const Tensor& weight,
                const Tensor& rstd, const Tensor& dx, bool accumulate, const Tensor& dw);
  // The group's waiting kernels give up now (IpcFusedNorm::abort).
  void abort();
  uint64_t calls() const;  // forward and backward calls enqueued so far
  uint64_t one_shot_calls() const { return one_shot_calls_; }  // of them, one-shot (the rest: two-shot)

 private:
  FusedNormPath(std::unique_ptr<IpcFusedNorm> ipc, FusedTuning tuning);
  bool one_shot(const Tensor& t);  // the table's choice for a call of t (counted)

  std::unique_ptr<IpcFusedNorm> ipc_;
  FusedTuning tuning_;
  uint64_t one_shot_calls_ = 0;
};

}  // namespace loom::cuda
