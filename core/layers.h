// Built-in single-device layers. The tensor-parallel versions (ColumnParallelLinear, RowParallelLinear,
// VocabParallelEmbedding) are in parallel/tp_layers.h and reduce to these when the TP size is 1.
#pragma once

#include "core/module.h"
#include "core/ops.h"

namespace loom {

// y = x W^T, W [out, in], no bias (Llama-style models use none).
class Linear : public Module {
 public:
  Linear(int64_t in_features, int64_t out_features, InitSpec init = InitSpec::normal(0.02f), ParamOptions options = {});
  Tensor operator()(Ctx& c, const Tensor& x) const { return ops::linear(c, x, weight_.value()); }
  Parameter& weight() const { return weight_; }

 private:
  Parameter& weight_;
};

class RMSNorm : public Module {
 public:
  explicit RMSNorm(int64_t dim, float eps = 1e-5f);
  Tensor operator()(Ctx& c, const Tensor& x) const { return ops::rmsnorm(c, x, weight_.value(), eps_); }
  Parameter& weight() const { return weight_; }
  float eps() const { return eps_; }

 private:
  Parameter& weight_;
  float eps_;
};

// table [vocab, dim]; tokens i32 [...] -> [..., dim]
class Embedding : public Module {
 public:
  Embedding(int64_t vocab, int64_t dim, InitSpec init = InitSpec::normal(0.02f));
  Tensor operator()(Ctx& c, const Tensor& tokens) const { return ops::embedding(c, weight_.value(), tokens); }
  Parameter& weight() const { return weight_; }

 private:
  Parameter& weight_;
};

}  // namespace loom
