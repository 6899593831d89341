// Link-level tracing and fault hooks of the host (MPI) collectives: the monitor's view below the collective.
//
// The MPI communicator runs all_reduce, reduce_scatter and all_gather as rings of point-to-point transfers
// (parallel/mpi_communicator.cc). Every transfer carries the sender's clock at the moment it was ready to send,
// so the receiver measures the transfer's own time: arrival − max(sender ready, receiver ready). Waiting for a
// late peer is not in it, so a slow rank does not look like a slow link; a delay on the wire (or an injected
// one) is all in it. Receivers accumulate these per source world rank (LinkStats), and the monitor builds the
// pairwise transfer-time matrix from them.
//
// While a transfer is in flight, the rank publishes where it is (TransferState): which collective (group, seq),
// which ring step, from whom it receives, to whom it sends, and whether its receive already completed. When a
// job hangs with every rank inside the same collective, those states name the stalled pair: the receiver that
// waits at step k on a sender that reached step k and already received its own input is stuck on that link.
//
// One instance per process (process_link_trace()); written by the thread that issues collectives, read by the
// monitor client's thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

namespace loom {

struct LinkStats {
  int src = -1;            // world rank of the sender
  uint64_t transfers = 0;  // transfers received from it
  uint64_t bytes = 0;
  double sum_s = 0;  // total transfer time
  double max_s = 0;
};

struct TransferState {
  bool active = false;
  uint32_t group_id = 0;
  uint64_t seq = 0;       // the collective's index in its group (TraceRing::collectives_launched() at its begin - 1)
  int step = 0;           // ring step inside the collective
  int recv_src = -1;      // world ranks
  int send_dst = -1;
  bool recv_done = false;  // this rank's receive of the step completed; it is sending
  double since_s = 0;      // trace_clock_s() when the step began
};

class LinkTrace {
 public:
  // Receiver side: one completed transfer from world rank src; probe: a link probe's (parallel/link_probe.h),
  // kept apart from the ring's transfers, whose sizes differ, so the monitor compares like with like.
  void record(int src, double transfer_s, uint64_t bytes, bool probe = false);
  // Stats accumulated since the previous call, one entry per source; resets them. take(): the ring's;
  // take_probes(): the probes'.
  std::vector<LinkStats> take();
  std::vector<LinkStats> take_probes();

  void begin_transfer(uint32_t group_id, uint64_t seq, int step, int recv_src, int send_dst);
  void recv_done();
  void end_transfer();
  TransferState state() const;

 private:
  mutable std::mutex mutex_;
  std::map<int, LinkStats> stats_, probe_stats_;
  TransferState state_;
};

LinkTrace& process_link_trace();

// Faults the communicators inject into their own transfers (set by the trainer's fault injection).
class CommFaults {
 public:
  // Every transfer from this rank to world rank dst is delayed by delay_s (a slow link); 0 clears it.
  void set_slow_link(int dst, double delay_s);
  // This rank's next transfer receives its input and then never sends (a dead link inside a collective).
  void arm_hang() { hang_.store(true); }
  // The delay every transfer from this rank to world rank dst gets (0: none).
  double send_delay_s(int dst) const {
    return slow_dst_.load(std::memory_order_relaxed) == dst ? slow_delay_s_.load(std::memory_order_relaxed) : 0.0;
  }
  // Point-to-point sends on the host (Communicator::send): sleeps for a slow link to dst. Device backends enqueue
  // send_delay_s(dst) on their stream instead. An armed hang is for ring transfers only.
  void delay_send(int dst) {
    if (send_delay_s(dst) > 0) sleep_for_slow_link();
  }
  // Called by a transfer before it sends to dst, after its receive was posted; `wait_recv` completes the
  // receive. Sleeps for a slow link; never returns for an armed hang.
  template <class WaitRecv>
  void before_send(int dst, WaitRecv&& wait_recv) {
    if (hang_.load(std::memory_order_relaxed)) {
      wait_recv();
      hang_forever(dst);
    }
    if (send_delay_s(dst) > 0) {
      wait_recv();  // the delay is on this rank's outgoing link only: its own receive is timed without it
      sleep_for_slow_link();
    }
  }

 private:
  [[noreturn]] void hang_forever(int dst);
  void sleep_for_slow_link();
  std::atomic<bool> hang_{false};
  std::atomic<int> slow_dst_{-1};
  std::atomic<double> slow_delay_s_{0};
};

CommFaults& process_comm_faults();

// Every TraceRing of the process (one per communicator), for the monitor client: it sums their counters.
class TraceRing;
void register_trace_ring(const TraceRing* ring);
void unregister_trace_ring(const TraceRing* ring);
// Calls fn(ring) for each live ring, under the registry's lock.
template <class F>
void for_each_trace_ring(F&& fn);

namespace detail {
std::mutex& trace_registry_mutex();
std::vector<const TraceRing*>& trace_registry();
}  // namespace detail

template <class F>
void for_each_trace_ring(F&& fn) {
  std::lock_guard<std::mutex> lock(detail::trace_registry_mutex());
  for (const TraceRing* r : detail::trace_registry()) fn(*r);
}

}  // namespace loom
