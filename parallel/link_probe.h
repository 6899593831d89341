// LinkProbe: measures the links of a group whose communicator does not time its own transfers (NCCL: its
// collectives are opaque), so the monitor's slow-link rule has the same evidence on GPUs as on the host path
// (parallel/link_trace.h, docs/monitor.md). C4's probing idea, kept small enough to run every step.
//
// run() is collective over the group (every rank calls it at the same point, e.g. after each step). It runs the
// next `rounds` rounds of a schedule in which each round pairs ranks disjointly and, over one cycle of rounds,
// every probed pair meets once: all pairs (the circle method) in groups of up to kAllPairsMax ranks, else the
// ring neighbours (r, r+1) — the links ring collectives use, without every rank connecting to every other.
// A pair (lo, hi) measures lo -> hi, then hi -> lo. One direction src -> dst:
//   src: send(token), send(data)         dst: recv(token), timer.start, recv(data), timer.stop
// The token (4 bytes) makes the receiver start timing only once the sender has reached the probe, so a late
// (slow) sender is waited for outside the timed part and does not look like a slow link, while anything on the
// wire — an injected delay included (CommFaults: held before each send to the slow peer, so the data's delay is
// inside) — is inside it. On a device the receiver's timed part also holds the sender's host time between
// enqueuing the two sends (microseconds; a sender preempted right there would add to it). The time goes to
// process_link_trace() as one probe transfer from src (world ranks), with the data's size; on a device it is
// read from CUDA events once the stream got there (collect(), called by run(); so usually one call late). The
// calls are side traffic (Communicator::SideTraffic): an odd group leaves a rank out of each round, so they
// must not count among the group's collectives, which the monitor compares across ranks.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/backend.h"
#include "parallel/communicator.h"

namespace loom {

struct LinkProbeOptions {
  int64_t bytes = int64_t{1} << 20;  // data per transfer (rounded down to a multiple of 4)
  int rounds = 0;                    // rounds per run(); 0: a whole cycle (every probed pair once)
};

class LinkProbe {
 public:
  static constexpr int kAllPairsMax = 8;
  static constexpr size_t kMaxPending = 4096;  // timed transfers waiting for their device (the oldest dropped)

  // comm's tensors live on backend's device. Allocates the buffers (collective-free).
  LinkProbe(Communicator& comm, Backend& backend, LinkProbeOptions opt = {});
  ~LinkProbe();
  LinkProbe(const LinkProbe&) = delete;
  LinkProbe& operator=(const LinkProbe&) = delete;

  // The next opt.rounds rounds of the schedule (collective over the group), then collect().
  // The destructor frees the buffer through the backend, which waits for the device.
  void run();
  // Records the transfers whose times are known, oldest first.
  void collect();
  // Transfers timed and not yet recorded.
  size_t pending() const { return pending_.size(); }

  // The schedule: the pairs (lo, hi) of group ranks, lo < hi, that meet in `round` (any non-negative number;
  // it repeats every cycle_rounds(n) rounds). Pure functions, the same on every rank.
  static std::vector<std::pair<int, int>> pairs(int n, int64_t round);
  static int cycle_rounds(int n);

 private:
  void send_to(int peer);
  void recv_from(int peer);

  Communicator& comm_;
  Backend& backend_;
  LinkProbeOptions opt_;
  void* buffer_ = nullptr;  // [token (4 bytes) | data]
  Tensor token_, data_;
  int64_t next_round_ = 0;
  struct Pending {
    int src;  // world rank
    std::unique_ptr<TransferTimer> timer;
  };
  std::deque<Pending> pending_;
  std::vector<std::unique_ptr<TransferTimer>> free_;
};

// Which groups a job probes (monitor.link_probe): "auto" those whose communicator does not trace its own links,
// "on" every group of two or more ranks, "off" none.
bool link_probe_wanted(const std::string& mode, const Communicator& comm);

}  // namespace loom
