// MonitorClient: a rank's side of the monitor protocol (launch/monitor/protocol.h). A thread connects to the
// monitor, says HELLO, then every heartbeat_s sends a HEARTBEAT (progress, collective counters, the transfer in
// flight, link stats) and a TRACE of the collectives completed since the last one; stop() says BYE.
//
// It never disturbs training: a monitor that cannot be reached or that drops the connection is retried in the
// background, and the training thread only stores a few atomics (set_progress).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace loom::mon {

// The heartbeat's run-queue figure (runq_s): how long the threads that issue collectives waited for a CPU outside
// collectives, cumulative. Per writer thread and heartbeat interval it is the growth of the thread's run-queue
// delay (thread_run_delay_s(tid)) minus the growth of the part inside collectives (TraceRing's
// run_delay_inside_s). The inside part needs two reads around every collective (~0.6 us a call), so in mode
// "auto" TraceRing reads them only while they matter: while some writer waited for a CPU more than kOnShare of
// the last interval (an oversubscribed host), off again below kOffShare. While off, a collective's own wait
// counts as outside, an error of at most the writer's whole run-queue delay: under kOnShare of the interval
// against the monitor's 6-point threshold, except in the heartbeat interval after which the reads switch on
// (up to that interval's whole wait). "on" reads around every call; "off" never, and sends no figure.
// The figure starts from the thread's outside wait before it was first seen; it may dip (the monitor uses
// differences only, and takes any value, negative too).
class RunQueueMeter {
 public:
  enum class Mode { kAuto, kOn, kOff };
  static constexpr double kOnShare = 0.01, kOffShare = 0.005;
  static Mode parse(const std::string& mode);  // "auto", "on", "off"; anything else throws kConfig

  explicit RunQueueMeter(Mode mode);
  struct Writer {
    int tid = 0;
    double total_s = 0;   // thread_run_delay_s(tid) now (< 0: not readable)
    double inside_s = 0;  // the summed run_delay_inside_s() of its rings now
  };
  // One heartbeat: the writers' counters now, the seconds since the last call, and whether some ring had two
  // writers. Returns the cumulative figure to send, or nothing (mode off, no writer, a failed read, two writers).
  // Afterwards accounting() says whether TraceRing should read around each call until the next heartbeat.
  std::optional<double> update(const std::vector<Writer>& writers, double interval_s, bool mixed_writers);
  bool accounting() const { return accounting_; }

 private:
  Mode mode_;
  bool accounting_;
  std::map<int, Writer> last_;  // per writer thread: its counters at the last heartbeat
  double outside_s_ = 0;
};

struct ClientOptions {
  std::string address;  // host:port
  std::string job, token;
  int64_t epoch = 0;
  double heartbeat_s = 1.0;
  int rank = 0, node = 0, tp_rank = 0, dp_rank = 0;
  int world = 1, local_size = 1;  // ranks of the job, ranks on this rank's node
  RunQueueMeter::Mode run_queue = RunQueueMeter::Mode::kAuto;  // monitor.run_queue
};

class MonitorClient {
 public:
  explicit MonitorClient(ClientOptions options);
  ~MonitorClient();  // stop("done") if not stopped
  MonitorClient(const MonitorClient&) = delete;
  MonitorClient& operator=(const MonitorClient&) = delete;

  void set_progress(int64_t step, double loss, double tokens_per_s);
  void set_snapshot(int64_t version) { snapshot_.store(version, std::memory_order_relaxed); }
  // The step this incarnation resumed from (0 for a fresh start).
  void set_start_step(int64_t step) {
    start_step_.store(step, std::memory_order_relaxed);
    step_.store(step, std::memory_order_relaxed);
  }
  // Sends a last heartbeat and BYE (reason "done" or "error" with the message) and joins the thread.
  void stop(const std::string& reason = "done", const std::string& message = "");
  bool connected() const { return connected_.load(); }

 private:
  void run();
  ClientOptions opt_;
  std::atomic<int64_t> step_{0}, snapshot_{-1}, start_step_{-1};
  std::atomic<double> loss_{0}, tokens_per_s_{0};
  std::atomic<bool> connected_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::string bye_reason_ = "done", bye_message_;
  std::thread thread_;
};

}  // namespace loom::mon
