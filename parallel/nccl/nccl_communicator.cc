#include "parallel/nccl/nccl_communicator.h"

#include "core/cuda/cuda_backend.h"
#include "core/cuda/cuda_check.h"
#include "core/log.h"
#include "parallel/cuda/device_trace_timer.h"
#include "parallel/cuda/fused_path.h"
#include "parallel/cuda/transfer_timer.h"
#include "parallel/link_trace.h"
#include "parallel/mpi_check.h"
#include "parallel/mpi_communicator.h"

namespace loom {
namespace {

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::kF32: return ncclFloat32;
    case DType::kBF16: return ncclBfloat16;
    case DType::kI32: return ncclInt32;
    case DType::kU16: return ncclFloat16;  // moved, never reduced
  }
  return ncclFloat32;
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kMax: return ncclMax;
    case ReduceOp::kMin: return ncclMin;
  }
  return ncclSum;
}

int mpi_rank(MPI_Comm c) {
  int r = 0;
  MPI_Comm_rank(c, &r);
  return r;
}
int mpi_size(MPI_Comm c) {
  int s = 0;
  MPI_Comm_size(c, &s);
  return s;
}

}  // namespace

NcclCommunicator::NcclCommunicator(MPI_Comm comm, std::string name, uint32_t group_id, cuda::CudaBackend& backend,
                                   bool fused_kernel, FusedTuning tuning)
    : Communicator(std::move(name), mpi_rank(comm), mpi_size(comm), group_id),
      backend_(backend) {
  set_world_ranks(world_ranks_of(comm));
  ncclUniqueId id{};
  if (rank() == 0) LOOM_NCCL_CHECK(this, ncclGetUniqueId(&id));
  LOOM_MPI_CHECK(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, comm));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 1;
  LOOM_NCCL_CHECK(this, ncclCommInitRankConfig(&comm_, size(), id, rank(), &config));
  LOOM_CUDA_CHECK(cudaMalloc(&barrier_buf_, sizeof(float)));
  if (fused_kernel && size() > 1)
    set_fused_kernels(cuda::FusedNormPath::create(comm, backend_, this->name(), std::move(tuning)));
  timer_ = std::make_unique<cuda::DeviceTraceTimer>(trace_ring());
  trace_ring().set_device_timed(true);
}

void NcclCommunicator::flush_trace(double timeout_s) {
  if (timer_) timer_->flush(timeout_s);
}

void NcclCommunicator::before_enqueue() { timer_->before(stream()); }

void NcclCommunicator::after_enqueue(uint64_t seq) { timer_->after(stream(), seq); }

NcclCommunicator::~NcclCommunicator() {
  if (comm_) {
    if (broken_) {
      ncclCommAbort(comm_);
    } else {
      try {
        backend_.synchronize();
      } catch (const Error&) {  // the stream's error was reported where it happened
      }
      ncclCommDestroy(comm_);
    }
  }
  if (barrier_buf_) cudaFree(barrier_buf_);
}

void NcclCommunicator::abort() {
  timer_.reset();  // first: the cancelled collectives' records stay in flight instead of closing as completed
  if (fused_kernels()) fused_kernels()->abort();
  if (comm_) ncclCommAbort(comm_);
  comm_ = nullptr;
  broken_ = true;
}

cudaStream_t NcclCommunicator::stream() { return backend_.collective_stream(); }

bool NcclCommunicator::supports(DType dtype, bool reduction) const {
  return !reduction || dtype != DType::kU16;
}

void NcclCommunicator::do_all_reduce(const Tensor& t, ReduceOp op) {
  LOOM_NCCL_CHECK(this, ncclAllReduce(t.data(), t.data(), static_cast<size_t>(t.numel()), nccl_type(t.dtype()),
                                      nccl_op(op), comm_, stream()));
}

void NcclCommunicator::do_reduce_scatter(const Tensor& out, const Tensor& in, ReduceOp op) {
  LOOM_NCCL_CHECK(this, ncclReduceScatter(in.data(), out.data(), static_cast<size_t>(out.numel()),
                                          nccl_type(out.dtype()), nccl_op(op), comm_, stream()));
}

void NcclCommunicator::do_all_gather(const Tensor& out, const Tensor& in) {
  LOOM_NCCL_CHECK(this, ncclAllGather(in.data(), out.data(), static_cast<size_t>(in.numel()), nccl_type(in.dtype()),
                                      comm_, stream()));
}

void NcclCommunicator::do_broadcast(const Tensor& t, int root) {
  LOOM_NCCL_CHECK(this, ncclBroadcast(t.data(), t.data(), static_cast<size_t>(t.numel()), nccl_type(t.dtype()), root,
                                      comm_, stream()));
}

std::unique_ptr<TransferTimer> NcclCommunicator::make_transfer_timer() {
  return std::make_unique<cuda::EventTransferTimer>([this] { return stream(); });
}

void NcclCommunicator::do_send(const Tensor& t, int peer) {
  // An injected slow link: held on the stream after the trace record's start event, before the transfer.
  cuda::enqueue_delay(stream(), process_comm_faults().send_delay_s(world_rank(peer)));
  LOOM_NCCL_CHECK(this,
                  ncclSend(t.data(), static_cast<size_t>(t.numel()), nccl_type(t.dtype()), peer, comm_, stream()));
}

void NcclCommunicator::do_recv(const Tensor& t, int peer) {
  LOOM_NCCL_CHECK(this,
                  ncclRecv(t.data(), static_cast<size_t>(t.numel()), nccl_type(t.dtype()), peer, comm_, stream()));
}

void NcclCommunicator::do_barrier() {
  LOOM_NCCL_CHECK(this, ncclAllReduce(barrier_buf_, barrier_buf_, 1, ncclFloat32, ncclSum, comm_, stream()));
  LOOM_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

}  // namespace loom
