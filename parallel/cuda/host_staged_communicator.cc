#include "parallel/cuda/host_staged_communicator.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/cuda/cuda_backend.h"
#include "core/cuda/cuda_check.h"
#include "core/dtype.h"
#include "core/error.h"
#include "parallel/cuda/fused_path.h"
#include "parallel/cuda/ipc_fused_norm.h"

namespace loom {

HostStagedCommunicator::HostStagedCommunicator(MPI_Comm comm, std::string name, uint32_t group_id,
                                               cuda::CudaBackend& backend, bool fused_kernel, FusedTuning tuning)
    : MpiCommunicator(comm, std::move(name), group_id), backend_(backend) {
  if (fused_kernel && size() > 1)
    set_fused_kernels(cuda::FusedNormPath::create(this->comm(), backend_, this->name(), std::move(tuning)));
}

// The only kernels this communicator installs.
const cuda::FusedNormPath* HostStagedCommunicator::fused_path() const {
  return static_cast<const cuda::FusedNormPath*>(fused_kernels());
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
  const std::vector<cuda::RankGpu> all = cuda::gather_rank_gpus(comm);
  for (size_t a = 0; a < all.size(); ++a)
    for (size_t b = a + 1; b < all.size(); ++b)
      if (!all[a].bus_id.empty() && all[a].bus_id == all[b].bus_id && all[a].machine == all[b].machine)
        return "ranks " + std::to_string(a) + " and " + std::to_string(b) + " of the group share GPU " + all[a].bus_id;
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

}  // namespace loom
