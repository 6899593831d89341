// ParameterArena: every parameter of a model in one allocation per rank, laid out for snapshots and sharding:
//
//   [ compute weights | gradients | f32 master | Adam m | Adam v ]     each region padded_numel() elements
//
// Compute weights are in the backend's compute dtype (f32 CPU, bf16 CUDA); gradients in grad_dtype; the
// rest f32. Within each region parameters sit at the same element offset, grouped as
//   [TP-sharded, decayed | TP-sharded, not decayed | TP-replicated, decayed | TP-replicated, not decayed]
// so the optimizer and the global norm work on a few contiguous ranges, and the padded length divides evenly
// by the data-parallel size (DP rank d of a TP shard owns elements [d*P/D, (d+1)*P/D) of each region — the
// slice it snapshots). A snapshot is then a few large contiguous copies; the layout table (names, global and
// local shapes, split axis, offsets) lets a checkpoint be resharded to another TP size.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/module.h"

namespace loom {

struct ParamArenaOptions {
  DType grad_dtype = DType::kF32;
  int dp_size = 1;       // the padded length divides by dp_size
  uint64_t seed = 1234;  // initialisation seed
};

struct LayoutEntry {
  std::string name;
  Shape global_shape;
  Shape local_shape;
  TpSplit split;
  int64_t offset = 0;  // element offset within each region
  int64_t numel = 0;   // local element count
  bool weight_decay = false;
};

struct ParamGroup {
  int64_t offset = 0;
  int64_t count = 0;  // elements, including alignment gaps between parameters (kept at zero)
  bool weight_decay = false;
  bool tp_replicated = false;
};

class ParameterArena {
 public:
  static constexpr int64_t kParamAlign = 64;  // elements between parameter starts

  ParameterArena(Backend& backend, ParamArenaOptions options);
  ~ParameterArena();
  ParameterArena(const ParameterArena&) = delete;
  ParameterArena& operator=(const ParameterArena&) = delete;

  // Lays out every parameter of `root`, allocates, and initialises: master from the seed, compute = master,
  // gradients and Adam moments zero. Each Parameter's value()/grad()/master() then point into the arena.
  void finalize(Module& root);
  bool finalized() const { return base_ != nullptr; }

  // Whole regions (padded_numel() elements each).
  Tensor compute() const { return compute_; }
  Tensor grads() const { return grads_; }
  Tensor master() const { return master_; }
  Tensor adam_m() const { return m_; }
  Tensor adam_v() const { return v_; }

  int64_t numel() const { return numel_; }  // sum of local parameter sizes
  int64_t padded_numel() const { return padded_; }
  size_t total_bytes() const { return total_bytes_; }
  const std::vector<LayoutEntry>& layout() const { return layout_; }
  const std::vector<ParamGroup>& groups() const { return groups_; }
  const ParamArenaOptions& options() const { return options_; }
  uint64_t layout_hash() const;  // names, shapes, splits, offsets and dtypes
  Backend& backend() const { return backend_; }

  Parameter& param(int index) const { return *params_.at(static_cast<size_t>(index)); }
  int num_params() const { return static_cast<int>(params_.size()); }
  int find(const std::string& name) const;  // -1 when absent
  Tensor grad_of(int index) const { return param(index).grad_; }

  void zero_grads();
  // compute = master (after a restore or an external load of master weights).
  void sync_compute_from_master();
  // Sets one parameter's master and compute weights from the FULL (global-shape) f32 tensor on the host;
  // this rank keeps its TP slice. Throws when the name is unknown or the size differs.
  void load_global(const std::string& name, const float* global_data, int64_t global_numel);
  // Reads one parameter's local master slice (f32) to the host.
  std::vector<float> read_master(const std::string& name) const;

 private:
  Backend& backend_;
  ParamArenaOptions options_;
  std::vector<Parameter*> params_;
  std::vector<LayoutEntry> layout_;
  std::vector<ParamGroup> groups_;
  int64_t numel_ = 0, padded_ = 0;
  size_t total_bytes_ = 0;
  void* base_ = nullptr;
  Tensor compute_, grads_, master_, m_, v_;
};

// Copies this rank's TP slice out of a full tensor (and back). Both are row-major f32 on the host.
void extract_shard(const float* global, const Shape& global_shape, const TpSplit& split, float* local);
void insert_shard(const float* local, const Shape& global_shape, const TpSplit& split, float* global);

}  // namespace loom
