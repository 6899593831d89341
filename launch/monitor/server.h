// MonitorServer: `loom monitor` — one per job. A Boost.Asio TCP server (one thread) that takes the ranks'
// HELLO/HEARTBEAT/TRACE/BYE frames (launch/monitor/protocol.h), feeds the verdict engine
// (launch/monitor/engine.h), writes each verdict as JSON to verdict_dir, and on the same port answers HTTP:
//   GET /              the status page (ranks, nodes, step, tokens/s, collective latency heatmap, snapshot
//                      versions, verdicts), refreshed by the page itself from /status.json
//   GET /status.json   the same data as JSON
//   GET /metrics       Prometheus text format
// Refused and malformed frames close their connection and are counted; nothing a peer sends can stop it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "launch/monitor/engine.h"

namespace loom::mon {

struct MonitorOptions {
  std::string job = "job";
  std::string token;        // ranks must present it; "" accepts any (not for shared machines)
  int64_t epoch = 0;
  std::string bind = "0.0.0.0";
  int port = 0;             // 0: any free port
  std::string verdict_dir;  // "" -> no files
  double tick_s = 0.1;
  EngineConfig engine;
};

struct MonitorCounters {
  uint64_t frames = 0, connections = 0, refused_token = 0, refused_epoch = 0, refused_job = 0, malformed = 0,
           http_requests = 0;
};

class MonitorServer {
 public:
  explicit MonitorServer(MonitorOptions options);
  ~MonitorServer();
  MonitorServer(const MonitorServer&) = delete;
  MonitorServer& operator=(const MonitorServer&) = delete;

  // Binds and starts the server thread; throws kComm when the port cannot be bound.
  void start();
  void stop();
  int port() const { return port_; }

  // A new incarnation: ranks of older epochs are refused from now on; the engine starts afresh but keeps what
  // it learned of the collectives' timing.
  void begin_epoch(int64_t epoch);
  // The current epoch's verdict, waiting up to timeout_s for one.
  std::optional<Verdict> wait_verdict(double timeout_s);
  std::vector<Verdict> verdicts() const;  // of every epoch, oldest first
  // Called on the server thread when a verdict is reached (after its file is written).
  void on_verdict(std::function<void(const Verdict&)> fn);

  MonitorCounters counters() const;
  std::string status_json() const;
  std::string metrics_text() const;
  // The current epoch's progress: ranks heard from, alive, their lowest and highest step, and the lowest step
  // they resumed from (-1 until every rank has said).
  struct Progress {
    int ranks = 0, alive = 0;
    int64_t min_step = 0, max_step = 0, start_step = -1;
  };
  Progress progress() const;

 private:
  class Connection;
  friend class Connection;
  void accept();
  void tick();
  // Handles one decoded frame; false to close the connection (refused or malformed).
  bool handle(Connection& c, const MonMessage& m);
  void lost(Connection& c);
  std::string http_response(const std::string& request_line);
  std::string status_json_locked() const;

  MonitorOptions opt_;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
  std::thread thread_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::unique_ptr<VerdictEngine> engine_;
  std::vector<Verdict> verdicts_;
  MonitorCounters counters_;
  std::function<void(const Verdict&)> on_verdict_;
  double started_at_ = 0;
  double last_tick_ = 0;
  uint64_t stalls_ = 0;  // ticks skipped because this process did not run
};

// The HTML of the status page (launch/monitor/page.cc); it renders /status.json in the browser.
std::string status_page_html();

}  // namespace loom::mon
