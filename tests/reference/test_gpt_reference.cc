// Loom's GPT against PyTorch: tests/reference/torch_gpt_reference.py (Debian's python3-torch, float64) builds
// the same model from the same weights and records logits, loss, every gradient, and 10 AdamW steps (losses,
// gradient norms, final weights). The bundle is generated here, at test time, so the reference always matches
// the script in the repository; nothing is edited by hand.
#include <gtest/gtest.h>

#include <unistd.h>
#include <cmath>
#include <cstdlib>
#include <filesystem>

#include "core/env.h"
#include "examples/gpt/model.h"
#include "tests/reference/bundle.h"
#include "tests/unit/test_helpers.h"

namespace loom {
namespace {

using test::Bundle;
using test::BundleDType;

class GptVsTorch : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string python = env::get_string("LOOM_TEST_PYTHON", LOOM_PYTHON3);
    if (std::system((python + " -c 'import torch, numpy' >/dev/null 2>&1").c_str()) != 0) {
      skip_reason_ = python + " cannot import torch and numpy (install python3-torch python3-numpy)";
      return;
    }
    path_ =
        (std::filesystem::temp_directory_path() / ("loom_gpt_ref_" + std::to_string(::getpid()) + ".bundle")).string();
    const std::string cmd = python + " " LOOM_SOURCE_DIR "/tests/reference/torch_gpt_reference.py --out " + path_;
    ASSERT_EQ(std::system(cmd.c_str()), 0) << "reference generator failed: " << cmd;
    bundle_ = new Bundle(Bundle::read(path_));
  }
  static void TearDownTestSuite() {
    delete bundle_;
    bundle_ = nullptr;
    if (!path_.empty()) std::filesystem::remove(path_);
  }
  void SetUp() override {
    if (!skip_reason_.empty()) GTEST_SKIP() << skip_reason_;
    ASSERT_NE(bundle_, nullptr);
    rc_ = test::GptReferenceConfig::from_bundle(*bundle_);
    cfg_.vocab_size = rc_.vocab;
    cfg_.dim = rc_.dim;
    cfg_.n_layers = rc_.layers;
    cfg_.n_heads = rc_.heads;
    cfg_.ffn_hidden = rc_.ffn;
    cfg_.seq_len = rc_.seq;
    cfg_.norm_eps = rc_.norm_eps;
    cfg_.rope_base = rc_.rope_base;
    model_ = std::make_unique<gpt::Gpt>(cfg_, TpGroup::none());
    params_ = std::make_unique<ParameterArena>(*cpu_, ParamArenaOptions{DType::kF32, 1, 1});
    params_->finalize(*model_);
    // Every parameter of the model comes from the bundle, and the bundle has no parameter the model lacks.
    for (const LayoutEntry& e : params_->layout()) {
      const auto& t = bundle_->get(e.name, BundleDType::kF32);
      params_->load_global(e.name, t.f32.data(), t.numel());
    }
    size_t bundle_params = 0;
    for (const auto& n : bundle_->names())
      if (n.find(".weight") != std::string::npos && n.rfind("grad.", 0) != 0 && n.rfind("final.", 0) != 0)
        ++bundle_params;
    ASSERT_EQ(bundle_params, params_->layout().size());
  }

  // Tokens/targets of one step as Loom tensors (the CPU backend's "device" memory is host memory).
  Tensor batch(const char* name, int64_t step) {
    const auto& t = bundle_->get(name, BundleDType::kI32);
    const int64_t per = rc_.batch * rc_.seq;
    return Tensor(const_cast<int32_t*>(t.i32.data()) + step * per, Shape{rc_.batch, rc_.seq}, DType::kI32,
                  Device::kCpu);
  }

  static inline std::string skip_reason_, path_;
  static inline Bundle* bundle_ = nullptr;
  std::unique_ptr<Backend> cpu_ = make_cpu_backend({2});
  test::GptReferenceConfig rc_;
  gpt::GptConfig cfg_;
  std::unique_ptr<gpt::Gpt> model_;
  std::unique_ptr<ParameterArena> params_;
};

TEST_F(GptVsTorch, LogitsLossAndEveryGradient) {
  ActivationArena act(*cpu_);
  {
    Ctx c(*cpu_, act, nullptr);
    Tensor lg = model_->logits(c, batch("tokens", 0));
    const auto& ref = bundle_->get("logits", BundleDType::kF32);
    ASSERT_EQ(lg.numel(), ref.numel());
    EXPECT_TRUE(test::all_close(lg.ptr<float>(), ref.f32.data(), ref.f32.size(), 1e-4, 2e-5)) << "logits";
  }
  act.reset();
  Tape tape(act, params_.get());
  Ctx c(*cpu_, act, &tape);
  Tensor loss = model_->loss(c, batch("tokens", 0), batch("targets", 0));
  const double ref_loss = bundle_->get("loss0", BundleDType::kF64).f64[0];
  EXPECT_NEAR(cpu_->read_scalar(loss), ref_loss, 1e-5 * ref_loss);
  tape.backward(loss);
  for (const LayoutEntry& e : params_->layout()) {
    const auto& ref = bundle_->get("grad." + e.name, BundleDType::kF32);
    std::vector<float> got(static_cast<size_t>(e.numel));
    cpu_->download(params_->param(params_->find(e.name)).grad(), got.data());
    float scale = 0;
    for (float v : ref.f32) scale = std::max(scale, std::fabs(v));
    EXPECT_GT(scale, 0.0f) << e.name << " has an all-zero reference gradient";
    EXPECT_TRUE(test::all_close(got, ref.f32, 1e-4, 1e-4 * scale)) << "gradient of " << e.name;
  }
}

TEST_F(GptVsTorch, TenAdamWStepsWithScheduleAndClipping) {
  ActivationArena act(*cpu_);
  AdamW opt(*params_, AdamWConfig{rc_.beta1, rc_.beta2, rc_.adam_eps, rc_.weight_decay, rc_.clip});
  LrSchedule sched{rc_.lr, rc_.lr_min, rc_.warmup, rc_.steps};
  const auto& losses = bundle_->get("losses", BundleDType::kF64).f64;
  const auto& norms = bundle_->get("grad_norms", BundleDType::kF64).f64;
  const auto& lrs = bundle_->get("lrs", BundleDType::kF64).f64;
  ASSERT_EQ(static_cast<int64_t>(losses.size()), rc_.steps);
  for (int64_t s = 0; s < rc_.steps; ++s) {
    params_->zero_grads();
    act.reset();
    Tape tape(act, params_.get());
    Ctx c(*cpu_, act, &tape);
    Tensor loss = model_->loss(c, batch("tokens", s), batch("targets", s));
    EXPECT_NEAR(cpu_->read_scalar(loss), losses[static_cast<size_t>(s)], 2e-5 * losses[static_cast<size_t>(s)])
        << "loss at step " << s;
    tape.backward(loss);
    EXPECT_NEAR(sched.at(s), lrs[static_cast<size_t>(s)], 1e-12) << "learning rate at step " << s;
    opt.step(sched.at(s), 1.0, nullptr);
    EXPECT_NEAR(opt.last_grad_norm(), norms[static_cast<size_t>(s)], 1e-4 * norms[static_cast<size_t>(s)])
        << "gradient norm at step " << s;
  }
  for (const LayoutEntry& e : params_->layout()) {
    const auto& ref = bundle_->get("final." + e.name, BundleDType::kF32);
    EXPECT_TRUE(test::all_close(params_->read_master(e.name), ref.f32, 1e-3, 1e-4)) << "final " << e.name;
  }
}

}  // namespace
}  // namespace loom
