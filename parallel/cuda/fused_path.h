// FusedNormPath: the one-kernel fused all-reduce + residual add + RMSNorm (and its backward) that a device
// communicator of a TP group installs as its FusedKernels (parallel/communicator.h). It owns the group's
// cuda::IpcFusedNorm and the algorithm table (parallel/fused_tuning.h) and enqueues on the backend's collective
// stream; NcclCommunicator and HostStagedCommunicator both install it, so the two take the same path under the
// same conditions:
// bf16 rows whose width is a multiple of 8 (the backward also at most cuda::fused_backward_max_d() wide), on a
// group whose ranks can map each other's memory (cuda::IpcFusedNorm::unavailable_reason).
#pragma once

#include <cuda_runtime.h>
#include <mpi.h>

#include <memory>
#include <string>

#include "core/tensor.h"
#include "parallel/communicator.h"
#include "parallel/fused_tuning.h"

namespace loom::cuda {

class CudaBackend;
class IpcFusedNorm;

class FusedNormPath final : public FusedKernels {
 public:
  // The fused kernels' waits give up after this long (a dead or hung peer becomes an error, not a hang).
  static constexpr double kTimeoutS = 30.0;

  // Collective over comm (the group's MPI communicator). Null when the group cannot map its peers' memory;
  // rank 0 then logs why, once, and that the communicator composes its all-reduce with the norm kernels.
  static std::unique_ptr<FusedNormPath> create(MPI_Comm comm, CudaBackend& backend, const std::string& group_name,
                                               FusedTuning tuning);
  ~FusedNormPath() override;

  bool fits_forward(const Tensor& partial) const override;
  bool fits_backward(const Tensor& dnormed) const override;
  // Enqueue one call on the backend's collective stream. Collective over the group.
  void forward(const Tensor& partial, const Tensor& residual, const Tensor& weight, float eps,
               const Tensor& residual_out, const Tensor& normed, const Tensor& rstd) override;
  void backward(const Tensor& dnormed, const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dx,
                bool accumulate, const Tensor& dw) override;
  // The group's waiting kernels give up now (IpcFusedNorm::abort).
  void abort() override;
  uint64_t calls() const;  // forward and backward calls enqueued so far
  uint64_t one_shot_calls() const { return one_shot_calls_; }  // of them, one-shot (the rest: two-shot)

 private:
  FusedNormPath(std::unique_ptr<IpcFusedNorm> ipc, CudaBackend& backend, FusedTuning tuning);
  bool one_shot(const Tensor& t);  // the table's choice for a call of t (counted)

  std::unique_ptr<IpcFusedNorm> ipc_;
  CudaBackend& backend_;
  FusedTuning tuning_;
  uint64_t one_shot_calls_ = 0;
};

}  // namespace loom::cuda
