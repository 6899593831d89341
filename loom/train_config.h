// The framework's own configuration keys (training, data, parallel layout, runtime). A program declares them
// into its Config next to its model's keys; every key can come from a TOML file, LOOM_* env or a CLI flag.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"

namespace loom {

struct TrainConfig {
  // [train]
  int64_t steps = 200;
  int64_t batch_size = 16;  // global batch in sequences, split over data-parallel ranks
  int64_t micro_batch = 0;  // sequences per rank per forward/backward; 0: the whole local batch at once
  double lr = 3e-3;
  double min_lr = 3e-4;
  int64_t warmup_steps = 20;
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double adam_eps = 1e-8;
  double grad_clip = 1.0;
  int64_t seed = 1234;
  int64_t log_every = 10;
  int64_t eval_every = 0;  // 0: evaluate only at the end
  int64_t eval_batches = 4;
  std::string metrics_file;
  // [data]
  std::string dataset = "fortunes";  // "fortunes" (the embedded default corpus), a .bin token file or a text file
  std::string cache_dir;             // "" -> $XDG_CACHE_HOME/loom or ~/.cache/loom
  int64_t token_bytes = 2;           // width of header-less .bin files
  double val_fraction = 0.05;
  // [parallel]
  int64_t tp = 1;
  int64_t dp = 0;              // 0: world size / tp
  int64_t ranks_per_node = 0;  // 0: real nodes; >0: emulated nodes of this many ranks
  bool fused_kernel = false;   // the fused all-reduce + RMSNorm as one CUDA IPC kernel on the GPUs of a node
  std::string fused_tuning;    // its algorithm table (parallel/fused_tuning.h); empty: the built-in default
  std::string device_comm = "auto";  // the GPU groups' communicator: auto | nccl | mpi (host-staged)
  // [snapshot]
  int64_t snapshot_every = 1;          // in-memory snapshot after every N-th step; 0 disables
  std::string snapshot_job;            // job id of the daemons' memory; "" -> derived from the config and folder
  int64_t snapshot_budget_mb = 0;      // shared memory per node for snapshots; 0 -> half of the machine's memory
  std::string snapshot_dir = "snapshots";  // HDF5 files
  int64_t persist_every = 50;          // write every M-th snapshot to HDF5; 0 disables
  int64_t snapshot_idle_timeout = 300; // a daemon without trainers exits after this many seconds
  std::string loom_path;               // the `loom` tool; "" -> next to the program
  int64_t ec_group = 4;                // nodes per erasure-coding group (consecutive node ids)
  int64_t ec_parity = 1;               // lost nodes per group that can be rebuilt (0 disables EC)
  int64_t ec_every = 1;                // erasure-code every N-th snapshot version
  // [monitor]
  std::string monitor;                 // host:port of `loom monitor`; "" = not monitored
  std::string monitor_job;             // the monitor's job id
  std::string monitor_token;           // the job token the monitor expects
  int64_t epoch = 0;                   // incarnation of the job (`loom run` counts restarts)
  double heartbeat_s = 1.0;            // seconds between heartbeats
  std::string run_queue = "auto";      // monitor.run_queue: auto, on, off (launch/monitor/client.h)
  std::string link_probe = "auto";     // monitor.link_probe: auto, on, off (parallel/link_probe.h)
  int64_t probe_every = 1;             // steps between link probes
  int64_t probe_bytes = 1 << 20;       // data per probe transfer
  int64_t probe_rounds = 0;            // schedule rounds per probe; 0 = a whole cycle
  // [fault] (fault injection, for tests, benchmarks and the demo)
  std::string fault_kind = "none";     // none | crash | kill_daemon | hang | hang_comm | slow | slow_link
  int64_t fault_rank = 0;
  int64_t fault_step = 0;              // after this many completed steps
  double fault_after_s = 0;            // and (when > 0) at the first such step this long after the trainer started
  int64_t fault_epoch = 0;             // only in this incarnation; -1 = in every one
  int64_t fault_peer = -1;             // slow_link: the receiving rank; -1 = the next rank of the TP (else DP) ring
  double fault_delay_ms = 5.0;         // slow_link: delay per transfer
  double fault_slowdown = 0.3;         // slow: extra time per step, as a fraction of the step time
  std::string fault_plan;              // several faults: "kind:rank:step[:epoch];..." (overrides the keys above)
  // [runtime]
  std::string device = "auto";  // auto | cpu | cuda
  int64_t threads = 0;          // CPU threads per rank; 0: cores / ranks on the node
  std::string log_level = "info";

  void declare(Config& cfg);
  // The faults to inject: the fault_plan's entries, else the one of fault_kind (none when "none"). Throws
  // kConfig on a malformed plan.
  struct FaultSpec {
    std::string kind;
    int64_t rank = 0, step = 0, epoch = 0;
  };
  std::vector<FaultSpec> fault_specs() const;
  // Checks what can be checked from the values and the world size alone; identical on every rank.
  void validate(int world_size) const;
  int64_t dp_size(int world_size) const { return world_size / tp; }
};

}  // namespace loom
