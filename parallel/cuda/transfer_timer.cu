#include "parallel/cuda/transfer_timer.h"

#include <cstdint>
#include <utility>

#include "core/cuda/cuda_check.h"

namespace loom::cuda {
namespace {

__global__ void delay_kernel(uint64_t ns) {
  uint64_t t0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  for (;;) {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (t - t0 >= ns) return;
    __nanosleep(1000);
  }
}

}  // namespace

EventTransferTimer::EventTransferTimer(std::function<cudaStream_t()> stream) : stream_(std::move(stream)) {
  LOOM_CUDA_CHECK(cudaEventCreate(&start_));
  const cudaError_t e = cudaEventCreate(&stop_);
  if (e != cudaSuccess) cudaEventDestroy(start_);
  LOOM_CUDA_CHECK(e);
}

EventTransferTimer::~EventTransferTimer() {
  cudaEventDestroy(start_);
  cudaEventDestroy(stop_);
}

void EventTransferTimer::start() { LOOM_CUDA_CHECK(cudaEventRecord(start_, stream_())); }

void EventTransferTimer::stop() { LOOM_CUDA_CHECK(cudaEventRecord(stop_, stream_())); }

std::optional<double> EventTransferTimer::seconds() {
  const cudaError_t q = cudaEventQuery(stop_);
  if (q == cudaErrorNotReady) return std::nullopt;
  LOOM_CUDA_CHECK(q);
  float ms = 0;
  LOOM_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
  return static_cast<double>(ms) * 1e-3;
}

void enqueue_delay(cudaStream_t stream, double seconds) {
  if (seconds <= 0) return;
  delay_kernel<<<1, 1, 0, stream>>>(static_cast<uint64_t>(seconds * 1e9));
  LOOM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace loom::cuda
