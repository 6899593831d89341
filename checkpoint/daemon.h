// The snapshot daemon (`loom snapshotd`), one per node (real or emulated). It owns the shared memory that holds
// every local rank's snapshots, so they survive trainer crashes; commits staged snapshots (CRC); writes every
// M-th complete version to HDF5 in the background; answers restore queries; and exits when every rank of the
// job has finished, or after an idle timeout with no trainer connected. docs/snapshots.md describes the design.
#pragma once

#include <cstdint>
#include <string>

namespace loom::snap {

struct DaemonConfig {
  std::string job;             // job id: shared-memory names and the socket derive from it
  int node = 0;                // this daemon's node id
  std::string socket_path;     // Unix-domain socket to listen on (its folder must be private, 0700)
  uint64_t memory_budget = 0;  // bytes of shared memory it may hold; refuses (and reports) beyond
  std::string persist_dir;     // HDF5 files go here ("" disables persistence)
  int64_t persist_every = 0;   // persist every M-th complete version (0 disables)
  int idle_timeout_s = 300;    // exit after this long without a connected trainer
};

// Runs the daemon until it exits; returns the process exit status. Another daemon already serving the socket
// is not an error: this one then exits with status 0 at once.
int run_daemon(const DaemonConfig& config);

// The socket path of a job's daemon on a node: <runtime dir>/loom-<uid>/<job>-node<N>.sock, where the runtime
// dir is $XDG_RUNTIME_DIR or /tmp. The loom-<uid> folder is created with mode 0700.
std::string daemon_socket_path(const std::string& job, int node);
// The pid of the daemon serving that socket (from its lock file), or -1.
int daemon_pid(const std::string& socket_path);

}  // namespace loom::snap
