// Trainer: drives a LanguageModel through data-parallel x tensor-parallel training.
//
// One step: for each micro-batch, reset the activation arena, run forward (recording the tape) and backward;
// then all-reduce gradients over the data-parallel group, average the gradients of TP-replicated parameters
// over the tensor-parallel group (so replicas can never drift), and take one AdamW step. The batch for
// (step, DP rank) is a pure function of (seed, step, sample index), and DP rank d of D takes samples
// [d*B/D, (d+1)*B/D) of the global batch B, so results do not depend on the rank count.
//
// Output: progress every train.log_every steps on rank 0; one JSON line per step in train.metrics_file;
// and as the last line on success: {"event":"done","steps":N,"final_loss":L}.
#pragma once

#include <chrono>

#include <cstdint>
#include <fstream>
#include <memory>
#include <optional>

#include "checkpoint/client.h"
#include "core/arena.h"
#include "core/data.h"
#include "core/module.h"
#include "core/optimizer.h"
#include "core/param_arena.h"
#include "loom/session.h"
#include "parallel/link_probe.h"

namespace loom {

// What the Trainer trains: any Module that maps tokens to a mean next-token loss.
class LanguageModel : public Module {
 public:
  // tokens, targets i32 [B, T] -> mean cross-entropy, f32 [1].
  virtual Tensor loss(Ctx& c, const Tensor& tokens, const Tensor& targets) = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int64_t seq_len() const = 0;
  // Training FLOPs per token (forward + backward), for MFU; 0 when unknown.
  virtual double flops_per_token() const { return 0; }
};

struct StepStats {
  int64_t step = 0;  // steps completed, 1-based
  double loss = 0;
  double lr = 0;
  double grad_norm = 0;
  double step_time_s = 0;
  double tokens_per_s = 0;
};

class Trainer {
 public:
  // Opens the dataset and initialises the parameters; errors are reported once and thrown on every rank.
  Trainer(Session& session, LanguageModel& model);
  ~Trainer();

  // Runs the remaining steps up to train.steps with progress output; returns the last training loss.
  double fit();
  // One optimizer step. fit() then writes its metrics and calls end_step().
  StepStats train_step();
  // Stages the snapshot of the step just taken (every snapshot.snapshot_every steps), probes the links
  // (monitor.probe_every), reports progress to the monitor and injects the configured faults.
  void end_step(const StepStats& last);
  // Mean validation loss over `batches` global batches of the held-out split.
  double evaluate(int64_t batches);

  ParameterArena& params() { return *params_; }
  AdamW& optimizer() { return *optimizer_; }
  int64_t step() const { return step_; }
  // Where training resumed from: "fresh", "memory" or "hdf5".
  const std::string& resumed_from() const { return resumed_from_; }
  double snapshot_stall_s() const { return snapshot_stall_s_; }
  const BatchSampler& sampler() const { return *sampler_; }

 private:
  void open_data();
  void setup_snapshots();
  // Link probes (parallel/link_probe.h) for the TP and DP groups that monitor.link_probe selects, when monitored.
  void setup_link_probes();
  // The restore ladder: newest version in every rank's shared memory (CRC-checked, older in-memory versions
  // next), then the newest complete HDF5 version, else a fresh start. Every rank takes the same rung.
  void restore();
  bool restore_from_memory();
  // Rebuilds lost nodes' snapshots from their erasure-coding groups, when few enough nodes of a group were lost.
  bool rebuild_from_ec();
  void setup_erasure_coding();
  // The EC group of a node: its first node, its size, and the node's index in it.
  struct EcSpan {
    int first, size, index;
  };
  EcSpan ec_span(int node) const;
  bool restore_from_hdf5();
  // After this rank's DP slice of master/m/v is in place: gathers the full regions over DP and derives the
  // compute weights.
  void finish_restore(int64_t version);
  void inject_fault(double step_time_s);
  int slow_link_peer() const;
  static std::string fault_clock();  // wall-clock seconds for the fault log lines (tests match them to verdicts)
  // Mean loss over this rank's part of the global batch of `step` in `split`; with a tape when training.
  Tensor run_batch(Split split, int64_t step, bool train);
  void write_metrics(const StepStats& s);

  Session& s_;
  const TrainConfig& cfg_;
  std::vector<TrainConfig::FaultSpec> faults_;
  std::vector<int64_t> fault_hit_step_;  // per fault: the step it hit at (-1: not yet)
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  LanguageModel& model_;
  std::optional<TokenFile> data_;
  std::unique_ptr<BatchSampler> sampler_;
  std::unique_ptr<ParameterArena> params_;
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<ActivationArena> arena_;
  LrSchedule schedule_;
  int64_t step_ = 0;
  int64_t local_batch_ = 0, micro_batch_ = 0;
  void* loss_buf_ = nullptr;  // device f32 [1]: the step's loss, summed over micro-batches
  Tensor loss_sum_;
  std::ofstream metrics_;
  std::unique_ptr<snap::SnapshotClient> snap_;
  std::vector<std::unique_ptr<LinkProbe>> probes_;
  std::string resumed_from_ = "fresh";
  double snapshot_stall_s_ = 0;
};

}  // namespace loom
