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
#include <mutex>
#include <string>
#include <thread>

namespace loom::mon {

struct ClientOptions {
  std::string address;  // host:port
  std::string job, token;
  int64_t epoch = 0;
  double heartbeat_s = 1.0;
  int rank = 0, node = 0, tp_rank = 0, dp_rank = 0;
  int world = 1, local_size = 1;  // ranks of the job, ranks on this rank's node
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
