// Device-side pieces of the link probe (parallel/link_probe.h) for communicators whose calls only enqueue work
// (NcclCommunicator):
// - EventTransferTimer: a TransferTimer from two CUDA events recorded on the communicator's stream around the
//   receive, so it measures when the transfer ran on the device, not when the host enqueued it; seconds() polls
//   (never blocks on the device).
// - enqueue_delay(): a one-thread kernel that holds the stream for a while (~1 us resolution, on the GPU's
//   global timer): the injected slow link (fault.fault_kind = slow_link) of device sends, which must sit between
//   the sender's arrival and its transfer, in stream order, without blocking the host.
#pragma once

#include <cuda_runtime.h>

#include <functional>
#include <optional>

#include "parallel/communicator.h"

namespace loom::cuda {

class EventTransferTimer final : public TransferTimer {
 public:
  // stream(): the stream the timed calls are enqueued on, asked at start() and stop(). The current CUDA device
  // is the communicator's.
  explicit EventTransferTimer(std::function<cudaStream_t()> stream);
  ~EventTransferTimer() override;
  EventTransferTimer(const EventTransferTimer&) = delete;
  EventTransferTimer& operator=(const EventTransferTimer&) = delete;

  void start() override;
  void stop() override;
  // nullopt while stop()'s event has not fired; a CUDA error (other than not ready) throws.
  std::optional<double> seconds() override;

 private:
  std::function<cudaStream_t()> stream_;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

// Holds `stream` for `seconds` (a no-op for seconds <= 0).
void enqueue_delay(cudaStream_t stream, double seconds);

}  // namespace loom::cuda
