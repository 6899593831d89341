#include "examples/gpt/model.h"

#include <cmath>

#include "core/error.h"
#include "parallel/tp_ops.h"

namespace gpt {

using loom::Ctx;
using loom::InitSpec;
using loom::Shape;
using loom::Tensor;

void GptConfig::declare(loom::Config& cfg) {
  cfg.add("model.vocab_size", &vocab_size, "vocabulary size (256 for the byte-level tokenizer)");
  cfg.add("model.dim", &dim, "model width");
  cfg.add("model.n_layers", &n_layers, "transformer blocks");
  cfg.add("model.n_heads", &n_heads, "attention heads");
  cfg.add("model.ffn_hidden", &ffn_hidden, "SwiGLU hidden size");
  cfg.add("model.seq_len", &seq_len, "sequence length");
  cfg.add("model.norm_eps", &norm_eps, "RMSNorm epsilon");
  cfg.add("model.rope_base", &rope_base, "RoPE base");
  cfg.add("model.init_std", &init_std, "std of the normal initialisation");
  cfg.add("model.fused_norm", &fused_norm,
          "fuse each row-parallel all-reduce with the residual add and the next RMSNorm into one op (one "
          "all-reduce in the backward for q, k and v instead of three; docs/fused_norm.md)");
  cfg.add("model.overlap", &overlap,
          "token-split overlap (needs model.fused_norm): run each micro-batch through the blocks as two halves, "
          "one half's fused all-reduce + norm on a high-priority stream while the other half computes (GPUs; "
          "on the CPU the same order without concurrency; docs/fused_norm.md)");
  // tiny trains in a few minutes on 2 CPU cores; the last is the reference model of the GPU benchmarks.
  cfg.add_preset("tiny",
                 {{"model.dim", "128"},
                  {"model.n_layers", "4"},
                  {"model.n_heads", "4"},
                  {"model.ffn_hidden", "384"},
                  {"model.seq_len", "128"},
                  {"model.vocab_size", "256"},
                  {"train.batch_size", "16"},
                  {"train.steps", "600"},
                  {"train.lr", "3e-3"},
                  {"train.min_lr", "3e-4"},
                  {"train.warmup_steps", "30"}},
                 "0.9M parameters, seq 128: about a minute on 2 CPU cores");
  cfg.add_preset("small",
                 {{"model.dim", "384"},
                  {"model.n_layers", "6"},
                  {"model.n_heads", "6"},
                  {"model.ffn_hidden", "1024"},
                  {"model.seq_len", "256"},
                  {"model.vocab_size", "256"},
                  {"train.batch_size", "32"},
                  {"train.steps", "2000"},
                  {"train.lr", "1e-3"},
                  {"train.min_lr", "1e-4"},
                  {"train.warmup_steps", "100"}},
                 "11M parameters, seq 256");
  cfg.add_preset("medium",
                 {{"model.dim", "1024"},
                  {"model.n_layers", "12"},
                  {"model.n_heads", "16"},
                  {"model.ffn_hidden", "2816"},
                  {"model.seq_len", "1024"},
                  {"model.vocab_size", "256"},
                  {"train.batch_size", "32"},
                  {"train.steps", "5000"},
                  {"train.lr", "6e-4"},
                  {"train.min_lr", "6e-5"},
                  {"train.warmup_steps", "200"}},
                 "0.15B parameters, seq 1024 (GPU)");
  cfg.add_preset("ref-0.95b",
                 {{"model.dim", "2048"},
                  {"model.n_layers", "16"},
                  {"model.n_heads", "16"},
                  {"model.ffn_hidden", "5632"},
                  {"model.seq_len", "2048"},
                  {"model.vocab_size", "32000"},
                  {"train.batch_size", "8"},
                  {"train.steps", "100"},
                  {"train.lr", "3e-4"},
                  {"train.min_lr", "3e-5"},
                  {"train.warmup_steps", "10"}},
                 "the 0.95B reference model of the GPU benchmarks (d 2048, 16 layers, seq 2048)");
  cfg.set_default_preset("tiny");
}

void GptConfig::validate(int64_t tp) const {
  LOOM_CHECK(vocab_size > 0 && dim > 0 && n_layers > 0 && n_heads > 0 && ffn_hidden > 0 && seq_len > 0, kConfig,
             "model sizes must be positive (vocab_size " << vocab_size << ", dim " << dim << ", n_layers " << n_layers
                                                         << ", n_heads " << n_heads << ", ffn_hidden " << ffn_hidden
                                                         << ", seq_len " << seq_len << ")");
  LOOM_CHECK(dim % n_heads == 0, kConfig, "model.dim " << dim << " is not divisible by model.n_heads " << n_heads);
  LOOM_CHECK(head_dim() % 2 == 0, kConfig, "the head dimension dim/n_heads = " << head_dim() << " must be even (RoPE)");
  LOOM_CHECK(n_heads % tp == 0, kConfig,
             "--tp " << tp << " does not divide model.n_heads " << n_heads << " (heads are split over TP ranks)");
  LOOM_CHECK(vocab_size % tp == 0, kConfig,
             "--tp " << tp << " does not divide model.vocab_size " << vocab_size << " (the vocabulary is split)");
  LOOM_CHECK(ffn_hidden % tp == 0, kConfig, "--tp " << tp << " does not divide model.ffn_hidden " << ffn_hidden);
  LOOM_CHECK(!overlap || fused_norm, kConfig,
             "model.overlap splits the fused all-reduce + norm between two halves of the batch: it needs "
             "model.fused_norm (set --fused-norm true or --overlap false)");
  LOOM_CHECK(norm_eps > 0 && rope_base > 0 && init_std > 0, kConfig,
             "model.norm_eps, model.rope_base and model.init_std must be positive");
}

int64_t GptConfig::num_parameters() const {
  return 2 * vocab_size * dim + n_layers * (4 * dim * dim + 3 * dim * ffn_hidden + 2 * dim) + dim;
}

double GptConfig::flops_per_token() const {
  const double matmul_params =
      static_cast<double>(n_layers * (4 * dim * dim + 3 * dim * ffn_hidden) + vocab_size * dim);
  const double attention = 6.0 * static_cast<double>(n_layers * seq_len * dim);  // causal half of 12 L T D
  return 6.0 * matmul_params + attention;
}

static InitSpec matrix_init(const GptConfig& c) {
  return InitSpec::normal(static_cast<float>(c.init_std));
}
// Output projections into the residual stream start smaller so the stream's variance does not grow with depth.
static InitSpec residual_init(const GptConfig& c) {
  return InitSpec::normal(static_cast<float>(c.init_std / std::sqrt(2.0 * static_cast<double>(c.n_layers))));
}

Attention::Attention(const GptConfig& cfg, loom::TpGroup tp)
    : local_heads_(cfg.n_heads / tp.size),
      head_dim_(cfg.head_dim()),
      rope_base_(static_cast<float>(cfg.rope_base)),
      wq_(register_module<loom::ColumnParallelLinear>("wq", cfg.dim, cfg.dim, tp, matrix_init(cfg))),
      wk_(register_module<loom::ColumnParallelLinear>("wk", cfg.dim, cfg.dim, tp, matrix_init(cfg))),
      wv_(register_module<loom::ColumnParallelLinear>("wv", cfg.dim, cfg.dim, tp, matrix_init(cfg))),
      wo_(register_module<loom::RowParallelLinear>("wo", cfg.dim, cfg.dim, tp, residual_init(cfg))) {}

Tensor Attention::heads_out(Ctx& c, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& x) const {
  const Shape heads{x.size(0), x.size(1), local_heads_, head_dim_};
  Tensor a = loom::ops::causal_attention(c, loom::ops::rope(c, q.reshape(heads), rope_base_),
                                         loom::ops::rope(c, k.reshape(heads), rope_base_), v.reshape(heads));
  return a.reshape(Shape{x.size(0), x.size(1), local_heads_ * head_dim_});
}

Tensor Attention::operator()(Ctx& c, const Tensor& x) const {
  return wo_(c, heads_out(c, wq_(c, x), wk_(c, x), wv_(c, x), x));
}

Tensor Attention::partial(Ctx& c, const Tensor& x) const {
  return wo_.partial(c, heads_out(c, wq_.local(c, x), wk_.local(c, x), wv_.local(c, x), x));
}

Mlp::Mlp(const GptConfig& cfg, loom::TpGroup tp)
    : w1_(register_module<loom::ColumnParallelLinear>("w1", cfg.dim, cfg.ffn_hidden, tp, matrix_init(cfg))),
      w3_(register_module<loom::ColumnParallelLinear>("w3", cfg.dim, cfg.ffn_hidden, tp, matrix_init(cfg))),
      w2_(register_module<loom::RowParallelLinear>("w2", cfg.ffn_hidden, cfg.dim, tp, residual_init(cfg))) {}

Tensor Mlp::operator()(Ctx& c, const Tensor& x) const {
  return w2_(c, loom::ops::swiglu(c, w1_(c, x), w3_(c, x)));
}

Tensor Mlp::partial(Ctx& c, const Tensor& x) const {
  return w2_.partial(c, loom::ops::swiglu(c, w1_.local(c, x), w3_.local(c, x)));
}

Block::Block(const GptConfig& cfg, loom::TpGroup tp)
    : tp_(tp),
      attn_norm_(register_module<loom::RMSNorm>("attn_norm", cfg.dim, static_cast<float>(cfg.norm_eps))),
      attn_(register_module<Attention>("attn", cfg, tp)),
      mlp_norm_(register_module<loom::RMSNorm>("mlp_norm", cfg.dim, static_cast<float>(cfg.norm_eps))),
      mlp_(register_module<Mlp>("mlp", cfg, tp)) {}

Tensor Block::operator()(Ctx& c, const Tensor& x) const {
  Tensor h = loom::ops::add(c, x, attn_(c, attn_norm_(c, x)));
  return loom::ops::add(c, h, mlp_(c, mlp_norm_(c, h)));
}

loom::ops::NormedResidual Block::attention_part(Ctx& c, const Tensor& x, const Tensor& n, bool side) const {
  return loom::ops::fused_allreduce_add_rmsnorm(c, attn_.partial(c, n), x, mlp_norm_.weight().value(), mlp_norm_.eps(),
                                                tp_.comm, side);
}

loom::ops::NormedResidual Block::mlp_part(Ctx& c, const Tensor& h, const Tensor& m, const loom::RMSNorm& next_norm,
                                          bool side) const {
  return loom::ops::fused_allreduce_add_rmsnorm(c, mlp_.partial(c, m), h, next_norm.weight().value(), next_norm.eps(),
                                                tp_.comm, side);
}

loom::ops::NormedResidual Block::fused(Ctx& c, const Tensor& x, const Tensor& n, const loom::RMSNorm& next_norm) const {
  auto h = attention_part(c, x, n);
  return mlp_part(c, h.residual, h.normed, next_norm);
}

Gpt::Gpt(const GptConfig& cfg, loom::TpGroup tp)
    : cfg_(cfg),
      tp_(tp),
      tok_emb_(register_module<loom::VocabParallelEmbedding>("tok_emb", cfg.vocab_size, cfg.dim, tp, matrix_init(cfg))),
      blocks_(register_module<loom::ModuleList>("blocks")),
      norm_(register_module<loom::RMSNorm>("norm", cfg.dim, static_cast<float>(cfg.norm_eps))),
      lm_head_(register_module<loom::ColumnParallelLinear>("lm_head", cfg.dim, cfg.vocab_size, tp, matrix_init(cfg))) {
  cfg.validate(tp.size);
  for (int64_t i = 0; i < cfg.n_layers; ++i) blocks_.append<Block>(cfg, tp);
}

Tensor Gpt::logits(Ctx& c, const Tensor& tokens) const {
  LOOM_CHECK(tokens.ndim() == 2, kShape, "gpt: tokens must be [B, T], got " << tokens.shape().str());
  LOOM_CHECK(tokens.size(1) <= cfg_.seq_len, kShape,
             "gpt: sequence length " << tokens.size(1) << " exceeds model.seq_len " << cfg_.seq_len);
  Tensor x = tok_emb_(c, tokens);  // [B, T, D]
  if (cfg_.fused_norm && blocks_.size() > 0) {
    // The first norm is a plain one (the embedding's all-reduce has no residual to fuse with); copy_to_tp sums
    // its consumers' partial gradients. Every later norm is fused with the all-reduce before it.
    const Block& first = blocks_.at<Block>(0);
    Tensor n = loom::ops::copy_to_tp(c, first.attn_norm()(c, x), tp_.comm);
    n = cfg_.overlap && x.size(0) >= 2 ? overlapped_blocks(c, x, n) : fused_blocks(c, x, n);
    return lm_head_.local(c, n).flatten_2d();  // [B*T, V/tp]
  }
  for (size_t i = 0; i < blocks_.size(); ++i) x = blocks_.at<Block>(i)(c, x);
  Tensor h = norm_(c, x);
  return lm_head_(c, h).flatten_2d();  // [B*T, V/tp]
}

const loom::RMSNorm& Gpt::norm_after(size_t block) const {
  return block + 1 < blocks_.size() ? blocks_.at<Block>(block + 1).attn_norm() : norm_;
}

Tensor Gpt::fused_blocks(Ctx& c, const Tensor& x0, const Tensor& n0) const {
  Tensor x = x0, n = n0;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    auto out = blocks_.at<Block>(i).fused(c, x, n, norm_after(i));
    x = out.residual;
    n = out.normed;
  }
  return n;
}

// Half k's sub-layer compute is enqueued on the compute stream right after half 1-k's communication went to
// the side stream, so the two overlap; before it, the compute stream joins half k's own last communication.
// The tape's lanes make the backward interleave the same way (core/tape.h).
Tensor Gpt::overlapped_blocks(Ctx& c, const Tensor& x, const Tensor& n) const {
  const int64_t rows = x.size(0), mid = (rows + 1) / 2;
  loom::ops::NormedResidual half[2] = {{n.rows(0, mid), x.rows(0, mid)}, {n.rows(mid, rows), x.rows(mid, rows)}};
  loom::Backend& be = c.backend();
  loom::Tape* tape = c.tape();
  {
    // However the blocks end (an error included): later ops are in the shared lane and the compute stream has
    // joined the halves' side work.
    struct Restore {
      loom::Backend& be;
      loom::Tape* tape;
      ~Restore() {
        if (tape) tape->set_lane(0);
        try {
          be.join_all_side();
        } catch (...) {
        }
      }
    } restore{be, tape};
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const Block& block = blocks_.at<Block>(i);
      for (int part = 0; part < 2; ++part) {
        for (int k = 0; k < 2; ++k) {
          if (tape) tape->set_lane(k + 1);
          be.join_side(half[k].ready);
          half[k] = part == 0 ? block.attention_part(c, half[k].residual, half[k].normed, true)
                              : block.mlp_part(c, half[k].residual, half[k].normed, norm_after(i), true);
        }
      }
    }
  }
  return loom::ops::concat_rows(c, {half[0].normed, half[1].normed});
}

Tensor Gpt::loss(Ctx& c, const Tensor& tokens, const Tensor& targets) {
  Tensor lg = logits(c, tokens);
  return loom::vocab_parallel_cross_entropy(c, lg, targets.reshape(Shape{targets.numel()}), tp_);
}

}  // namespace gpt
