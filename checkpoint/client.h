// SnapshotClient: a trainer rank's side of the snapshot protocol (checkpoint/protocol.h).
//
// After the optimizer step v the trainer calls stage(v, ...): the rank's data-parallel slices of the f32
// master, Adam m and Adam v regions are copied into its shared-memory segment beside the next step's
// forward/backward (CUDA: a side stream; CPU: helper threads). Before the optimizer of step v+1 writes those
// regions, fence() orders it after the copy: on CUDA without blocking the host, on the CPU by waiting (that wait
// is the stall). A background thread then marks the buffer staged and tells the daemon, which checksums and
// commits it. A failing or vanished daemon never stops training: the client reconnects (starting a new daemon if
// needed) and otherwise reports and carries on.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/daemon.h"
#include "checkpoint/protocol.h"
#include "checkpoint/segment.h"
#include "core/backend.h"
#include "core/param_arena.h"

namespace loom::snap {

struct SnapshotOptions {
  int64_t every = 1;            // snapshot after every N-th optimizer step; 0 disables snapshots
  std::string job;              // job id (Session derives one when empty)
  uint64_t memory_budget = 0;   // bytes of shared memory per node; 0: half of the machine's memory
  std::string dir = "snapshots";
  int64_t persist_every = 50;   // HDF5 every M-th version; 0: never
  int idle_timeout_s = 300;
  std::string loom_path;        // the `loom` tool that runs the daemon; "" -> next to this executable
};

// Makes sure the node's daemon runs: when nothing answers on its socket, starts `loom snapshotd` in its own
// session (so it outlives this process and mpirun) and waits for its socket. Call before CUDA starts (it forks).
void ensure_daemon(const SnapshotOptions& options, int node);

class SnapshotClient {
 public:
  SnapshotClient(const SnapshotOptions& options, int node, Backend& backend);
  ~SnapshotClient();
  SnapshotClient(const SnapshotClient&) = delete;
  SnapshotClient& operator=(const SnapshotClient&) = delete;

  // Registers this rank with the daemon and maps (and page-locks) its segment. Throws kSnapshot on refusal.
  void attach(const SegmentIdentity& id, const std::vector<LayoutEntry>& layout, uint64_t config_hash,
              int num_nodes, int local_size);
  // Starts staging `version` from the three slice tensors (each identity.slice_floats() f32 elements, on the
  // backend's device).
  void stage(int64_t version, const Tensor& master, const Tensor& adam_m, const Tensor& adam_v);
  // Orders the next writes of the sources after the last stage(); returns the seconds the host waited.
  double fence();
  // Waits until everything staged has been handed to the daemon.
  void drain();

  struct Available {
    int64_t version;
    int buffer;
    bool crc_ok;
  };
  std::vector<Available> query();
  // Copies a buffer into the three slices (host or device tensors) after re-checking its CRC; false when the
  // bytes no longer match the CRC recorded at commit.
  bool load(int buffer, const Tensor& master, const Tensor& adam_m, const Tensor& adam_v);
  // Tells the daemon this rank ended cleanly.
  void finish();

  // Erasure coding. The daemon's TCP endpoint for its EC peers (from HELLO_OK):
  const std::string& ec_host() const { return ec_host_; }
  int ec_port() const { return ec_port_; }
  // Tells the daemon its EC group (group size, parity, its index, every member's "host:port").
  void configure_ec(int group_size, int parity, int index, const std::vector<std::string>& peers, int64_t every);
  // Versions whose parity this node's daemon holds completely.
  std::vector<int64_t> ec_versions();
  // Asks the daemon to rebuild this node's snapshots of `version` from its EC group; throws with its reason.
  void rebuild(int64_t version);

  const SegmentIdentity& identity() const { return identity_; }
  int64_t staged_versions() const { return staged_versions_; }
  double copy_seconds() const { return copy_seconds_; }

 private:
  struct Job {
    std::shared_ptr<SnapshotSegment> segment;  // keeps the mapping alive while copies write into it
    int64_t version;
    int buffer;
    std::vector<std::shared_ptr<Backend::HostCopy>> copies;
    double started;
  };
  void connect_and_hello();
  Message request(const Message& m, bool expect_reply);
  void worker();

  SnapshotOptions options_;
  int node_;
  Backend& backend_;
  std::string socket_path_;
  boost::asio::io_context io_;
  std::unique_ptr<Socket> socket_;
  std::mutex socket_mu_;
  // The mapped segment. Replaced (not unmapped) when a new daemon is attached: copies still running into the old
  // mapping hold it through their Job; the last holder unmaps (and unpins) it.
  std::shared_ptr<SnapshotSegment> segment_;
  std::mutex segment_mu_;
  SegmentIdentity identity_;
  std::shared_ptr<SnapshotSegment> current_segment();
  std::string ec_host_;
  int ec_port_ = 0;
  // Registration, kept to re-register after a daemon restart.
  Message hello_;
  std::vector<std::shared_ptr<Backend::HostCopy>> pending_;  // the last stage()'s copies, for fence()
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;
  bool stop_ = false;
  int in_flight_ = 0;  // jobs not yet handed to the daemon
  int unmarked_ = 0;   // jobs whose buffer is not yet marked staged: no new staging may start meanwhile
  std::thread worker_;
  int64_t staged_versions_ = 0;
  double copy_seconds_ = 0;
};

}  // namespace loom::snap
