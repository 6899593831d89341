// A Llama-style decoder: token embedding, pre-norm blocks of RMSNorm + causal multi-head attention with RoPE
// and RMSNorm + SwiGLU MLP, a final RMSNorm and an untied LM head. Tensor parallelism follows Megatron-LM:
// attention heads and SwiGLU columns are split over the TP group, the embedding and the LM head over the
// vocabulary, and the loss is the vocab-parallel cross-entropy (no full-vocabulary logits).
//
// Parameter names (the reference test and checkpoints rely on them):
//   tok_emb.weight [V, D]
//   blocks.{i}.attn_norm.weight [D]   blocks.{i}.attn.{wq,wk,wv,wo}.weight [D, D]
//   blocks.{i}.mlp_norm.weight [D]    blocks.{i}.mlp.{w1,w3}.weight [F, D]   blocks.{i}.mlp.w2.weight [D, F]
//   norm.weight [D]                   lm_head.weight [V, D]
#pragma once

#include <cstdint>

#include "core/config.h"
#include "core/layers.h"
#include "loom/trainer.h"
#include "parallel/fused_norm.h"
#include "parallel/tp_layers.h"

namespace gpt {

struct GptConfig {
  int64_t vocab_size = 256;
  int64_t dim = 128;
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  int64_t ffn_hidden = 384;
  int64_t seq_len = 128;
  double norm_eps = 1e-5;
  double rope_base = 10000;
  double init_std = 0.02;
  // Fuse the TP all-reduce of each row-parallel output with the residual add and the next RMSNorm
  // (parallel/fused_norm.h). Same parameters and results either way (within rounding of the backward).
  bool fused_norm = true;
  // Token-split overlap (with fused_norm): each micro-batch runs through the blocks as two halves (by
  // sequences), and each half's fused all-reduce + norm goes to the backend's side stream while the other half
  // computes (docs/fused_norm.md). Same parameters; results equal within rounding.
  bool overlap = false;

  // model.* keys and the presets (which also set train.* keys).
  void declare(loom::Config& cfg);
  // Shape rules, including divisibility by the tensor-parallel size.
  void validate(int64_t tp) const;
  int64_t head_dim() const { return dim / n_heads; }
  int64_t num_parameters() const;
  // Training FLOPs per token: 6 per parameter-multiply plus attention (causal: half of 12*L*T*D).
  double flops_per_token() const;
};

class Attention : public loom::Module {
 public:
  Attention(const GptConfig& cfg, loom::TpGroup tp);
  // x [B, T, D] -> [B, T, D]
  loom::Tensor operator()(loom::Ctx& c, const loom::Tensor& x) const;
  // The fused path: x's gradient is left unreduced, and the output is this rank's partial sum (no all-reduce).
  loom::Tensor partial(loom::Ctx& c, const loom::Tensor& x) const;

 private:
  loom::Tensor heads_out(loom::Ctx& c, const loom::Tensor& q, const loom::Tensor& k, const loom::Tensor& v,
                         const loom::Tensor& x) const;
  int64_t local_heads_, head_dim_;
  float rope_base_;
  loom::ColumnParallelLinear& wq_;
  loom::ColumnParallelLinear& wk_;
  loom::ColumnParallelLinear& wv_;
  loom::RowParallelLinear& wo_;
};

class Mlp : public loom::Module {
 public:
  Mlp(const GptConfig& cfg, loom::TpGroup tp);
  loom::Tensor operator()(loom::Ctx& c, const loom::Tensor& x) const;
  loom::Tensor partial(loom::Ctx& c, const loom::Tensor& x) const;  // as Attention::partial

 private:
  loom::ColumnParallelLinear& w1_;
  loom::ColumnParallelLinear& w3_;
  loom::RowParallelLinear& w2_;
};

class Block : public loom::Module {
 public:
  Block(const GptConfig& cfg, loom::TpGroup tp);
  loom::Tensor operator()(loom::Ctx& c, const loom::Tensor& x) const;
  // The fused path: x is the residual stream and n = attn_norm(x) (its gradient summed over TP by whoever made
  // it); returns the residual stream after the block and next_norm(that), next_norm being the next block's
  // attn_norm or the final norm.
  loom::ops::NormedResidual fused(loom::Ctx& c, const loom::Tensor& x, const loom::Tensor& n,
                                  const loom::RMSNorm& next_norm) const;
  // The two halves of fused(): attention (returns the stream after it and mlp_norm of that), then the MLP.
  // side: their communication on the side stream (the caller joins `ready` before using the outputs).
  loom::ops::NormedResidual attention_part(loom::Ctx& c, const loom::Tensor& x, const loom::Tensor& n,
                                           bool side = false) const;
  loom::ops::NormedResidual mlp_part(loom::Ctx& c, const loom::Tensor& h, const loom::Tensor& m,
                                     const loom::RMSNorm& next_norm, bool side = false) const;
  const loom::RMSNorm& attn_norm() const { return attn_norm_; }

 private:
  loom::TpGroup tp_;
  loom::RMSNorm& attn_norm_;
  Attention& attn_;
  loom::RMSNorm& mlp_norm_;
  Mlp& mlp_;
};

class Gpt : public loom::LanguageModel {
 public:
  Gpt(const GptConfig& cfg, loom::TpGroup tp);
  // tokens [B, T] -> this rank's logits [B*T, V / tp]
  loom::Tensor logits(loom::Ctx& c, const loom::Tensor& tokens) const;
  loom::Tensor loss(loom::Ctx& c, const loom::Tensor& tokens, const loom::Tensor& targets) override;
  int64_t vocab_size() const override { return cfg_.vocab_size; }
  int64_t seq_len() const override { return cfg_.seq_len; }
  double flops_per_token() const override { return cfg_.flops_per_token(); }
  const GptConfig& config() const { return cfg_; }

 private:
  // The fused blocks from the first normed input n = attn_norm_0(x): returns the final norm of the stream.
  loom::Tensor fused_blocks(loom::Ctx& c, const loom::Tensor& x, const loom::Tensor& n) const;
  // The same as two halves of the batch (rows of x and n) in lanes 1 and 2, their communication on the side
  // stream: the token-split overlap.
  loom::Tensor overlapped_blocks(loom::Ctx& c, const loom::Tensor& x, const loom::Tensor& n) const;
  const loom::RMSNorm& norm_after(size_t block) const;

  GptConfig cfg_;
  loom::TpGroup tp_;
  loom::VocabParallelEmbedding& tok_emb_;
  loom::ModuleList& blocks_;
  loom::RMSNorm& norm_;
  loom::ColumnParallelLinear& lm_head_;
};

}  // namespace gpt
