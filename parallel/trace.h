// Per-rank collective trace: every call through a Communicator (parallel/communicator.h) leaves one record
// (seq, op, group, peer, bytes, start, end) in a fixed-capacity ring, and bumps two counters, launched and
// completed. The monitor (launch/) reads the counters with each heartbeat and ships batches of records: a rank
// whose launched count lags the others is stuck outside communication; a record that stays in flight names the
// collective (and for send/recv, the peer) a rank is stuck in.
//
// Assumes one thread that begins the records (the thread that issues the collectives); they are ended by that
// thread (host-timed calls, and device-timed calls captured into a CUDA graph) or by a side thread that reads
// completion events (device-timed calls: parallel/cuda/device_trace_timer.h); any number of concurrent readers. A mutex guards the records; it is held for a
// few stores per call, which is noise next to the cost of any collective.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

namespace loom {

enum class CollectiveOp : uint8_t { kAllReduce, kReduceScatter, kAllGather, kBroadcast, kSend, kRecv, kBarrier };

// "all_reduce", "reduce_scatter", ... (the names of the Communicator calls).
const char* collective_op_name(CollectiveOp op);

// Seconds on the steady clock since the process started: the clock of trace records, and the same clock as
// the log lines (core/log.h), so a record can be matched with what the rank logged around it.
double trace_clock_s();
// Wall-clock seconds (CLOCK_REALTIME): the clock that ranks compare with each other (link transfer times, the
// monitor). Exact between the processes of one host; across hosts as good as their clock synchronisation.
double wall_clock_s();
// Seconds the calling thread has spent runnable but waiting for a CPU (the kernel's run-queue delay,
// /proc/thread-self/schedstat), or -1 where the kernel does not report it. Of another thread of this process
// (by its kernel thread id) with thread_run_delay_s(tid). One pread of a file the thread keeps open: ~0.3 us.
double thread_run_delay_s();
double thread_run_delay_s(int tid);
// Whether TraceRing reads the writer's run-queue delay around host-timed calls (two reads per call, ~0.6 us).
// Off by default; the monitor client switches it for the process (only the monitor uses it): in the default
// mode only while a writer thread waited for a CPU more than 1 % of the last heartbeat interval
// (launch/monitor/client.h, RunQueueMeter).
void set_run_delay_accounting(bool on);
bool run_delay_accounting();

struct TraceRecord {
  uint64_t seq = 0;  // 0, 1, 2, ... per ring, in the order the calls were launched
  CollectiveOp op = CollectiveOp::kBarrier;
  uint32_t group_id = 0;  // which communicator (ProcessGroups: world 0, tp 1, dp 2, node 3)
  int32_t peer = -1;      // rank in the group of the other side of a send/recv; -1 for collectives
  uint64_t bytes = 0;     // size of the full (unsharded) buffer: all_gather's out, reduce_scatter's in
  double start_s = 0;     // trace_clock_s() when launched (device-timed: when the device reached the call)
  double end_s = 0;       // trace_clock_s() when completed; 0 while in flight
  bool side = false;      // side traffic (the link probe: Communicator::SideTraffic); not shipped to the monitor
};

class TraceRing {
 public:
  static constexpr size_t kDefaultCapacity = 4096;

  // Registers itself with the process's registry (parallel/link_trace.h) so the monitor client finds it.
  explicit TraceRing(size_t capacity = kDefaultCapacity);
  ~TraceRing();
  TraceRing(const TraceRing&) = delete;
  TraceRing& operator=(const TraceRing&) = delete;

  // Writer side. begin() opens a record stamped now and returns its seq; end() closes it. A record whose
  // slot was reused before end() (more than capacity() calls in flight) still counts as completed.
  // end(seq) on the thread that called begin() (host-timed collectives) names that thread the ring's writer and,
  // with run_delay_accounting() on at begin(), adds the thread's run-queue delay between the two to
  // run_delay_inside_s(): the monitor separates the time a rank spent waiting for a CPU outside collectives (the
  // host's scheduler, not the rank) from its own time.
  // side: a call of side traffic (Communicator::SideTraffic), counted apart in side_launched()/side_completed().
  uint64_t begin(CollectiveOp op, uint32_t group_id, int32_t peer, uint64_t bytes, bool side = false);
  void end(uint64_t seq);
  // With an explicit completion time, for backends that learn it later (GPU events read by a side thread);
  // with start_s too, the record's start moves to it (when the device reached the call, which is after
  // begin() enqueued it: a start before begin()'s stamp is taken as that stamp).
  void end(uint64_t seq, double end_s);
  void end(uint64_t seq, double start_s, double end_s);

  // Reader side. The records with seq >= since_seq that are still in the ring, oldest first (in-flight ones
  // included, with end_s == 0). A reader that keeps up passes the seq after the last one it saw.
  std::vector<TraceRecord> snapshot(uint64_t since_seq = 0) const;
  uint64_t launched() const { return launched_.load(std::memory_order_acquire); }    // begin() calls
  uint64_t completed() const { return completed_.load(std::memory_order_acquire); }  // end() calls
  // Of those, the side traffic's (which need not be the same on every rank of a group, unlike its collectives:
  // the monitor compares launched() - side_launched() across ranks). A side record whose slot was reused before
  // its end() is counted as completed collective work (more than capacity() calls in flight: not in practice).
  uint64_t side_launched() const { return side_launched_.load(std::memory_order_acquire); }
  uint64_t side_completed() const { return side_completed_.load(std::memory_order_acquire); }
  // The group's collectives (and its model's point-to-point calls) begun so far: the same count on every rank.
  uint64_t collectives_launched() const { return launched() - side_launched(); }
  size_t capacity() const { return records_.size(); }
  // Total seconds between start and end of the completed calls.
  double busy_s() const { return busy_s_.load(std::memory_order_acquire); }
  // Run-queue delay of the writer thread inside the host-timed collectives that ran with accounting on, and that
  // thread's kernel id: 0 until the first host-timed end() (and for rings closed only by end(seq, t): GPU events
  // read by a side thread); -1 once calls were begun or ended on different threads, or a read failed (no figure
  // for the ring then).
  double run_delay_inside_s() const { return run_delay_inside_s_.load(std::memory_order_acquire); }
  int writer_tid() const { return writer_tid_.load(std::memory_order_acquire); }
  // For a ring whose records another thread ends (device-timed): the thread that begins them is the writer from
  // now on (it never waits inside them, so run_delay_inside_s() stays 0 for them), so the monitor client still
  // gets that thread's run-queue figure.
  void set_device_timed(bool on);

 private:
  mutable std::mutex mutex_;
  std::vector<TraceRecord> records_;  // record seq lives in slot seq % capacity
  // Atomic so a heartbeat can read them without the mutex; written only under it.
  std::atomic<uint64_t> launched_{0};
  std::atomic<uint64_t> completed_{0};
  std::atomic<uint64_t> side_launched_{0};
  std::atomic<uint64_t> side_completed_{0};
  std::atomic<double> busy_s_{0};
  void finish(uint64_t seq, double start_s, double end_s, bool host_timed);  // end() under one lock (start_s < 0: keep)

  std::atomic<double> run_delay_inside_s_{0};
  bool device_timed_ = false;
  std::atomic<int> writer_tid_{0};
  // The open host-timed call: its seq and the writer's run-queue delay at begin() (-1: none or unknown).
  uint64_t open_seq_ = 0;
  double open_run_delay_ = -1;
  int open_tid_ = 0;
};

}  // namespace loom
