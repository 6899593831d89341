#include "parallel/cuda/device_trace_timer.h"

#include <pthread.h>

#include <chrono>
#include <thread>

#include "core/cuda/cuda_check.h"
#include "core/log.h"
#include "parallel/trace.h"

namespace loom::cuda {

namespace {
constexpr int kAnchorTries = 3;
}

DeviceTraceTimer::Anchor::~Anchor() {
  if (event) cudaEventDestroy(event);
}

DeviceTraceTimer::DeviceTraceTimer(TraceRing& ring) : ring_(ring) {
  LOOM_CUDA_CHECK(cudaGetDevice(&device_));
  LOOM_CUDA_CHECK(cudaStreamCreateWithFlags(&anchor_stream_, cudaStreamNonBlocking));
  cudaError_t error = cudaSuccess;
  anchor_ = make_anchor(&error, false);
  LOOM_CUDA_CHECK(error);
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
  cudaError_t error = cudaSuccess;
  if (!failed_) drain(&error);  // what has fired is closed; the rest stays in flight
  // Events still pending (a collective that never completed) are released; CUDA frees them once they fire.
  for (const Pending& p : pending_) {
    cudaEventDestroy(p.start);
    cudaEventDestroy(p.end);
  }
  if (open_start_) cudaEventDestroy(open_start_);
  for (cudaEvent_t e : free_) cudaEventDestroy(e);
  open_anchor_.reset();
  anchor_.reset();
  if (anchor_stream_) cudaStreamDestroy(anchor_stream_);
  cudaGetLastError();
}

// An event on the private stream (which waits for nothing). Its trace-clock time lies between the clock readings
// just before and just after the poll that first sees it done; the tightest bracket of a few tries is kept. Polls
// (never blocks), giving up when stop_ is set.
std::shared_ptr<DeviceTraceTimer::Anchor> DeviceTraceTimer::make_anchor(cudaError_t* error, bool can_stop) {
  std::shared_ptr<Anchor> best;
  double best_width = 1e30;
  for (int t = 0; t < kAnchorTries; ++t) {
    auto a = std::make_shared<Anchor>();
    *error = cudaEventCreate(&a->event);
    if (*error == cudaSuccess) *error = cudaEventRecord(a->event, anchor_stream_);
    if (*error != cudaSuccess) return nullptr;
    double before = trace_clock_s(), after = before;
    for (;;) {
      before = trace_clock_s();
      const cudaError_t q = cudaEventQuery(a->event);
      after = trace_clock_s();
      if (q == cudaSuccess) break;
      if (q != cudaErrorNotReady) {
        *error = q;
        return nullptr;
      }
      if (can_stop) {
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_) return nullptr;
      }
      std::this_thread::yield();
    }
    // It fired before `after`, and (the GPU being idle for this stream) about when the first poll saw it: the
    // midpoint of that poll is the estimate; the tries keep the narrowest poll.
    a->trace_s = 0.5 * (before + after);
    if (after - before < best_width) {
      best_width = after - before;
      best = std::move(a);
    }
  }
  return best;
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
  open_untimed_ = capture != cudaStreamCaptureStatusNone || failed_;
  if (open_untimed_) return;
  if (!open_start_) open_start_ = take_event();  // else: a call that failed before after(); reuse its event
  open_anchor_ = anchor_;
  LOOM_CUDA_CHECK(cudaEventRecord(open_start_, stream));
}

void DeviceTraceTimer::after(cudaStream_t stream, uint64_t seq) {
  std::unique_lock<std::mutex> lock(mu_);
  if (open_untimed_) {  // captured (not run now), or no watcher: timed at its enqueue
    open_untimed_ = false;
    lock.unlock();
    ring_.end(seq, trace_clock_s());
    return;
  }
  LOOM_CHECK(open_start_ != nullptr, kInternal, "DeviceTraceTimer::after() without before()");
  cudaEvent_t end = take_event();
  const cudaError_t rec = cudaEventRecord(end, stream);
  if (rec != cudaSuccess) {
    free_.push_back(end);
    LOOM_CUDA_CHECK(rec);
  }
  const bool was_empty = pending_.empty();
  pending_.push_back(Pending{seq, open_start_, end, std::move(open_anchor_)});
  open_start_ = nullptr;
  lock.unlock();
  if (was_empty) cv_.notify_all();
}

size_t DeviceTraceTimer::pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pending_.size();
}

bool DeviceTraceTimer::failed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failed_;
}

bool DeviceTraceTimer::drain(cudaError_t* error) {
  std::lock_guard<std::mutex> drainer(drain_mu_);
  for (;;) {
    Pending p;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (pending_.empty()) return true;
      p = pending_.front();
    }
    const cudaError_t q = cudaEventQuery(p.end);
    if (q == cudaErrorNotReady) return true;
    float start_ms = 0, end_ms = 0;
    *error = q;
    if (*error == cudaSuccess) *error = cudaEventElapsedTime(&start_ms, p.anchor->event, p.start);
    if (*error == cudaSuccess) *error = cudaEventElapsedTime(&end_ms, p.anchor->event, p.end);
    if (*error != cudaSuccess) return false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      pending_.pop_front();  // still the front: only one drainer pops
      free_.push_back(p.start);
      free_.push_back(p.end);
    }
    const double t0 = p.anchor->trace_s;
    ring_.end(p.seq, t0 + 1e-3 * start_ms, t0 + 1e-3 * end_ms);
  }
}

void DeviceTraceTimer::flush(double timeout_s) {
  const double deadline = trace_clock_s() + timeout_s;
  cudaError_t error = cudaSuccess;
  while (!failed() && drain(&error) && pending() > 0 && trace_clock_s() < deadline)
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  if (error != cudaSuccess) fail("an event query failed", error);
}

void DeviceTraceTimer::fail(const char* what, cudaError_t error) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (failed_) return;
    failed_ = true;
  }
  LOOM_WARN("collective timing on the device stopped (" << what << ": " << cudaGetErrorString(error)
                                                        << "); records are timed at their enqueue from now on");
}

void DeviceTraceTimer::watch() {
  cudaStreamCaptureMode relaxed = cudaStreamCaptureModeRelaxed;
  cudaError_t error = cudaSetDevice(device_);
  if (error == cudaSuccess) error = cudaThreadExchangeStreamCaptureMode(&relaxed);
  if (error != cudaSuccess) return fail("the watcher thread cannot use the GPU", error);
  double last_anchor = trace_clock_s();
  for (;;) {
    if (!drain(&error)) return fail("an event query failed", error);
    if (trace_clock_s() - last_anchor > kAnchorS) {
      std::shared_ptr<Anchor> a = make_anchor(&error, true);
      if (!a && error != cudaSuccess) return fail("a clock anchor failed", error);
      last_anchor = trace_clock_s();
      std::lock_guard<std::mutex> lock(mu_);
      if (a) anchor_ = std::move(a);
    }
    // Poll while something is pending; otherwise sleep until after() queues a call (or the anchor is due).
    std::unique_lock<std::mutex> lock(mu_);
    if (pending_.empty())
      cv_.wait_for(lock, std::chrono::duration<double>(kAnchorS), [&] { return stop_ || !pending_.empty(); });
    else
      cv_.wait_for(lock, std::chrono::duration<double>(kPollS), [&] { return stop_; });
    if (stop_) return;
  }
}

}  // namespace loom::cuda
