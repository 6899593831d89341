// AdamW over the parameter arena (decoupled weight decay, f32 master weights and moments), global-norm
// gradient clipping that counts tensor-parallel-replicated parameters once, and the warmup + cosine LR schedule.
//
// One optimizer step is a handful of fused passes over the arena's contiguous parameter groups (core/
// param_arena.h), never a loop over parameters: sum of squares per group, one all-reduce of the sharded part
// over the TP group, then one AdamW pass per group that also writes the compute-precision weights.
#pragma once

#include <cstdint>

#include "core/ops.h"
#include "core/param_arena.h"

namespace loom {

// lr(step), step 0-based: linear warmup to lr_max over `warmup` steps, then cosine decay to lr_min at `total`.
struct LrSchedule {
  double lr_max = 3e-3;
  double lr_min = 3e-4;
  int64_t warmup = 0;
  int64_t total = 1;
  double at(int64_t step) const;
};

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  double grad_clip = 1.0;  // max global norm; 0 disables clipping
};

class AdamW {
 public:
  AdamW(ParameterArena& params, AdamWConfig config);
  ~AdamW();
  AdamW(const AdamW&) = delete;
  AdamW& operator=(const AdamW&) = delete;

  // Updates every parameter from the arena's gradients times grad_scale (e.g. 1/DP after a summing all-reduce).
  // tp: reduces the squared norm of TP-sharded parameters over the tensor-parallel group (null without TP).
  void step(double lr, double grad_scale, GroupReducer* tp);

  // Global gradient norm (after grad_scale, before clipping) of the last step; reads the device.
  double last_grad_norm();
  int64_t steps_taken() const { return steps_; }
  void set_steps_taken(int64_t steps) { steps_ = steps; }  // after a restore
  const AdamWConfig& config() const { return config_; }

 private:
  ParameterArena& params_;
  AdamWConfig config_;
  int64_t steps_ = 0;
  double last_scale_ = 1;
  void* scratch_ = nullptr;  // 2 floats: squared norm of the sharded part, of the replicated part
  Tensor norm_sharded_, norm_replicated_;
};

}  // namespace loom
