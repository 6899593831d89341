#include "parallel/cuda/device_trace_timer.h"

#include <pthread.h>

#include <chrono>

#include "core/cuda/cuda_check.h"
#include "core/log.h"
#include "parallel/trace.h"

namespace loom::cuda {

DeviceTraceTimer::Anchor::~Anchor() {
  if (event) cudaEventDestroy(event);
}

DeviceTraceTimer::DeviceTraceTimer(TraceRing& ring) : ring_(ring) {
  LOOM_CUDA_CHECK(cudaGetDevice(&device_));
  LOOM_CUDA_CHECK(cudaStreamCreateWithFlags(&anchor_stream_, cudaStreamNonBlocking));
  anchor_ = make_anchor();
  thread_ = std::thread([this] {
    ::pthread_setname_np(::pthread_self(), "loom-cuda-trace");
    watch();
  });
}

DeviceTraceTimer::~DeviceTraceTimer() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  // Events still pending (a collective that never completed) are released; CUDA frees them once they fire.
  for (const Pending& p : pending_) {
    cudaEventDestroy(p.start);
    cudaEventDestroy(p.end);
  }
  if (open_start_) cudaEventDestroy(open_start_);
  for (cudaEvent_t e : free_) cudaEventDestroy(e);
  anchor_.reset();
  if (anchor_stream_) cudaStreamDestroy(anchor_stream_);
}

// An event on the private stream (which waits for nothing), waited for; its trace-clock time is taken at once.
std::shared_ptr<DeviceTraceTimer::Anchor> DeviceTraceTimer::make_anchor() {
  auto a = std::make_shared<Anchor>();
  LOOM_CUDA_CHECK(cudaEventCreate(&a->event));
  LOOM_CUDA_CHECK(cudaEventRecord(a->event, anchor_stream_));
  LOOM_CUDA_CHECK(cudaEventSynchronize(a->event));
  a->trace_s = trace_clock_s();
  return a;
}

cudaEvent_t DeviceTraceTimer::take_event() {
  if (!free_.empty()) {
    cudaEvent_t e = free_.back();
    free_.pop_back();
    return e;
  }
  cudaEvent_t e = nullptr;
  LOOM_CUDA_CHECK(cudaEventCreate(&e));
  return e;
}

void DeviceTraceTimer::before(cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  LOOM_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  std::lock_guard<std::mutex> lock(mu_);
  open_captured_ = capture != cudaStreamCaptureStatusNone;
  if (open_captured_) return;
  if (!open_start_) open_start_ = take_event();  // else: a call that failed before after(); reuse its event
  LOOM_CUDA_CHECK(cudaEventRecord(open_start_, stream));
}

void DeviceTraceTimer::after(cudaStream_t stream, uint64_t seq) {
  std::unique_lock<std::mutex> lock(mu_);
  if (open_captured_) {  // captured, not run: timed at its enqueue
    open_captured_ = false;
    lock.unlock();
    ring_.end(seq, trace_clock_s());
    return;
  }
  LOOM_CHECK(open_start_ != nullptr, kInternal, "DeviceTraceTimer::after() without before()");
  cudaEvent_t end = take_event();
  LOOM_CUDA_CHECK(cudaEventRecord(end, stream));
  pending_.push_back(Pending{seq, open_start_, end, anchor_});
  open_start_ = nullptr;
}

size_t DeviceTraceTimer::pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pending_.size();
}

void DeviceTraceTimer::watch() {
  cudaStreamCaptureMode relaxed = cudaStreamCaptureModeRelaxed;
  if (cudaSetDevice(device_) != cudaSuccess || cudaThreadExchangeStreamCaptureMode(&relaxed) != cudaSuccess) {
    LOOM_WARN("collective timing: cannot use GPU " << device_ << " on the watcher thread; records stay in flight");
    return;
  }
  double last_anchor = trace_clock_s();
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    // Close every pending record whose end event has fired, oldest first (one stream per communicator: in
    // order).
    while (!pending_.empty()) {
      Pending p = pending_.front();
      const cudaError_t q = cudaEventQuery(p.end);
      if (q == cudaErrorNotReady) break;
      float start_ms = 0, end_ms = 0;
      cudaError_t e = q;
      if (e == cudaSuccess) e = cudaEventElapsedTime(&start_ms, p.anchor->event, p.start);
      if (e == cudaSuccess) e = cudaEventElapsedTime(&end_ms, p.anchor->event, p.end);
      if (e != cudaSuccess) {
        LOOM_WARN("collective timing stopped: " << cudaGetErrorString(e) << "; records stay in flight");
        return;
      }
      pending_.pop_front();
      free_.push_back(p.start);
      free_.push_back(p.end);
      const double t0 = p.anchor->trace_s;
      lock.unlock();
      ring_.end(p.seq, t0 + 1e-3 * start_ms, t0 + 1e-3 * end_ms);
      lock.lock();
    }
    if (trace_clock_s() - last_anchor > kAnchorS) {
      lock.unlock();
      std::shared_ptr<Anchor> a;
      try {
        a = make_anchor();
      } catch (const std::exception& ex) {
        LOOM_WARN("collective timing stopped: " << ex.what() << "; records stay in flight");
        return;
      }
      lock.lock();
      anchor_ = std::move(a);
      last_anchor = trace_clock_s();
    }
    cv_.wait_for(lock, std::chrono::duration<double>(kPollS), [&] { return stop_; });
  }
}

}  // namespace loom::cuda
