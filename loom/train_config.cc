#include "loom/train_config.h"

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
  cfg.add_choice("fault.fault_kind", &fault_kind, {"none", "crash", "kill_daemon"},
                 "inject a fault (tests, demo): crash = SIGKILL the rank; kill_daemon = SIGKILL its node's snapshot daemon");
  cfg.add("fault.fault_rank", &fault_rank, "the rank the fault hits");
  cfg.add("fault.fault_step", &fault_step, "the fault hits after this many completed steps");
  cfg.add_choice("runtime.device", &device, {"auto", "cpu", "cuda"}, "where to train");
  cfg.add("runtime.threads", &threads, "CPU threads per rank; 0 = cores / ranks on the node");
  cfg.allow_env("LOOM_FORTUNES_DIR");  // read by core/data.cc: where the fortunes corpus lives
  cfg.add_choice("runtime.log_level", &log_level, {"debug", "info", "warn", "error"}, "log level");
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
  LOOM_CHECK(ranks_per_node >= 0, kConfig, "parallel.ranks_per_node must be >= 0, got " << ranks_per_node);
}

}  // namespace loom
