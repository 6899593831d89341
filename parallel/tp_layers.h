// Tensor-parallel layers with Megatron-LM semantics. Each registers its weight with its GLOBAL shape and the
// split axis, so the parameter arena initialises the same full weights for any TP size (each rank keeps its
// slice) and checkpoints can be resharded. With TP size 1 they are plain Linear/Embedding layers.
//
//   ColumnParallelLinear  W [out, in] split on out: input replicated, output sharded on the last dim
//   RowParallelLinear     W [out, in] split on in:  input sharded on the last dim, output all-reduced
//   VocabParallelEmbedding table [V, D] split on V: each rank looks up its vocabulary range, outputs summed
//   vocab_parallel_cross_entropy: loss over vocabulary-sharded logits without gathering them
#pragma once

#include "core/module.h"
#include "core/ops.h"
#include "parallel/communicator.h"

namespace loom {

// The tensor-parallel group as layers see it; comm is null (or of size 1) without TP.
struct TpGroup {
  Communicator* comm = nullptr;
  int rank = 0;
  int size = 1;
  TpSplit split(int axis) const { return TpSplit{axis, rank, size}; }
  static TpGroup none() { return {}; }
  static TpGroup of(Communicator& c) { return TpGroup{&c, c.rank(), c.size()}; }
};

class ColumnParallelLinear : public Module {
 public:
  ColumnParallelLinear(int64_t in_features, int64_t out_features, TpGroup tp, InitSpec init = InitSpec::normal(0.02f));
  // x [..., in] (replicated) -> [..., out / tp]
  Tensor operator()(Ctx& c, const Tensor& x) const;
  // The same product, but x's gradient is left as this rank's partial sum: the op that produced x sums it over
  // TP in its backward (ops::fused_allreduce_add_rmsnorm), once for all its consumers.
  Tensor local(Ctx& c, const Tensor& x) const;
  Parameter& weight() const { return weight_; }

 private:
  TpGroup tp_;
  Parameter& weight_;
};

class RowParallelLinear : public Module {
 public:
  RowParallelLinear(int64_t in_features, int64_t out_features, TpGroup tp, InitSpec init = InitSpec::normal(0.02f));
  // x [..., in / tp] (sharded) -> [..., out], summed over the TP group
  Tensor operator()(Ctx& c, const Tensor& x) const;
  // The partial product before the all-reduce (for the fused all-reduce + residual + RMSNorm path).
  Tensor partial(Ctx& c, const Tensor& x) const;
  Parameter& weight() const { return weight_; }

 private:
  TpGroup tp_;
  Parameter& weight_;
};

class VocabParallelEmbedding : public Module {
 public:
  VocabParallelEmbedding(int64_t vocab, int64_t dim, TpGroup tp, InitSpec init = InitSpec::normal(0.02f));
  // tokens i32 [...] -> [..., dim] (replicated)
  Tensor operator()(Ctx& c, const Tensor& tokens) const;
  int64_t vocab_start() const { return vocab_start_; }
  Parameter& weight() const { return weight_; }

 private:
  TpGroup tp_;
  int64_t vocab_start_;
  Parameter& weight_;
};

// Mean cross-entropy of logits [N, V / tp] (this rank's vocabulary columns, starting at tp.rank * V / tp).
Tensor vocab_parallel_cross_entropy(Ctx& c, const Tensor& logits, const Tensor& targets, TpGroup tp);

}  // namespace loom
