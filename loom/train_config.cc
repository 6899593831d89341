#include "loom/train_config.h"

#include <algorithm>
#include <cstdlib>

#include "core/error.h"

namespace loom {

void TrainConfig::declare(Config& cfg) {
  cfg.add("train.steps", &steps, "optimizer steps to run");
  cfg.add("train.batch_size", &batch_size, "global batch in sequences (split over data-parallel ranks)");
  cfg.add("train.micro_batch", &micro_batch, "sequences per rank per forward/backward; 0 = whole local batch");
  cfg.add("train.lr", &lr, "peak learning rate");
  cfg.add("train.min_lr", &min_lr, "final learning rate of the cosine decay");
  cfg.add("train.warmup_steps", &warmup_steps, "linear warmup steps");
  cfg.add("train.weight_decay", &weight_decay, "AdamW decoupled weight decay (matrices and embeddings)");
  cfg.add("train.beta1", &beta1, "AdamW beta1");
  cfg.add("train.beta2", &beta2, "AdamW beta2");
  cfg.add("train.adam_eps", &adam_eps, "AdamW epsilon");
  cfg.add("train.grad_clip", &grad_clip, "max global gradient norm; 0 disables clipping");
  cfg.add("train.seed", &seed, "seed of initialisation and data order");
  cfg.add("train.log_every", &log_every, "print progress every N steps");
  cfg.add("train.eval_every", &eval_every, "validation loss every N steps; 0 = only at the end");
  cfg.add("train.eval_batches", &eval_batches, "batches per validation");
  cfg.add("train.metrics_file", &metrics_file, "write one JSON line per step to this file (rank 0)");
  cfg.add("data.dataset", &dataset, "'fortunes' (embedded default corpus), a token .bin file, or a text file");
  cfg.add("data.cache_dir", &cache_dir, "where tokenized corpora are cached; empty = ~/.cache/loom");
  cfg.add("data.token_bytes", &token_bytes, "token width of header-less .bin files (2 or 4)");
  cfg.add("data.val_fraction", &val_fraction, "fraction of the tokens held out for validation");
  cfg.add("parallel.tp", &tp, "tensor-parallel size");
  cfg.add("parallel.dp", &dp, "data-parallel size; 0 = world size / tp");
  cfg.add("parallel.ranks_per_node", &ranks_per_node, "emulate nodes of this many ranks; 0 = real nodes");
  cfg.add("parallel.fused_kernel", &fused_kernel,
          "on GPUs, run the TP fused all-reduce + residual add + RMSNorm as one kernel over CUDA IPC when the TP "
          "group is on one node (experimental, off: NCCL all-reduce + norm kernels; docs/fused_norm.md)");
  cfg.add("parallel.fused_tuning", &fused_tuning,
          "the fused kernel's one-shot/two-shot table written by bench/fused_norm_bench --tuning-out; empty = "
          "one-shot up to 512 KiB per call");
  cfg.add_choice("parallel.device_comm", &device_comm, {"auto", "nccl", "mpi"},
                 "on GPUs, the TP and DP groups' communicator: 'nccl'; 'mpi', through pinned host memory (slow; "
                 "for ranks sharing a GPU or a build without NCCL); 'auto', NCCL unless the group's ranks share a GPU "
                 "or the build has no NCCL");
  cfg.add("snapshot.snapshot_every", &snapshot_every, "in-memory snapshot after every N-th step; 0 disables");
  cfg.add("snapshot.snapshot_job", &snapshot_job, "job id of the snapshot daemons; empty = derived from config and folder");
  cfg.add("snapshot.snapshot_budget_mb", &snapshot_budget_mb,
          "shared memory per node for snapshots (MiB); 0 = half of the machine's memory");
  cfg.add("snapshot.snapshot_dir", &snapshot_dir, "folder of the HDF5 snapshot files");
  cfg.add("snapshot.persist_every", &persist_every, "write every M-th snapshot version to HDF5; 0 disables");
  cfg.add("snapshot.snapshot_idle_timeout", &snapshot_idle_timeout,
          "seconds a snapshot daemon waits without trainers before it exits");
  cfg.add("snapshot.loom_path", &loom_path, "path of the loom tool that runs the daemon; empty = next to the program");
  cfg.add("snapshot.ec_group", &ec_group, "nodes per erasure-coding group of the snapshot daemons");
  cfg.add("snapshot.ec_parity", &ec_parity, "lost nodes per EC group that can be rebuilt (Reed-Solomon parity); 0 disables");
  cfg.add("snapshot.ec_every", &ec_every, "erasure-code every N-th snapshot version");
  cfg.add("monitor.monitor", &monitor, "host:port of the job's `loom monitor` (set by `loom run`); empty = none");
  cfg.add("monitor.monitor_job", &monitor_job, "job id the monitor expects");
  cfg.add("monitor.monitor_token", &monitor_token, "job token the monitor expects");
  cfg.add("monitor.epoch", &epoch, "incarnation of the job: `loom run` counts its restarts here");
  cfg.add("monitor.heartbeat_s", &heartbeat_s, "seconds between heartbeats to the monitor");
  cfg.add_choice("monitor.run_queue", &run_queue, {"auto", "on", "off"},
                 "time the collective-issuing thread waits for a CPU, sent to the monitor (its slow-rank rule does not "
                 "hold the host's scheduler against a rank): auto = read around each collective only while that "
                 "thread waits for a CPU (> 1 % of a heartbeat interval; off again below 0.5 %); on = always "
                 "(~0.6 us a collective); off = never");
  cfg.add_choice("monitor.link_probe", &link_probe, {"auto", "on", "off"},
                 "when the job is monitored, measure each TP and DP group's links with small point-to-point probes "
                 "after the step (the slow-link rule's evidence where the communicator does not time its own "
                 "transfers): auto = groups on NCCL; on = every group; off = none");
  cfg.add("monitor.probe_every", &probe_every, "steps between link probes");
  cfg.add("monitor.probe_bytes", &probe_bytes, "bytes of each link probe transfer (a multiple of 4)");
  cfg.add("monitor.probe_rounds", &probe_rounds,
          "schedule rounds per link probe; 0 = a whole cycle, every probed pair once (each round: disjoint pairs of "
          "ranks, both directions; all pairs of a group of up to 8 ranks meet over 7-8 rounds, larger groups probe "
          "ring neighbours over 2-3)");
  cfg.add_choice("fault.fault_kind", &fault_kind, {"none", "crash", "kill_daemon", "hang", "hang_comm", "slow", "slow_link"},
                 "inject a fault (tests, benchmarks, demo): crash = SIGKILL the rank; kill_daemon = SIGKILL its node's "
                 "snapshot daemon; hang = stop outside communication; hang_comm = stop inside a collective (a dead "
                 "link); slow = longer steps; slow_link = delay the rank's transfers to fault_peer");
  cfg.add("fault.fault_rank", &fault_rank, "the rank the fault hits");
  cfg.add("fault.fault_step", &fault_step, "the fault hits after this many completed steps");
  cfg.add("fault.fault_after_s", &fault_after_s,
          "> 0: the fault hits at the first step from fault_step on that ends this many seconds after the trainer "
          "started (a time, e.g. after the monitor learned its baselines, whatever the step rate)");
  cfg.add("fault.fault_epoch", &fault_epoch, "the incarnation the fault hits (monitor.epoch); -1 = every one");
  cfg.add("fault.fault_peer", &fault_peer, "slow_link: the receiving rank; -1 = the next rank of the TP (else DP) ring");
  cfg.add("fault.fault_delay_ms", &fault_delay_ms, "slow_link: delay of each transfer (ms)");
  cfg.add("fault.fault_slowdown", &fault_slowdown, "slow: extra time per step as a fraction of the step time");
  cfg.add("fault.fault_plan", &fault_plan, "several faults 'kind:rank:step[:epoch];...'; overrides fault_kind/rank/step/epoch");
  cfg.add_choice("runtime.device", &device, {"auto", "cpu", "cuda"}, "where to train");
  cfg.add("runtime.threads", &threads, "CPU threads per rank; 0 = the host's cores / the ranks on the host");
  cfg.allow_env("LOOM_FORTUNES_DIR");  // read by core/data.cc: where the fortunes corpus lives
  cfg.allow_env("LOOM_MPIRUN");        // read by `loom run` (and the tests): the mpirun command line
  // Read by Loom's scripts and test harness (scripts/, tests/e2e/lib.sh), which export them to the programs they
  // run: where the programs, sources, Python and build are, and the demo's crash step. Not settings.
  for (const char* name : {"LOOM_BIN", "LOOM_SOURCE_DIR", "LOOM_PYTHON3", "LOOM_BUILD_DIR",
                           "LOOM_DEMO_CRASH_STEP", "LOOM_CMAKE_ARGS"})
    cfg.allow_env(name);
  cfg.add_choice("runtime.log_level", &log_level, {"debug", "info", "warn", "error"}, "log level");
}

std::vector<TrainConfig::FaultSpec> TrainConfig::fault_specs() const {
  static const std::vector<std::string> kinds = {"crash", "kill_daemon", "hang", "hang_comm", "slow", "slow_link"};
  std::vector<FaultSpec> out;
  if (fault_plan.empty()) {
    if (fault_kind != "none") out.push_back({fault_kind, fault_rank, fault_step, fault_epoch});
    return out;
  }
  size_t pos = 0;
  while (pos <= fault_plan.size()) {
    size_t end = fault_plan.find(';', pos);
    if (end == std::string::npos) end = fault_plan.size();
    const std::string item = fault_plan.substr(pos, end - pos);
    pos = end + 1;
    if (item.empty()) continue;
    std::vector<std::string> f;
    for (size_t a = 0;;) {
      size_t b = item.find(':', a);
      f.push_back(item.substr(a, b == std::string::npos ? std::string::npos : b - a));
      if (b == std::string::npos) break;
      a = b + 1;
    }
    auto num = [&](const std::string& v, const char* what) {
      char* e = nullptr;
      long long x = std::strtoll(v.c_str(), &e, 10);
      LOOM_CHECK(!v.empty() && *e == 0, kConfig, "fault.fault_plan entry '" << item << "': " << what << " '" << v
                                                  << "' is not an integer");
      return static_cast<int64_t>(x);
    };
    LOOM_CHECK((f.size() == 3 || f.size() == 4) && std::find(kinds.begin(), kinds.end(), f[0]) != kinds.end(), kConfig,
               "fault.fault_plan entry '" << item << "' is not kind:rank:step[:epoch] with kind one of crash, "
               "kill_daemon, hang, hang_comm, slow, slow_link");
    out.push_back({f[0], num(f[1], "rank"), num(f[2], "step"), f.size() == 4 ? num(f[3], "epoch") : 0});
  }
  return out;
}

void TrainConfig::validate(int world_size) const {
  LOOM_CHECK(steps > 0, kConfig, "train.steps must be positive, got " << steps);
  LOOM_CHECK(batch_size > 0, kConfig, "train.batch_size must be positive, got " << batch_size);
  LOOM_CHECK(micro_batch >= 0, kConfig, "train.micro_batch must be >= 0, got " << micro_batch);
  LOOM_CHECK(lr > 0 && min_lr >= 0 && min_lr <= lr, kConfig,
             "need 0 <= train.min_lr <= train.lr and lr > 0, got lr " << lr << ", min_lr " << min_lr);
  LOOM_CHECK(warmup_steps >= 0, kConfig, "train.warmup_steps must be >= 0, got " << warmup_steps);
  LOOM_CHECK(log_every > 0, kConfig, "train.log_every must be positive, got " << log_every);
  LOOM_CHECK(eval_every >= 0 && eval_batches >= 0, kConfig, "train.eval_every and eval_batches must be >= 0");
  LOOM_CHECK(token_bytes == 2 || token_bytes == 4, kConfig, "data.token_bytes must be 2 or 4, got " << token_bytes);
  LOOM_CHECK(val_fraction > 0 && val_fraction < 0.5, kConfig,
             "data.val_fraction must be in (0, 0.5), got " << val_fraction);
  LOOM_CHECK(threads >= 0, kConfig, "runtime.threads must be >= 0, got " << threads);
  LOOM_CHECK(tp >= 1, kConfig, "parallel.tp must be at least 1, got " << tp);
  LOOM_CHECK(world_size % tp == 0, kConfig,
             "--tp " << tp << " does not divide the number of ranks (" << world_size << ", from mpirun -np)");
  const int64_t dps = world_size / tp;
  LOOM_CHECK(dp == 0 || dp == dps, kConfig,
             "--dp " << dp << " x --tp " << tp << " needs " << dp * tp << " ranks, but " << world_size
                     << " were started (mpirun -np " << dp * tp << ", or leave --dp at 0)");
  LOOM_CHECK(batch_size % dps == 0, kConfig,
             "train.batch_size " << batch_size << " does not split evenly over " << dps << " data-parallel ranks");
  const int64_t local = batch_size / dps;
  LOOM_CHECK(micro_batch == 0 || local % micro_batch == 0, kConfig,
             "train.micro_batch " << micro_batch << " does not divide the per-rank batch " << local);
  LOOM_CHECK(ec_group >= 1 && ec_parity >= 0 && ec_every >= 1, kConfig,
             "snapshot.ec_group and ec_every must be >= 1 and ec_parity >= 0");
  LOOM_CHECK(snapshot_every >= 0 && persist_every >= 0 && snapshot_budget_mb >= 0 && snapshot_idle_timeout > 0,
             kConfig, "snapshot.* counts must be >= 0 (and the idle timeout > 0)");
  LOOM_CHECK(fault_kind == "none" || (fault_rank >= 0 && fault_rank < world_size && fault_step >= 0), kConfig,
             "fault.fault_rank " << fault_rank << " is not a rank of this job (0.." << world_size - 1 << ")");
  LOOM_CHECK(heartbeat_s > 0, kConfig, "monitor.heartbeat_s must be positive, got " << heartbeat_s);
  LOOM_CHECK(epoch >= 0, kConfig, "monitor.epoch must be >= 0, got " << epoch);
  LOOM_CHECK(probe_every >= 1, kConfig, "monitor.probe_every must be >= 1, got " << probe_every);
  LOOM_CHECK(probe_rounds >= 0 && probe_rounds <= 64, kConfig,
             "monitor.probe_rounds must be between 0 (a whole cycle) and 64, got " << probe_rounds);
  LOOM_CHECK(probe_bytes >= 4 && probe_bytes % 4 == 0 && probe_bytes <= (int64_t{1} << 30), kConfig,
             "monitor.probe_bytes must be a multiple of 4 between 4 and 1 GiB, got " << probe_bytes);
  LOOM_CHECK(fault_delay_ms >= 0 && fault_slowdown >= 0 && fault_after_s >= 0, kConfig,
             "fault.fault_delay_ms, fault.fault_slowdown and fault.fault_after_s must be >= 0");
  for (const FaultSpec& f : fault_specs())
    LOOM_CHECK(f.rank >= 0 && f.rank < world_size && f.step >= 0, kConfig,
               "fault " << f.kind << ": rank " << f.rank << " is not a rank of this job (0.." << world_size - 1
                        << ") or step " << f.step << " is negative");
  LOOM_CHECK(ranks_per_node >= 0, kConfig, "parallel.ranks_per_node must be >= 0, got " << ranks_per_node);
}

}  // namespace loom
