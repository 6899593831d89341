// loom monitor: the communication monitor of one job, standalone (`loom run` starts its own in-process). See
// launch/monitor/server.h for what it serves and launch/monitor/engine.h for the verdicts.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>

#include "core/error.h"
#include "core/log.h"
#include "launch/commands.h"
#include "launch/monitor/server.h"

namespace loom::cli {
namespace {

std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop.store(true); }

void monitor_usage(std::ostream& os) {
  os << "usage: loom monitor --job ID [--token T] [--port P] [--bind ADDR] [--port-file F] [--verdict-dir D]\n"
        "                    [--epoch E] [--heartbeat-s S] [--tick-s S] [--exit-on-verdict]\n"
        "  Trainers connect with --monitor HOST:P --monitor-job ID --monitor-token T (or LOOM_MONITOR, ...).\n"
        "  The status page is http://HOST:P/, metrics http://HOST:P/metrics. The token defaults to\n"
        "  $LOOM_MONITOR_TOKEN; an empty token accepts any peer.\n";
}

}  // namespace

int cmd_monitor(int argc, char** argv) {
  mon::MonitorOptions o;
  std::string port_file;
  bool exit_on_verdict = false;
  if (const char* t = std::getenv("LOOM_MONITOR_TOKEN")) o.token = t;
  o.verdict_dir = "verdicts";
  auto need = [&](int& i, const char* flag) -> std::string {
    LOOM_CHECK(i + 1 < argc, kConfig, "loom monitor: " << flag << " needs a value");
    return argv[++i];
  };
  auto number = [&](const std::string& v, const char* flag) {
    char* end = nullptr;
    double x = std::strtod(v.c_str(), &end);
    LOOM_CHECK(!v.empty() && *end == 0, kConfig, "loom monitor: " << flag << " wants a number, got '" << v << "'");
    return x;
  };
  o.job.clear();
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--job") o.job = need(i, "--job");
    else if (a == "--token") o.token = need(i, "--token");
    else if (a == "--port") o.port = static_cast<int>(number(need(i, "--port"), "--port"));
    else if (a == "--bind") o.bind = need(i, "--bind");
    else if (a == "--port-file") port_file = need(i, "--port-file");
    else if (a == "--verdict-dir") o.verdict_dir = need(i, "--verdict-dir");
    else if (a == "--epoch") o.epoch = static_cast<int64_t>(number(need(i, "--epoch"), "--epoch"));
    else if (a == "--heartbeat-s") o.engine.heartbeat_s = number(need(i, "--heartbeat-s"), "--heartbeat-s");
    else if (a == "--tick-s") o.tick_s = number(need(i, "--tick-s"), "--tick-s");
    else if (a == "--exit-on-verdict") exit_on_verdict = true;
    else if (a == "-h" || a == "--help") {
      monitor_usage(std::cout);
      return 0;
    } else {
      monitor_usage(std::cerr);
      return 2;
    }
  }
  LOOM_CHECK(!o.job.empty(), kConfig, "loom monitor: --job is required");
  LOOM_CHECK(o.port >= 0 && o.port < 65536, kConfig, "loom monitor: --port " << o.port << " is not a TCP port");
  LOOM_CHECK(o.engine.heartbeat_s > 0, kConfig, "loom monitor: --heartbeat-s must be positive");
  LOOM_CHECK(o.tick_s >= 0.01 && o.tick_s <= 1, kConfig, "loom monitor: --tick-s wants 0.01 to 1 s, got " << o.tick_s);
  mon::MonitorServer server(o);
  server.start();
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  std::cout << "monitor: listening on " << host << ":" << server.port() << " (job " << o.job << ", epoch " << o.epoch
            << "); status page http://" << host << ":" << server.port() << "/" << std::endl;
  if (!port_file.empty()) {
    const std::string tmp = port_file + ".tmp";
    std::ofstream(tmp) << server.port() << "\n";
    std::rename(tmp.c_str(), port_file.c_str());
  }
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  // Standalone there is one incarnation: after its verdict the monitor goes on serving the page until stopped.
  bool reported = false;
  while (!g_stop.load()) {
    if (reported) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      continue;
    }
    auto v = server.wait_verdict(0.2);
    if (!v) continue;
    reported = true;
    if (exit_on_verdict) {
      std::cout << v->to_json(o.job, o.epoch) << std::endl;
      return 3;
    }
  }
  return 0;
}

}  // namespace loom::cli
