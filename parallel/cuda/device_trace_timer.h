// DeviceTraceTimer: closes the trace records (parallel/trace.h) of a device communicator whose calls only enqueue
// work (NcclCommunicator) from CUDA events, so the monitor sees when each collective really ran:
//   start = when the stream reached the call (the rank "arrived": the kernels before it had finished),
//   end   = when the collective completed (every peer had contributed),
// both on the trace clock. A rank that arrives last then has the shortest own time, as on the host path, which
// is what the monitor's slow-rank rule reads; a collective that never completes stays in flight.
//
// Around each call: before(stream) records a start event, after(stream, seq) an end event and queues the pair. A
// watcher thread (one per timer) polls the oldest pending end event every kPollS while any is pending (and sleeps
// otherwise); when it has fired, the two events' times, converted with an anchor event whose trace-clock time is
// known, close the record with TraceRing::end(seq, start, end). Anchors: recorded on a private stream; the time
// is read between two clock readings around the moment the event is seen done, and the tightest of a few tries
// is kept; renewed every kAnchorS (never waited for without a way out) so the float milliseconds of
// cudaEventElapsedTime keep microsecond resolution. Each pair keeps the anchor that was current at before(),
// which was recorded before the pair's start event.
//
// flush(timeout) closes, on the calling thread, every record whose end event fires within the timeout (the
// Session calls it before the monitor's last heartbeat, so a finished rank reports its collectives completed).
// A call enqueued while its stream is being captured into a CUDA graph is not run then: its record is closed at
// once, timed at its enqueue (the graph's replays are not traced). The watcher thread works in the relaxed
// capture mode, so its queries never interfere with a capture another thread runs.
//
// Events come from a pool (no allocation per call after warm-up). If the watcher fails (an event query or an
// anchor fails: a broken context), it logs once and stops; from then on each call's record is closed at its
// enqueue and no events are recorded, and the records it left pending stay in flight, as the collectives of a
// broken context do. Destruction stops the watcher, closes the records whose events have fired, and releases the
// others without waiting for them (stop it before aborting the collectives: they then stay in flight).
#pragma once

#include <cuda_runtime.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace loom {

class TraceRing;

namespace cuda {

class DeviceTraceTimer {
 public:
  static constexpr double kPollS = 0.002;
  static constexpr double kAnchorS = 10.0;

  // The current CUDA device is the one the calls run on.
  explicit DeviceTraceTimer(TraceRing& ring);
  ~DeviceTraceTimer();
  DeviceTraceTimer(const DeviceTraceTimer&) = delete;
  DeviceTraceTimer& operator=(const DeviceTraceTimer&) = delete;

  // Called by the writer thread around one enqueued call (before() first, then the call's work on `stream`).
  void before(cudaStream_t stream);
  void after(cudaStream_t stream, uint64_t seq);
  // Closes every pending record whose end event fires within timeout_s (on the calling thread; polls, never
  // blocks on the device).
  void flush(double timeout_s);
  // Records queued and not yet closed.
  size_t pending() const;
  bool failed() const;  // the watcher stopped on an error

 private:
  struct Anchor {
    cudaEvent_t event = nullptr;
    double trace_s = 0;  // trace_clock_s() when it fired
    ~Anchor();
  };
  struct Pending {
    uint64_t seq;
    cudaEvent_t start, end;
    std::shared_ptr<Anchor> anchor;
  };
  // A new anchor; null when CUDA failed (error says how) or, with can_stop (the watcher), when stop_ came first.
  std::shared_ptr<Anchor> make_anchor(cudaError_t* error, bool can_stop);
  cudaEvent_t take_event();  // under mu_
  // Closes the pending records whose end events have fired, oldest first; false on a CUDA error. Takes
  // drain_mu_ (one drainer at a time: the watcher or flush()), mu_ only around the queue.
  bool drain(cudaError_t* error);
  void fail(const char* what, cudaError_t error);
  void watch();

  TraceRing& ring_;
  int device_ = 0;
  cudaStream_t anchor_stream_ = nullptr;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool failed_ = false;
  std::mutex drain_mu_;
  std::shared_ptr<Anchor> anchor_;       // the current one
  cudaEvent_t open_start_ = nullptr;     // before()'s event, until after()
  std::shared_ptr<Anchor> open_anchor_;  // the anchor current at before()
  bool open_untimed_ = false;            // before() found its stream capturing, or the watcher failed
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> free_;        // the pool
  std::thread thread_;
};

}  // namespace cuda
}  // namespace loom
