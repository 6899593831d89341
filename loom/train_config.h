// The framework's own configuration keys (training, data, parallel layout, runtime). A program declares them
// into its Config next to its model's keys; every key can come from a TOML file, LOOM_* env or a CLI flag.
#pragma once

#include <cstdint>
#include <string>

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
  // [runtime]
  std::string device = "auto";  // auto | cpu | cuda
  int64_t threads = 0;          // CPU threads per rank; 0: cores / ranks on the node
  std::string log_level = "info";

  void declare(Config& cfg);
  // Checks what can be checked from the values and the world size alone; identical on every rank.
  void validate(int world_size) const;
  int64_t dp_size(int world_size) const { return world_size / tp; }
};

}  // namespace loom
