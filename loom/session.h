// Session: one rank's view of a Loom job. It starts MPI (unless the program already did), parses the configuration identically on every rank,
// checks that every rank got the same configuration, builds the process groups (DP x TP, nodes) and the
// backend, and turns failures into one clear message:
//
// - failures every rank can detect before training (bad config, bad layout, missing data) are agreed on with
//   one collective: the lowest failing rank prints its message, every rank exits with status 1, nobody hangs;
// - a failure on one rank during training is printed by that rank and the job is aborted (MPI_Abort), since
//   the other ranks may be waiting for it in a collective.
//
//   int main(int argc, char** argv) {
//     return loom::run_main(argc, argv, [&](loom::Session& s) { ... });
//   }
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "checkpoint/client.h"
#include "launch/monitor/client.h"
#include "core/backend.h"
#include "core/config.h"
#include "loom/train_config.h"
#include "parallel/process_groups.h"
#include "parallel/tp_layers.h"

namespace loom {

class Session {
 public:
  Session(int& argc, char**& argv);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  bool is_root() const { return rank_ == 0; }

  // Runs fn on every rank. If it throws anywhere, the lowest failing rank prints the error and every rank
  // throws ReportedElsewhere. fn must not communicate.
  void agree(const std::function<void()>& fn);

  // Declares the framework keys into cfg, parses argv (plus file and environment), checks the layout, checks
  // that every rank has the same configuration, prints it (rank 0), then builds process groups and the
  // backend. Returns false when --help was asked for (rank 0 printed it). `validate` checks the program's own
  // keys (e.g. the model's), with the final TP size; it runs on every rank and must not communicate.
  bool start(Config& cfg, TrainConfig& train, int argc, char** argv,
             const std::function<void(const TrainConfig&)>& validate = {});

  ProcessGroups& groups() const;
  Backend& backend() const;
  TpGroup tp() const;
  const TrainConfig& train_config() const { return train_; }
  // Snapshot settings with the job id resolved; enabled() is false when snapshots are off or could not start.
  const snap::SnapshotOptions& snapshot_options() const { return snapshot_options_; }
  bool snapshots_enabled() const { return snapshots_enabled_; }
  uint64_t config_hash() const { return config_hash_; }
  std::string config_toml() const { return config_toml_; }
  // Every rank passes in ok; returns whether all did (one MPI all-reduce). For decisions that must be the same
  // everywhere but may fail on one rank without being fatal (snapshots).
  bool all_ok(bool ok);
  // The connection to the job's monitor (monitor.monitor); null when the job is not monitored.
  mon::MonitorClient* monitor() const { return monitor_.get(); }

 private:
  void start_snapshot_daemons();
  void make_backend();
  void make_device_communicators();
  int rank_ = 0;
  int world_size_ = 1;
  bool owns_mpi_ = false;  // MPI is finalized only by the Session that initialized it
  TrainConfig train_;
  snap::SnapshotOptions snapshot_options_;
  bool snapshots_enabled_ = false;
  uint64_t config_hash_ = 0;
  std::string config_toml_;
  std::unique_ptr<ProcessGroups> groups_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<mon::MonitorClient> monitor_;
};

// Runs body inside a Session and maps errors to exit statuses as described above. Returns the process status.
int run_main(int argc, char** argv, const std::function<void(Session&)>& body);

}  // namespace loom
