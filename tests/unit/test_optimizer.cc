// AdamW against a direct double-precision implementation of the same update (decoupled decay on matrices
// only, global-norm clipping, bias correction), and the warmup + cosine schedule.
#include <gtest/gtest.h>

#include <cmath>

#include "core/backend.h"
#include "core/error.h"
#include "core/optimizer.h"
#include "tests/unit/test_helpers.h"

namespace loom {
namespace {

TEST(LrSchedule, WarmupThenCosine) {
  LrSchedule s{1.0, 0.1, 10, 110};
  EXPECT_DOUBLE_EQ(s.at(0), 0.1);
  EXPECT_DOUBLE_EQ(s.at(4), 0.5);
  EXPECT_DOUBLE_EQ(s.at(9), 1.0);
  EXPECT_DOUBLE_EQ(s.at(10), 1.0);
  EXPECT_NEAR(s.at(60), 0.55, 1e-12);  // halfway through the decay
  EXPECT_NEAR(s.at(110), 0.1, 1e-12);
  EXPECT_NEAR(s.at(500), 0.1, 1e-12);  // stays at the floor
  LrSchedule none{2.0, 2.0, 0, 5};
  EXPECT_DOUBLE_EQ(none.at(0), 2.0);
}

class TwoParams : public Module {
 public:
  TwoParams()
      : w_(register_parameter("w", Shape{3, 4}, InitSpec::normal(1.0f))),
        b_(register_parameter("b", Shape{5}, InitSpec::normal(1.0f))) {}
  Parameter& w_;
  Parameter& b_;
};

void reference_adamw(std::vector<double>& p, std::vector<double>& m, std::vector<double>& v,
                     const std::vector<double>& g, double lr, double wd, int step, double clip) {
  const double b1 = 0.9, b2 = 0.95, eps = 1e-8;
  for (size_t i = 0; i < p.size(); ++i) {
    double gi = g[i] * clip;
    m[i] = b1 * m[i] + (1 - b1) * gi;
    v[i] = b2 * v[i] + (1 - b2) * gi * gi;
    double mh = m[i] / (1 - std::pow(b1, step)), vh = v[i] / (1 - std::pow(b2, step));
    p[i] -= lr * (mh / (std::sqrt(vh) + eps) + wd * p[i]);
  }
}

TEST(AdamW, MatchesReferenceWithClippingAndDecay) {
  auto cpu = make_cpu_backend({1});
  TwoParams model;
  ParameterArena arena(*cpu, {DType::kF32, 1, 3});
  arena.finalize(model);
  AdamW opt(arena, AdamWConfig{0.9, 0.95, 1e-8, 0.1, 1.0});
  auto to_d = [](const std::vector<float>& f) { return std::vector<double>(f.begin(), f.end()); };
  std::vector<double> pw = to_d(arena.read_master("w")), pb = to_d(arena.read_master("b"));
  std::vector<double> mw(12), vw(12), mb(5), vb(5);
  const double grad_scale = 0.5;
  for (int step = 1; step <= 4; ++step) {
    // Gradients large enough that clipping engages on some steps and not others.
    const float mag = step % 2 ? 3.0f : 0.05f;
    auto gw = test::HostTensor::randn({3, 4}, 100 + step, mag), gb = test::HostTensor::randn({5}, 200 + step, mag);
    cpu->upload(model.w_.grad(), gw.f.data());
    cpu->upload(model.b_.grad(), gb.f.data());
    double norm2 = 0;
    for (float x : gw.f) norm2 += x * x;
    for (float x : gb.f) norm2 += x * x;
    const double norm = std::sqrt(norm2) * grad_scale;
    const double clip = std::min(1.0, 1.0 / (norm + 1e-6)) * grad_scale;
    const double lr = 0.01 * step;
    opt.step(lr, grad_scale, nullptr);
    EXPECT_NEAR(opt.last_grad_norm(), norm, 1e-5 * norm);
    reference_adamw(pw, mw, vw, to_d(gw.f), lr, 0.1, step, clip);
    reference_adamw(pb, mb, vb, to_d(gb.f), lr, 0.0, step, clip);  // vectors are not decayed
    auto w = arena.read_master("w"), b = arena.read_master("b");
    for (size_t i = 0; i < w.size(); ++i) EXPECT_NEAR(w[i], pw[i], 1e-5) << "step " << step << " w[" << i << "]";
    for (size_t i = 0; i < b.size(); ++i) EXPECT_NEAR(b[i], pb[i], 1e-5) << "step " << step << " b[" << i << "]";
    std::vector<float> compute(12);
    cpu->download(model.w_.value(), compute.data());
    EXPECT_EQ(compute, w);  // the compute copy follows the master
  }
  EXPECT_EQ(opt.steps_taken(), 4);
}

TEST(AdamW, RejectsBadHyperparameters) {
  auto cpu = make_cpu_backend({1});
  TwoParams model;
  ParameterArena arena(*cpu, {DType::kF32, 1, 3});
  arena.finalize(model);
  EXPECT_THROW(AdamW(arena, AdamWConfig{1.0, 0.95, 1e-8, 0.1, 1.0}), Error);
  EXPECT_THROW(AdamW(arena, AdamWConfig{0.9, 0.95, 0.0, 0.1, 1.0}), Error);
  EXPECT_THROW(AdamW(arena, AdamWConfig{0.9, 0.95, 1e-8, 0.1, -1.0}), Error);
}

}  // namespace
}  // namespace loom
