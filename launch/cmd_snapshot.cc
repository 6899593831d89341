// loom snapshotd: the per-node snapshot daemon (started by trainers when none runs; see checkpoint/daemon.h).
#include <cstdlib>
#include <iostream>
#include <string>

#include "checkpoint/daemon.h"
#include "core/error.h"
#include "core/log.h"
#include "launch/commands.h"

namespace loom::cli {

int cmd_snapshotd(int argc, char** argv) {
  snap::DaemonConfig c;
  auto need = [&](int& i, const char* flag) -> std::string {
    LOOM_CHECK(i + 1 < argc, kConfig, "loom snapshotd: " << flag << " needs a value");
    return argv[++i];
  };
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--job") {
      c.job = need(i, "--job");
    } else if (a == "--node") {
      c.node = std::atoi(need(i, "--node").c_str());
    } else if (a == "--socket") {
      c.socket_path = need(i, "--socket");
    } else if (a == "--budget") {
      c.memory_budget = std::strtoull(need(i, "--budget").c_str(), nullptr, 10);
    } else if (a == "--dir") {
      c.persist_dir = need(i, "--dir");
    } else if (a == "--persist-every") {
      c.persist_every = std::atoll(need(i, "--persist-every").c_str());
    } else if (a == "--idle-timeout") {
      c.idle_timeout_s = std::atoi(need(i, "--idle-timeout").c_str());
    } else {
      std::cerr << "usage: loom snapshotd --job ID --node N [--socket PATH] --budget BYTES [--dir DIR]\n"
                   "                      [--persist-every M] [--idle-timeout S]\n";
      return 2;
    }
  }
  LOOM_CHECK(!c.job.empty(), kConfig, "loom snapshotd: --job is required");
  LOOM_CHECK(c.memory_budget > 0, kConfig, "loom snapshotd: --budget must be a positive number of bytes");
  if (c.socket_path.empty()) c.socket_path = snap::daemon_socket_path(c.job, c.node);
  return snap::run_daemon(c);
}

}  // namespace loom::cli
