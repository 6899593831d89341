#include "parallel/cuda/ipc_fused_norm.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <thread>

#include "core/cuda/cuda_check.h"
#include "core/error.h"

namespace loom::cuda {
namespace {

constexpr int64_t kFlagBytes = kFusedFlagWords * static_cast<int64_t>(sizeof(uint32_t));
constexpr int64_t kHeaderBytes = kFlagBytes + 256;  // the flags, then the epoch counter (2 words), padded
// Destruction waits this long for the peers before freeing the buffer they may still read.
constexpr double kDestroyWaitS = 10.0;
constexpr int kReasonChars = 256;

// One rank's GPU as sent to its peers (fixed size for the all-gather).
struct Facts {
  char machine[MPI_MAX_PROCESSOR_NAME];
  char host[MPI_MAX_PROCESSOR_NAME];
  char bus_id[32];
  int compute_mode;
};

// The kernel's boot id: one per running machine, shared by its containers (which may also share a host name
// across machines); "" where the kernel does not say.
std::string boot_id() {
  std::string id;
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  in >> id;
  return id;
}

// Why this rank cannot use the group's memory ("" when it can).
std::string local_reason(const std::vector<RankGpu>& all, int rank) {
  const int n = static_cast<int>(all.size());
  if (n > kFusedMaxRanks)
    return "the group has " + std::to_string(n) + " ranks; the fused kernels take at most " +
           std::to_string(kFusedMaxRanks);
  const RankGpu& me = all[static_cast<size_t>(rank)];
  int mine = -1;
  if (me.bus_id.empty() || cudaGetDevice(&mine) != cudaSuccess)
    return "rank " + std::to_string(rank) + " has no usable CUDA device";
  for (int p = 0; p < n; ++p) {
    const RankGpu& f = all[static_cast<size_t>(p)];
    if (f.machine != me.machine)
      return "ranks on different hosts (" + me.host + " and " + f.host + "): CUDA IPC maps memory of one node only";
    if (p == rank) continue;
    if (f.bus_id == me.bus_id) {
      if (f.compute_mode == cudaComputeModeExclusiveProcess)
        return "ranks share GPU " + f.bus_id + ", which is in exclusive-process mode";
      continue;  // the same GPU: IPC works without peer access
    }
    int dev = -1;
    if (cudaDeviceGetByPCIBusId(&dev, f.bus_id.c_str()) != cudaSuccess) {
      cudaGetLastError();
      return "rank " + std::to_string(p) + "'s GPU " + f.bus_id + " is not visible to rank " + std::to_string(rank) +
             " (CUDA_VISIBLE_DEVICES)";
    }
    int can = 0;
    if (cudaDeviceCanAccessPeer(&can, mine, dev) != cudaSuccess || !can)
      return "GPU " + me.bus_id + " cannot access GPU " + f.bus_id + " peer-to-peer";
  }
  return {};
}

}  // namespace

std::vector<RankGpu> gather_rank_gpus(MPI_Comm comm) {
  int n = 0;
  LOOM_MPI_CHECK(MPI_Comm_size(comm, &n));
  Facts mine{};
  int len = 0;
  LOOM_MPI_CHECK(MPI_Get_processor_name(mine.host, &len));
  const std::string boot = boot_id();
  const std::string machine = boot.empty() ? std::string(mine.host) : boot;
  machine.copy(mine.machine, sizeof mine.machine - 1);  // zero-terminated by mine{}
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetPCIBusId(mine.bus_id, sizeof mine.bus_id, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&mine.compute_mode, cudaDevAttrComputeMode, dev) != cudaSuccess) {
    cudaGetLastError();
    mine.bus_id[0] = 0;  // no usable device
  }
  std::vector<Facts> all(static_cast<size_t>(n));
  LOOM_MPI_CHECK(MPI_Allgather(&mine, sizeof(Facts), MPI_BYTE, all.data(), sizeof(Facts), MPI_BYTE, comm));
  std::vector<RankGpu> out;
  out.reserve(all.size());
  for (const Facts& f : all) out.push_back(RankGpu{f.machine, f.host, f.bus_id, f.compute_mode});
  return out;
}

std::string IpcFusedNorm::unavailable_reason(MPI_Comm comm) {
  int rank = 0, n = 0;
  LOOM_MPI_CHECK(MPI_Comm_rank(comm, &rank));
  LOOM_MPI_CHECK(MPI_Comm_size(comm, &n));
  const std::string reason = local_reason(gather_rank_gpus(comm), rank);
  // Every rank reports the lowest failing rank's reason.
  char buf[kReasonChars] = {};
  std::strncpy(buf, reason.c_str(), kReasonChars - 1);
  std::vector<char> reasons(static_cast<size_t>(n) * kReasonChars);
  LOOM_MPI_CHECK(MPI_Allgather(buf, kReasonChars, MPI_CHAR, reasons.data(), kReasonChars, MPI_CHAR, comm));
  for (int p = 0; p < n; ++p)
    if (reasons[static_cast<size_t>(p) * kReasonChars] != 0)
      return std::string(&reasons[static_cast<size_t>(p) * kReasonChars]);
  return {};
}

IpcFusedNorm::IpcFusedNorm(MPI_Comm comm, cudaStream_t stream, int64_t stage_bytes, double timeout_s,
                           std::string name)
    : stream_(stream), timeout_s_(timeout_s), name_(std::move(name)) {
  LOOM_CHECK(timeout_s > 0, kConfig, "fused norm group '" << name_ << "': timeout must be positive");
  LOOM_MPI_CHECK(MPI_Comm_dup(comm, &comm_));
  LOOM_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  LOOM_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  LOOM_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  LOOM_CHECK(size_ <= kFusedMaxRanks, kComm,
             "fused norm group '" << name_ << "' of " << size_ << " ranks; at most " << kFusedMaxRanks);
  LOOM_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&error_dev_), sizeof(uint32_t)));
  LOOM_CUDA_CHECK(cudaMemset(error_dev_, 0, sizeof(uint32_t)));
  LOOM_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&error_host_), sizeof(uint32_t), cudaHostAllocMapped));
  *error_host_ = 0;
  LOOM_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_host_dev_), error_host_, 0));
  LOOM_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&abort_host_), sizeof(uint32_t), cudaHostAllocMapped));
  *abort_host_ = 0;
  LOOM_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&abort_dev_), abort_host_, 0));
  map(std::max<int64_t>(stage_bytes, fused_stage_bytes(1, 8)));
}

IpcFusedNorm::~IpcFusedNorm() {
  cudaStreamSynchronize(stream_);  // every wait is bounded: this returns
  // Meet the peers (bounded) before freeing: after a one-shot call a late peer may still read this buffer, and
  // each peer synchronised its stream before coming. Briefly after abort() (the job is going down).
  const bool aborted = *reinterpret_cast<volatile uint32_t*>(abort_host_) != 0;
  int met = 0;
  MPI_Request req;
  if (MPI_Ibarrier(comm_, &req) == MPI_SUCCESS) {
    const double deadline = MPI_Wtime() + (aborted ? 1.0 : kDestroyWaitS);
    while (MPI_Test(&req, &met, MPI_STATUS_IGNORE) == MPI_SUCCESS && !met && MPI_Wtime() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (!met) {
    // A peer is gone or late: leave the buffer mapped (a live peer may still read it) and the communicator,
    // whose barrier is still pending; the process is on its way out.
    cudaGetLastError();
    return;
  }
  unmap();
  if (dw_partials_ != nullptr) cudaFree(dw_partials_);
  cudaFree(error_dev_);
  cudaFreeHost(error_host_);
  cudaFreeHost(abort_host_);
  if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  cudaGetLastError();
}

void IpcFusedNorm::map(int64_t stage_bytes) {
  stage_bytes_ = stage_bytes;
  LOOM_CUDA_CHECK(cudaMalloc(&mine_, static_cast<size_t>(kHeaderBytes + stage_bytes)));
  LOOM_CUDA_CHECK(cudaMemset(mine_, 0, static_cast<size_t>(kHeaderBytes)));
  LOOM_CUDA_CHECK(cudaDeviceSynchronize());  // the zeroed flags and counter are visible before any peer sees them
  cudaIpcMemHandle_t h;
  LOOM_CUDA_CHECK(cudaIpcGetMemHandle(&h, mine_));
  std::vector<cudaIpcMemHandle_t> all(static_cast<size_t>(size_));
  LOOM_MPI_CHECK(MPI_Allgather(&h, sizeof h, MPI_BYTE, all.data(), sizeof h, MPI_BYTE, comm_));
  peers_.assign(static_cast<size_t>(size_), nullptr);
  int failed_peer = -1;
  cudaError_t err = cudaSuccess;
  for (int p = 0; p < size_ && failed_peer < 0; ++p) {
    if (p == rank_) {
      peers_[static_cast<size_t>(p)] = mine_;
      continue;
    }
    err = cudaIpcOpenMemHandle(&peers_[static_cast<size_t>(p)], all[static_cast<size_t>(p)],
                               cudaIpcMemLazyEnablePeerAccess);
    if (err != cudaSuccess) {
      peers_[static_cast<size_t>(p)] = nullptr;
      failed_peer = p;
    }
  }
  // Every rank learns whether all mapped (nobody launches on the new buffers before that, and a rank that could
  // not map does not leave the others waiting).
  int ok = failed_peer < 0 ? 1 : 0, all_ok = 0;
  LOOM_MPI_CHECK(MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, comm_));
  LOOM_CHECK(failed_peer < 0, kComm,
             "fused norm group '" << name_ << "': rank " << rank_ << " cannot map rank " << failed_peer
                                  << "'s buffer (cudaIpcOpenMemHandle: " << cudaGetErrorString(err) << ")");
  LOOM_CHECK(all_ok == 1, kComm, "fused norm group '" << name_ << "': another rank could not map a peer's buffer");
}

void IpcFusedNorm::unmap() {
  for (int p = 0; p < static_cast<int>(peers_.size()); ++p)
    if (p != rank_ && peers_[static_cast<size_t>(p)] != nullptr) cudaIpcCloseMemHandle(peers_[static_cast<size_t>(p)]);
  peers_.clear();
  if (mine_ != nullptr) cudaFree(mine_);
  mine_ = nullptr;
}

void IpcFusedNorm::check() const {
  const uint32_t e = *reinterpret_cast<volatile uint32_t*>(error_host_);
  if (e == 0) return;
  if ((e >> 8) == kFusedAborted)
    LOOM_THROW(kComm, "fused all-reduce + RMSNorm on '" << name_ << "' (rank " << rank_ << "): aborted");
  LOOM_THROW(kComm, "fused all-reduce + RMSNorm on '" << name_ << "' (rank " << rank_ << "): rank " << (e & 0xff)
                                                      << " " << fused_error_kind(e) << " (waited " << timeout_s_
                                                      << " s); the group is unusable");
}

void IpcFusedNorm::synchronize() const {
  LOOM_CUDA_CHECK(cudaStreamSynchronize(stream_));
  check();
}

void IpcFusedNorm::abort() {
  *reinterpret_cast<volatile uint32_t*>(abort_host_) = 1;
}

FusedNormGroup IpcFusedNorm::prepare(int64_t rows, int64_t d, bool backward) {
  check();
  LOOM_CHECK(*reinterpret_cast<volatile uint32_t*>(abort_host_) == 0, kComm,
             "fused all-reduce + RMSNorm on '" << name_ << "': the group was aborted");
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  LOOM_CUDA_CHECK(cudaStreamIsCapturing(stream_, &capture));
  if (rows * d > fused_stage_capacity(stage_bytes_)) {
    LOOM_CHECK(capture == cudaStreamCaptureStatusNone, kComm,
               "fused all-reduce + RMSNorm on '" << name_ << "': a " << rows << " x " << d
                                                 << " call needs larger buffers, which cannot grow during a CUDA-graph "
                                                    "capture; call reserve() before capturing");
    // Collective growth (every rank has the same shape): no kernel of the group may still use the old buffers.
    LOOM_CUDA_CHECK(cudaStreamSynchronize(stream_));
    check();
    LOOM_MPI_CHECK(MPI_Barrier(comm_));
    unmap();
    map(std::max(fused_stage_bytes(rows, d), 2 * stage_bytes_));
  }
  if (backward && d > dw_partials_d_ && d <= fused_backward_max_d()) {
    // The backward's scratch (local): sized for the widest call and any block count.
    LOOM_CHECK(capture == cudaStreamCaptureStatusNone, kComm,
               "fused RMSNorm backward on '" << name_ << "': width " << d << " needs more scratch, which cannot grow "
                                             << "during a CUDA-graph capture; call reserve() before capturing");
    LOOM_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (dw_partials_ != nullptr) cudaFree(dw_partials_);
    dw_partials_ = nullptr;
    LOOM_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&dw_partials_),
                               static_cast<size_t>(kFusedMaxBlocks * d) * sizeof(float)));
    dw_partials_d_ = d;
  }
  FusedNormGroup g;
  g.ranks = size_;
  g.rank = rank_;
  for (int p = 0; p < size_; ++p) {
    auto* base = static_cast<char*>(peers_[static_cast<size_t>(p)]);
    g.flags[p] = reinterpret_cast<uint32_t*>(base);
    g.stage[p] = base + kHeaderBytes;
  }
  g.stage_bytes = stage_bytes_;
  g.abort = abort_dev_;
  g.error = error_dev_;
  g.error_host = error_host_dev_;
  g.epoch_counter = reinterpret_cast<uint32_t*>(static_cast<char*>(mine_) + kFlagBytes);
  return g;
}

void IpcFusedNorm::reserve(int64_t rows, int64_t d, bool backward) {
  prepare(rows, d, backward);
}

void IpcFusedNorm::run(FusedNormArgs a) {
  const FusedNormGroup g = prepare(a.rows, a.d, false);
  a.timeout_s = timeout_s_;
  launch_fused_allreduce_add_rmsnorm(g, a, stream_);
  ++calls_;
}

void IpcFusedNorm::run_backward(FusedNormBackwardArgs a) {
  const FusedNormGroup g = prepare(a.rows, a.d, true);
  a.timeout_s = timeout_s_;
  a.dw_partials = dw_partials_;
  launch_fused_rmsnorm_backward(g, a, stream_);
  ++calls_;
}

void IpcFusedNorm::run(const Tensor& partial, const Tensor& residual, const Tensor& weight, float eps,
                       const Tensor& residual_out, const Tensor& normed, const Tensor& rstd, FusedAlgo algo) {
  FusedNormArgs a;
  a.partial = partial.data();
  a.residual = residual.data();
  a.weight = weight.data();
  a.residual_out = residual_out.data();
  a.normed = normed.data();
  a.rstd = static_cast<float*>(rstd.data());
  a.rows = partial.size(0);
  a.d = partial.size(1);
  a.eps = eps;
  a.algo = algo;
  run(a);
}

void IpcFusedNorm::run_backward(const Tensor& dnormed, const Tensor& x, const Tensor& weight, const Tensor& rstd,
                                const Tensor& dx, bool accumulate, const Tensor& dw, FusedAlgo algo) {
  FusedNormBackwardArgs a;
  a.dnormed = dnormed.data();
  a.x = x.data();
  a.weight = weight.data();
  a.rstd = static_cast<const float*>(rstd.data());
  a.dx = dx.data();
  a.accumulate = accumulate;
  a.dw = dw.data();
  a.dw_bf16 = dw.dtype() == DType::kBF16;
  a.rows = dnormed.size(0);
  a.d = dnormed.size(1);
  a.algo = algo;
  run_backward(a);
}

}  // namespace loom::cuda
