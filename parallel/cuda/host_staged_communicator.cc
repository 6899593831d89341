#include "parallel/cuda/host_staged_communicator.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <vector>

#include "core/cuda/cuda_backend.h"
#include "core/cuda/cuda_check.h"
#include "core/dtype.h"
#include "core/error.h"
#include "parallel/cuda/fused_path.h"

namespace loom {

HostStagedCommunicator::HostStagedCommunicator(MPI_Comm comm, std::string name, uint32_t group_id,
                                               cuda::CudaBackend& backend, bool fused_kernel, FusedTuning tuning)
    : MpiCommunicator(comm, std::move(name), group_id), backend_(backend) {
  if (fused_kernel && size() > 1)
    fused_ = cuda::FusedNormPath::create(this->comm(), stream(), this->name(), std::move(tuning));
}

HostStagedCommunicator::~HostStagedCommunicator() = default;

void* HostStagedCommunicator::Pinned::reserve(size_t n) {
  if (n <= bytes) return ptr;
  const size_t grown = std::max(n, bytes + bytes / 2);
  if (ptr != nullptr) {
    cudaFreeHost(ptr);  // no copy of it is in flight: every use waits for its copy
    ptr = nullptr;
    bytes = 0;
  }
  LOOM_CUDA_CHECK(cudaHostAlloc(&ptr, grown, cudaHostAllocDefault));
  bytes = grown;
  return ptr;
}

HostStagedCommunicator::Pinned::~Pinned() {
  if (ptr != nullptr) cudaFreeHost(ptr);
}

std::string HostStagedCommunicator::nccl_unusable_reason(MPI_Comm comm) {
  int rank = 0, n = 0;
  LOOM_MPI_CHECK(MPI_Comm_rank(comm, &rank));
  LOOM_MPI_CHECK(MPI_Comm_size(comm, &n));
  constexpr int kIdChars = 32;
  char mine[kIdChars] = {};
  int dev = -1;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetPCIBusId(mine, kIdChars, dev) != cudaSuccess) {
    cudaGetLastError();
    std::snprintf(mine, kIdChars, "?rank%d", rank);  // unknown: counts as a GPU of its own
  }
  // The machine: its boot id (one per running kernel, shared by its containers), else its host name.
  std::string machine;
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  if (!(boot >> machine) || machine.empty()) {
    char host[MPI_MAX_PROCESSOR_NAME] = {};
    int len = 0;
    LOOM_MPI_CHECK(MPI_Get_processor_name(host, &len));
    machine = host;
  }
  for (char& c : machine)
    if (c == '/') c = '_';
  std::string key = machine + "/" + mine;
  key.resize(MPI_MAX_PROCESSOR_NAME + kIdChars, '\0');
  const size_t stride = key.size();
  std::vector<char> all(stride * static_cast<size_t>(n));
  LOOM_MPI_CHECK(MPI_Allgather(key.data(), static_cast<int>(stride), MPI_CHAR, all.data(), static_cast<int>(stride),
                               MPI_CHAR, comm));
  for (int a = 0; a < n; ++a)
    for (int b = a + 1; b < n; ++b)
      if (std::memcmp(&all[stride * static_cast<size_t>(a)], &all[stride * static_cast<size_t>(b)], stride) == 0) {
        const char* id = &all[stride * static_cast<size_t>(a)];
        return "ranks " + std::to_string(a) + " and " + std::to_string(b) + " of the group share GPU " +
               std::string(std::strchr(id, '/') + 1);
      }
  return {};
}

cudaStream_t HostStagedCommunicator::stream() { return backend_.collective_stream(); }

bool HostStagedCommunicator::supports(DType dtype, bool reduction) const {
  return !reduction || dtype != DType::kU16;
}

Tensor HostStagedCommunicator::host_buffer(DType dtype, bool wide, int64_t n) {
  const DType host_dtype = wide ? DType::kF32 : dtype;
  Pinned& buf = wide ? wide_ : raw_;
  void* p = buf.reserve(static_cast<size_t>(std::max<int64_t>(n, 1)) * dtype_size(host_dtype));
  return Tensor(p, Shape{n}, host_dtype, Device::kCpu);
}

void HostStagedCommunicator::to_host(const Tensor& host, const Tensor& dev) {
  const int64_t n = dev.numel();
  if (n == 0) return;
  cudaStream_t s = stream();
  if (host.dtype() == dev.dtype()) {
    LOOM_CUDA_CHECK(cudaMemcpyAsync(host.data(), dev.data(), dev.nbytes(), cudaMemcpyDeviceToHost, s));
    LOOM_CUDA_CHECK(cudaStreamSynchronize(s));
    return;
  }
  // bf16 on the device, f32 on the host (host lives in wide_, the bf16 bits pass through raw_).
  auto* bits = static_cast<uint16_t*>(raw_.reserve(dev.nbytes()));
  LOOM_CUDA_CHECK(cudaMemcpyAsync(bits, dev.data(), dev.nbytes(), cudaMemcpyDeviceToHost, s));
  LOOM_CUDA_CHECK(cudaStreamSynchronize(s));
  float* out = host.ptr<float>();
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(bf16{bits[i]});
}

void HostStagedCommunicator::to_device(const Tensor& dev, const Tensor& host) {
  const int64_t n = dev.numel();
  if (n == 0) return;
  cudaStream_t s = stream();
  const void* src = host.data();
  if (host.dtype() != dev.dtype()) {  // f32 on the host back to bf16: rounded once
    auto* bits = static_cast<uint16_t*>(raw_.reserve(dev.nbytes()));
    const float* in = host.ptr<float>();
    for (int64_t i = 0; i < n; ++i) bits[i] = f32_to_bf16(in[i]).bits;
    src = bits;
  }
  LOOM_CUDA_CHECK(cudaMemcpyAsync(dev.data(), src, dev.nbytes(), cudaMemcpyHostToDevice, s));
  LOOM_CUDA_CHECK(cudaStreamSynchronize(s));  // the pinned buffer is reused by the next call
}

// A group of one rank: out = in on the device, in stream order (nothing when they are the same memory).
void HostStagedCommunicator::copy_on_device(const Tensor& out, const Tensor& in) {
  if (out.data() != in.data() && out.nbytes() > 0)
    LOOM_CUDA_CHECK(cudaMemcpyAsync(out.data(), in.data(), out.nbytes(), cudaMemcpyDeviceToDevice, stream()));
}

void HostStagedCommunicator::do_all_reduce(const Tensor& t, ReduceOp op) {
  if (size() == 1) return;
  const bool wide = t.dtype() == DType::kBF16;
  const Tensor h = host_buffer(t.dtype(), wide, t.numel());
  to_host(h, t);
  MpiCommunicator::do_all_reduce(h, op);
  to_device(t, h);
}

void HostStagedCommunicator::do_reduce_scatter(const Tensor& out, const Tensor& in, ReduceOp op) {
  if (size() == 1) return copy_on_device(out, in);
  const bool wide = in.dtype() == DType::kBF16;
  const int64_t block = out.numel();
  const Tensor h = host_buffer(in.dtype(), wide, in.numel());
  to_host(h, in);
  const Tensor mine = h.flat_range(rank() * block, (rank() + 1) * block);  // the in-place form
  MpiCommunicator::do_reduce_scatter(mine, h, op);
  to_device(out, mine);
}

void HostStagedCommunicator::do_all_gather(const Tensor& out, const Tensor& in) {
  if (size() == 1) return copy_on_device(out, in);
  const int64_t block = in.numel();
  const Tensor h = host_buffer(out.dtype(), false, out.numel());
  const Tensor mine = h.flat_range(rank() * block, (rank() + 1) * block);  // the in-place form
  to_host(mine, in);
  MpiCommunicator::do_all_gather(h, mine);
  to_device(out, h);
}

void HostStagedCommunicator::do_broadcast(const Tensor& t, int root) {
  if (size() == 1) return;
  const Tensor h = host_buffer(t.dtype(), false, t.numel());
  if (rank() == root) to_host(h, t);
  MpiCommunicator::do_broadcast(h, root);
  if (rank() != root) to_device(t, h);
}

void HostStagedCommunicator::do_send(const Tensor& t, int peer) {
  const Tensor h = host_buffer(t.dtype(), false, t.numel());
  to_host(h, t);
  MpiCommunicator::do_send(h, peer);
}

void HostStagedCommunicator::do_recv(const Tensor& t, int peer) {
  const Tensor h = host_buffer(t.dtype(), false, t.numel());
  MpiCommunicator::do_recv(h, peer);
  to_device(t, h);
}

void HostStagedCommunicator::do_barrier() {
  LOOM_CUDA_CHECK(cudaStreamSynchronize(stream()));
  MpiCommunicator::do_barrier();
}

bool HostStagedCommunicator::has_fused_path(const Tensor& partial) const {
  return fused_ != nullptr && fused_->fits_forward(partial);
}

void HostStagedCommunicator::do_fused_allreduce_add_rmsnorm(const Tensor& partial, const Tensor& residual,
                                                            const Tensor& weight, float eps,
                                                            const Tensor& residual_out, const Tensor& normed,
                                                            const Tensor& rstd) {
  fused_->forward(stream(), partial, residual, weight, eps, residual_out, normed, rstd);
}

bool HostStagedCommunicator::has_fused_backward_path(const Tensor& dnormed) const {
  return fused_ != nullptr && fused_->fits_backward(dnormed);
}

void HostStagedCommunicator::do_fused_rmsnorm_backward(const Tensor& dnormed, const Tensor& x, const Tensor& weight,
                                                       const Tensor& rstd, const Tensor& dx, bool accumulate,
                                                       const Tensor& dw) {
  fused_->backward(stream(), dnormed, x, weight, rstd, dx, accumulate, dw);
}

}  // namespace loom
