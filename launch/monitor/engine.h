// The monitor's verdict engine: what the ranks' heartbeats and collective traces say about the job, and the
// verdict when something is wrong. Pure logic over timestamped events (no sockets, no clock of its own), so
// tests drive it with synthetic time.
//
// C4's insight: collectives are periodic and homogeneous, so an anomaly in them points at the faulty component.
//   crash     a rank's connection closes without BYE, or its heartbeats stop for silence_factor intervals. The
//             engine waits crash_grace_s after the first loss (when one process dies, mpirun kills the rest)
//             and names the first rank lost.
//   hang      a rank makes no progress (completes no collective) for max(hang_min_s, hang_factor × p99 of the
//             learned gaps between its completed collectives). The ranks with the fewest launched collectives
//             that are not inside one are stuck outside communication; when every rank launched the same
//             number, the in-flight ring transfers name the stalled pair: a receiver waiting at step k on a
//             sender that reached step k and already has its own input.
//   slow rank over windows of window_s, each rank's fraction of time spent waiting: the slow rank is the
//             one that waits least (the others wait for it). Time the rank spent runnable but waiting for a
//             CPU outside collectives (run-queue delay, where every rank reports it) counts as waiting: it is the
//             host's scheduler, not the rank (on the oversubscribed 2-core CI VM the ranks waited 4-21 % of each
//             5 s window for a CPU outside collectives, a different rank most each time). Ranks are not symmetric even when healthy (ring
//             position, TP role, a core shared with a daemon: a fault-free 2-core CI run showed one rank 12
//             points below the others for minutes), so each rank's deviation from the median of the others is
//             learned over slow_baseline_windows windows (after the first, start-up window), together with
//             the window-to-window noise around it (RMS over the ranks), and both are then followed slowly on
//             windows without a candidate. Named when the same rank falls below its own baseline by the
//             threshold — slow_noise_factor × the noise, at least slow_rank_gap (slow_rank_gap_without_runq
//             when some rank does not report its run-queue delay) — in slow_windows consecutive windows, or
//             (slow from the start, before or without a baseline) slow_rank_abs_gap below the median of the
//             others. A rank slowed because something else takes its CPU is therefore not named slow (its
//             wait for the CPU counts as waiting).
//   slow link the pairwise matrix of mean transfer times (receiver-measured, waiting excluded): a pair above
//             slow_link_factor × the median of the other pairs of its class — within a node, or between nodes:
//             other links — (and slow_link_min_s above it) in slow_windows consecutive windows. The link probes'
//             transfers (parallel/link_probe.h) form a matrix of their own, judged where the ring's has no
//             candidate.
//   error     a rank says BYE with reason=error (a deterministic failure: restarting would repeat it).
// One verdict per incarnation: after it the job is aborted, and what follows is its consequence.
#pragma once

#include <deque>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "launch/monitor/protocol.h"

namespace loom::mon {

struct EngineConfig {
  double heartbeat_s = 1.0;
  double silence_factor = 1.75;
  double crash_grace_s = 0.3;
  double hang_factor = 5.0;
  double hang_min_s = 3.0;
  int hang_min_samples = 20;
  double window_s = 5.0;
  int slow_windows = 3;
  double slow_rank_gap = 0.06;      // the least drop below the baseline that names a rank
  double slow_rank_gap_without_runq = 0.12;  // ... when some rank does not report its run-queue delay
  double slow_noise_factor = 4.0;   // ... and the drop in units of the learned spread around the baseline
  double slow_rank_abs_gap = 0.30;
  int slow_baseline_windows = 4;
  double slow_baseline_follow = 0.1;  // weight of a window without a candidate in the baseline (EMA)
  double slow_link_factor = 4.0;
  double slow_link_min_s = 0.0001;
};

struct RankView {
  int rank = -1;
  int node = -1;
  std::string host;
  int64_t pid = 0;
  int tp_rank = 0, dp_rank = 0;
  int world = 0, local_size = 0;  // from HELLO: ranks of the job, ranks on this rank's node
  bool connected = false, bye = false;
  std::string bye_reason, bye_message;
  double hello_at = 0, last_heartbeat = 0, disconnected_at = 0, last_progress = 0;
  int64_t step = 0, snapshot = -1, start_step = -1;  // start_step: where this incarnation resumed; -1 unknown
  double loss = 0, tokens_per_s = 0;
  uint64_t launched = 0, completed = 0;
  uint64_t side_open = 0;  // calls of side traffic (the link probe) in flight: inside communication too
  double busy_s = 0, wall_s = 0;
  // Run-queue delay outside collectives (cumulative from any origin, so it may be negative); NaN: the rank does
  // not report it.
  double runq_s = std::numeric_limits<double>::quiet_NaN();
  TransferState xfer;
  double last_end = 0;  // newest completed collective seen in TRACE
  // Window start values of busy_s and wall_s (slow-rank detection).
  double win_busy = -1, win_wall = -1, win_runq = std::numeric_limits<double>::quiet_NaN();
};

struct Verdict {
  std::string kind;  // crash | hang | slow_rank | slow_link | error
  std::string summary;
  std::vector<int> ranks;
  int node = -1;
  std::string host;
  int link_src = -1, link_dst = -1;
  double detected_at = 0, onset = 0;
  std::string evidence = "{}";  // JSON object
  std::string to_json(const std::string& job, int64_t epoch) const;
};

// Mean latency of one collective kind in one group, per rank (the status page's heatmap).
struct LatencyCell {
  uint64_t count = 0;
  double sum_s = 0;
};

class VerdictEngine {
 public:
  explicit VerdictEngine(EngineConfig cfg = {});

  void hello(const RankView& info, double now);
  // Applies a HEARTBEAT (throws kComm on malformed fields; the rank's state is unchanged then).
  void heartbeat(int rank, const MonMessage& m, double now);
  // `truncated`: the rank left out older records (it ships at most a bounded batch per heartbeat), so the gap
  // to the previous batch is unknown.
  void trace(int rank, const std::vector<TraceRecord>& recs, double now, bool truncated = false);
  void bye(int rank, const std::string& reason, const std::string& message, double now);
  void disconnect(int rank, double now);
  // Evaluates the rules at time now; returns the incarnation's verdict once.
  std::optional<Verdict> tick(double now);
  // The monitor itself did not run for `seconds` (an overloaded machine): whatever the ranks sent meanwhile is
  // still unread, so silence and lack of progress over that time are not held against them.
  void monitor_stalled(double seconds);

  const std::map<int, RankView>& ranks() const { return ranks_; }
  const std::optional<Verdict>& verdict() const { return verdict_; }
  const EngineConfig& config() const { return cfg_; }
  double p99_gap_s() const;
  double hang_threshold_s() const;
  // (group name/op) -> rank -> latency, from TRACE.
  const std::map<std::string, std::map<int, LatencyCell>>& latency() const { return latency_; }
  // Pair (src, dst) -> mean transfer time over the last complete window (the ring's; the probes' where the ring
  // has none).
  const std::map<std::pair<int, int>, double>& last_link_means() const { return last_link_means_; }
  // Rank -> fraction of its time waiting (inside collectives, plus run-queue delay outside them where every
  // rank reports it) over the last complete window, and its deviation from the median of the others' (what the
  // slow-rank rule compares with the rank's learned baseline).
  const std::map<int, double>& last_comm_fraction() const { return last_frac_; }
  const std::map<int, double>& last_deviation() const { return last_dev_; }
  const std::map<int, double>& baseline_deviation() const { return dev_base_; }
  // Rank -> fraction of the last complete window it waited for a CPU outside collectives (the part of
  // last_comm_fraction that is not time inside collectives); ranks that do not report it are absent.
  const std::map<int, double>& last_run_queue() const { return last_runq_; }
  // The learned window-to-window noise of the deviations (RMS), and the drop below its baseline that names a
  // rank now: max(slow_rank_gap, slow_noise_factor × noise).
  double slow_noise() const;
  double slow_rank_threshold() const;

 private:
  std::optional<Verdict> check_crash(double now);
  std::optional<Verdict> check_hang(double now);
  std::optional<Verdict> close_window(double now);
  std::optional<Verdict> localise_hang(double now, double threshold);
  // The slow pair of a matrix of mean transfer times: the slowest of its class (within a node, or between nodes)
  // against the median of the others of that class; none (src -1) when no class has one.
  struct LinkPick {
    std::pair<int, int> pair{-1, -1};
    double worst = 0, med = 0;
  };
  LinkPick pick_slow_link(const std::map<std::pair<int, int>, double>& means) const;
  bool any_bye() const;

  EngineConfig cfg_;
  std::map<int, RankView> ranks_;
  std::optional<Verdict> verdict_;
  std::deque<double> gaps_;  // progress gaps, newest last
  std::map<std::string, std::map<int, LatencyCell>> latency_;
  // Slow-rank/link windows.
  double window_start_ = -1;
  std::map<std::pair<int, int>, LinkStats> window_links_, window_probes_;  // the ring's; the link probes'

  std::map<std::pair<int, int>, double> last_link_means_;
  int rank_streak_ = 0, rank_candidate_ = -1;
  int rank_windows_seen_ = 0;                        // complete windows (every rank reporting, progressing)
  std::map<int, double> dev_base_;  // rank -> its usual deviation from the others' median
  std::map<int, double> dev_m2_;    // rank -> sum of squared residuals over the baseline windows (Welford)
  double noise2_ = -1;              // learned mean squared residual; -1 until the baseline is learned
  bool runq_reported_ = false;      // every rank reported its run queue over the last window
  std::map<int, double> last_frac_, last_dev_, last_runq_;  // the last complete window's (see last_comm_fraction)
  int link_streak_ = 0;
  std::pair<int, int> link_candidate_{-1, -1};
  std::vector<std::string> rank_windows_, link_windows_;  // evidence of the current streaks
};

}  // namespace loom::mon
