#include "parallel/cuda/fused_path.h"

#include "core/cuda/cuda_backend.h"
#include "core/log.h"
#include "parallel/cuda/ipc_fused_norm.h"

namespace loom::cuda {

std::unique_ptr<FusedNormPath> FusedNormPath::create(MPI_Comm comm, CudaBackend& backend,
                                                     const std::string& group_name, FusedTuning tuning) {
  int rank = 0;
  LOOM_MPI_CHECK(MPI_Comm_rank(comm, &rank));
  const std::string why = IpcFusedNorm::unavailable_reason(comm);
  if (!why.empty()) {
    if (rank == 0)
      LOOM_WARN("group '" << group_name << "': no fused all-reduce + RMSNorm kernel (" << why
                          << "); all-reduce + norm kernels instead");
    return nullptr;
  }
  auto ipc = std::make_unique<IpcFusedNorm>(comm, backend.collective_stream(), 0, kTimeoutS, group_name);
  if (rank == 0) LOOM_INFO("group '" << group_name << "': fused all-reduce + RMSNorm kernel over CUDA IPC");
  return std::unique_ptr<FusedNormPath>(new FusedNormPath(std::move(ipc), backend, std::move(tuning)));
}

FusedNormPath::FusedNormPath(std::unique_ptr<IpcFusedNorm> ipc, CudaBackend& backend, FusedTuning tuning)
    : ipc_(std::move(ipc)), backend_(backend), tuning_(std::move(tuning)) {}

FusedNormPath::~FusedNormPath() = default;

bool FusedNormPath::fits_forward(const Tensor& partial) const {
  return partial.dtype() == DType::kBF16 && partial.size(1) % 8 == 0;
}

bool FusedNormPath::fits_backward(const Tensor& dnormed) const {
  return fits_forward(dnormed) && dnormed.size(1) <= fused_backward_max_d();
}

// One-shot (every rank reduces every row) up to the table's size of partial, two-shot above.
bool FusedNormPath::one_shot(const Tensor& t) {
  const bool one = tuning_.one_shot(ipc_->size(), static_cast<int64_t>(t.nbytes()));
  one_shot_calls_ += one ? 1 : 0;
  return one;
}

void FusedNormPath::forward(const Tensor& partial, const Tensor& residual, const Tensor& weight, float eps,
                            const Tensor& residual_out, const Tensor& normed, const Tensor& rstd) {
  ipc_->set_stream(backend_.collective_stream());
  ipc_->run(partial, residual, weight, eps, residual_out, normed, rstd,
            one_shot(partial) ? FusedAlgo::kOneShot : FusedAlgo::kTwoShot);
}

void FusedNormPath::backward(const Tensor& dnormed, const Tensor& x, const Tensor& weight, const Tensor& rstd,
                             const Tensor& dx, bool accumulate, const Tensor& dw) {
  ipc_->set_stream(backend_.collective_stream());
  ipc_->run_backward(dnormed, x, weight, rstd, dx, accumulate, dw,
                     one_shot(dnormed) ? FusedAlgo::kOneShot : FusedAlgo::kTwoShot);
}

void FusedNormPath::abort() { ipc_->abort(); }

uint64_t FusedNormPath::calls() const { return ipc_->calls(); }

}  // namespace loom::cuda
