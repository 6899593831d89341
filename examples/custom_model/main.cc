// custom-model-train: a model that is not a GPT, written only against Loom's public header, to show how a user
// embeds their own model:
//
// - the model is an "EMA mixer" language model: instead of attention, each block mixes information along
//   time with a causal exponential moving average whose decay is learned per channel, then applies an MLP;
// - the EMA is a user-defined op (CausalEma below) that supplies its own forward and backward, and is checked
//   against finite differences with loom::check_gradients at start-up;
// - everything else (embedding, linear layers, RMSNorm, SwiGLU, the loss) comes from Loom, and the Trainer
//   handles data, data/tensor parallelism, the optimizer, progress and metrics.
//
//   mpirun -np 2 build/bin/custom-model-train --steps 100
//
// The custom op's kernels are plain C++ loops, so this model trains on the CPU backend; a GPU version would
// add CUDA kernels behind the same CustomOp interface.
#include <cmath>
#include <cstdio>
#include <memory>

#include "loom/loom.h"

namespace {

using loom::Ctx;
using loom::Shape;
using loom::Tensor;

// y[b,t,c] = lam_c * y[b,t-1,c] + (1 - lam_c) * x[b,t,c], y[b,-1,c] = 0, lam_c = sigmoid(a[c]).
// Inputs: x [B, T, C], a [C]. The decay is a parameter, so the op differentiates with respect to both.
class CausalEma : public loom::CustomOp {
 public:
  std::string name() const override { return "causal_ema"; }

  Shape output_shape(const std::vector<Tensor>& in) const override {
    LOOM_CHECK(in.size() == 2 && in[0].ndim() == 3 && in[1].ndim() == 1 && in[1].size(0) == in[0].size(2), kShape,
               "causal_ema takes x [B, T, C] and a [C], got " << in[0].shape().str() << " and " << in[1].shape().str());
    LOOM_CHECK(in[0].device() == loom::Device::kCpu, kShape, "causal_ema has CPU kernels only");
    return in[0].shape();
  }

  void forward(loom::Backend&, const std::vector<Tensor>& in, const Tensor& out) override {
    const int64_t B = in[0].size(0), T = in[0].size(1), C = in[0].size(2);
    const float* x = in[0].ptr<float>();
    const float* a = in[1].ptr<float>();
    float* y = out.ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) {
        const float lam = sigmoid(a[c]);
        float prev = 0;
        for (int64_t t = 0; t < T; ++t) {
          const int64_t i = (b * T + t) * C + c;
          prev = lam * prev + (1 - lam) * x[i];
          y[i] = prev;
        }
      }
  }

  // Reverse scan: g_t = dy_t + lam g_{t+1};  dx_t = (1 - lam) g_t;  dlam = sum_t g_t (y_{t-1} - x_t).
  void backward(loom::Backend&, const std::vector<Tensor>& in, const Tensor& out, const Tensor& dout,
                const std::vector<Tensor>& grads) override {
    const int64_t B = in[0].size(0), T = in[0].size(1), C = in[0].size(2);
    const float *x = in[0].ptr<float>(), *a = in[1].ptr<float>(), *y = out.ptr<float>(), *dy = dout.ptr<float>();
    float* dx = grads[0].is_null() ? nullptr : grads[0].ptr<float>();
    float* da = grads[1].is_null() ? nullptr : grads[1].ptr<float>();
    if (da) std::fill_n(da, C, 0.0f);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) {
        const float lam = sigmoid(a[c]);
        double g = 0, dlam = 0;
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t i = (b * T + t) * C + c;
          g = dy[i] + lam * g;
          if (dx) dx[i] = static_cast<float>((1 - lam) * g);
          const double prev = t > 0 ? y[i - C] : 0.0;
          dlam += g * (prev - x[i]);
        }
        if (da) da[c] += static_cast<float>(dlam * lam * (1 - lam));
      }
  }

 private:
  static float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }
};

struct MixerConfig {
  int64_t vocab_size = 256, dim = 128, n_layers = 3, ffn_hidden = 384, seq_len = 128;
  void declare(loom::Config& cfg) {
    cfg.add("model.vocab_size", &vocab_size, "vocabulary size");
    cfg.add("model.dim", &dim, "model width");
    cfg.add("model.n_layers", &n_layers, "mixer blocks");
    cfg.add("model.ffn_hidden", &ffn_hidden, "SwiGLU hidden size");
    cfg.add("model.seq_len", &seq_len, "sequence length");
  }
};

class MixerBlock : public loom::Module {
 public:
  MixerBlock(const MixerConfig& c, std::shared_ptr<CausalEma> ema)
      : ema_(std::move(ema)),
        mix_norm_(register_module<loom::RMSNorm>("mix_norm", c.dim)),
        // Decays start spread from fast to slow (sigmoid(a) from about 0.5 to 0.97).
        decay_(register_parameter("decay", Shape{c.dim}, loom::InitSpec::normal(1.5f), {{}, 0})),
        mix_out_(register_module<loom::Linear>("mix_out", c.dim, c.dim)),
        mlp_norm_(register_module<loom::RMSNorm>("mlp_norm", c.dim)),
        gate_(register_module<loom::Linear>("gate", c.dim, c.ffn_hidden)),
        up_(register_module<loom::Linear>("up", c.dim, c.ffn_hidden)),
        down_(register_module<loom::Linear>("down", c.ffn_hidden, c.dim)) {}

  Tensor operator()(Ctx& c, const Tensor& x) const {
    Tensor mixed = loom::ops::apply(c, ema_, {mix_norm_(c, x), decay_.value()});
    Tensor h = loom::ops::add(c, x, mix_out_(c, mixed));
    Tensor n = mlp_norm_(c, h);
    return loom::ops::add(c, h, down_(c, loom::ops::swiglu(c, gate_(c, n), up_(c, n))));
  }

 private:
  std::shared_ptr<CausalEma> ema_;
  loom::RMSNorm& mix_norm_;
  loom::Parameter& decay_;
  loom::Linear& mix_out_;
  loom::RMSNorm& mlp_norm_;
  loom::Linear& gate_;
  loom::Linear& up_;
  loom::Linear& down_;
};

class EmaMixerLm : public loom::LanguageModel {
 public:
  explicit EmaMixerLm(const MixerConfig& c)
      : cfg_(c),
        emb_(register_module<loom::Embedding>("emb", c.vocab_size, c.dim)),
        blocks_(register_module<loom::ModuleList>("blocks")),
        norm_(register_module<loom::RMSNorm>("norm", c.dim)),
        head_(register_module<loom::Linear>("head", c.dim, c.vocab_size)) {
    auto ema = std::make_shared<CausalEma>();
    for (int64_t i = 0; i < c.n_layers; ++i) blocks_.append<MixerBlock>(c, ema);
  }

  Tensor loss(Ctx& c, const Tensor& tokens, const Tensor& targets) override {
    Tensor x = emb_(c, tokens);
    for (size_t i = 0; i < blocks_.size(); ++i) x = blocks_.at<MixerBlock>(i)(c, x);
    Tensor logits = head_(c, norm_(c, x)).flatten_2d();
    return loom::ops::cross_entropy(c, logits, targets.reshape(Shape{targets.numel()}));
  }
  int64_t vocab_size() const override { return cfg_.vocab_size; }
  int64_t seq_len() const override { return cfg_.seq_len; }

 private:
  MixerConfig cfg_;
  loom::Embedding& emb_;
  loom::ModuleList& blocks_;
  loom::RMSNorm& norm_;
  loom::Linear& head_;
};

// The framework's finite-difference check of the custom op, on small random inputs.
void check_custom_op() {
  auto cpu = loom::make_cpu_backend({1});
  std::vector<float> x(2 * 9 * 5), a(5);
  for (size_t i = 0; i < x.size(); ++i) x[i] = loom::random_normal(42, 1, i);
  for (size_t i = 0; i < a.size(); ++i) a[i] = loom::random_normal(42, 2, i);
  Tensor xt(x.data(), Shape{2, 9, 5}, loom::DType::kF32, loom::Device::kCpu);
  Tensor at(a.data(), Shape{5}, loom::DType::kF32, loom::Device::kCpu);
  auto op = std::make_shared<CausalEma>();
  auto report = loom::check_gradients(
      *cpu, [&](Ctx& c, const std::vector<Tensor>& in) { return loom::ops::apply(c, op, in); }, {xt, at});
  LOOM_CHECK(report.ok, kInternal, "custom op 'causal_ema' fails its gradient check: " << report.summary);
  LOOM_INFO0("custom op 'causal_ema': " << report.summary);
}

}  // namespace

int main(int argc, char** argv) {
  return loom::run_main(argc, argv, [&](loom::Session& session) {
    loom::Config cfg;
    MixerConfig model_cfg;
    model_cfg.declare(cfg);
    loom::TrainConfig train;
    train.steps = 300;
    train.lr = 2e-3;
    if (!session.start(cfg, train, argc, argv, [&](const loom::TrainConfig& t) {
          LOOM_CHECK(t.tp == 1, kConfig, "custom-model-train uses single-device layers; run it with --tp 1");
          LOOM_CHECK(t.device != "cuda", kConfig, "the causal_ema op has CPU kernels only; use --device cpu");
        }))
      return;
    session.agree([&] { check_custom_op(); });
    EmaMixerLm model(model_cfg);
    loom::Trainer trainer(session, model);
    trainer.fit();
  });
}
