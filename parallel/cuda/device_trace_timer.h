// DeviceTraceTimer: closes the trace records (parallel/trace.h) of a device communicator whose calls only enqueue
// work (NcclCommunicator) from CUDA events, so the monitor sees when each collective really ran:
//   start = when the stream reached the call (the rank "arrived": the kernels before it had finished),
//   end   = when the collective completed (every peer had contributed),
// both on the trace clock. A rank that arrives last then has the shortest own time, as on the host path, which
// is what the monitor's slow-rank rule reads; a collective that never completes stays in flight.
//
// Around each call: before(stream) records a start event, after(stream, seq) an end event and queues the pair. A
// watcher thread (one per timer) polls the oldest pending end event every kPollS; when it has fired, the two
// events' times, converted with an anchor event whose trace-clock time is known, close the record with
// TraceRing::end(seq, start, end). Anchors: one at construction (recorded on a private stream and waited for; its
// time is taken right after, a few microseconds late), renewed every kAnchorS so the float milliseconds of
// cudaEventElapsedTime keep microsecond resolution; each pending pair keeps the anchor that was current when it
// was recorded (so the anchor is always the older event).
//
// A call enqueued while its stream is being captured into a CUDA graph is not run then: its record is closed at
// once, timed at its enqueue (the graph's replays are not traced). The watcher thread works in the relaxed
// capture mode, so its queries never interfere with a capture another thread runs.
//
// Events come from a pool (no allocation per call after warm-up). If an event query fails (a sticky CUDA error),
// the watcher logs it once and stops: the records stay in flight, as the collectives of a broken context do.
// Destruction stops the watcher; pending events are released without waiting for them.
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
  // Records queued and not yet closed.
  size_t pending() const;

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
  std::shared_ptr<Anchor> make_anchor();
  cudaEvent_t take_event();  // under mu_
  void watch();

  TraceRing& ring_;
  int device_ = 0;
  cudaStream_t anchor_stream_ = nullptr;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::shared_ptr<Anchor> anchor_;       // the current one
  cudaEvent_t open_start_ = nullptr;     // before()'s event, until after()
  bool open_captured_ = false;           // before() found its stream capturing
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> free_;        // the pool
  std::thread thread_;
};

}  // namespace cuda
}  // namespace loom
