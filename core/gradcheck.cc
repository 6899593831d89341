#include "core/gradcheck.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "core/error.h"
#include "core/rng.h"

namespace loom {
namespace {

double weighted_sum(const Tensor& out, const std::vector<float>& r) {
  const float* o = out.ptr<float>();
  double s = 0;
  for (size_t i = 0; i < r.size(); ++i) s += static_cast<double>(o[i]) * r[i];
  return s;
}

}  // namespace

GradCheckReport check_gradients(Backend& cpu, const GradCheckFn& fn, const std::vector<Tensor>& inputs,
                                GradCheckOptions options) {
  LOOM_CHECK(cpu.device() == Device::kCpu, kConfig, "check_gradients needs the CPU backend");
  std::vector<bool> wrt = options.wrt;
  if (wrt.empty())
    for (const Tensor& t : inputs) wrt.push_back(t.dtype() == DType::kF32);
  LOOM_CHECK(wrt.size() == inputs.size(), kConfig, "check_gradients: 'wrt' needs one flag per input");

  ActivationArena arena(cpu, size_t{1} << 20);

  // Analytic gradients: inputs become tape leaves.
  std::vector<std::vector<float>> analytic(inputs.size());
  std::vector<float> r;
  {
    Tape tape(arena, nullptr);
    Ctx c(cpu, arena, &tape);
    std::vector<Tensor> leaves;
    for (size_t i = 0; i < inputs.size(); ++i) leaves.push_back(wrt[i] ? tape.track(inputs[i]) : inputs[i]);
    Tensor out = fn(c, leaves);
    LOOM_CHECK(out.dtype() == DType::kF32 && out.device() == Device::kCpu, kConfig,
               "check_gradients: the function must return an f32 CPU tensor, got " << out.describe());
    r.resize(static_cast<size_t>(out.numel()));
    for (size_t i = 0; i < r.size(); ++i) r[i] = random_normal(options.seed, 99, i);
    Tensor seed(r.data(), out.shape(), DType::kF32, Device::kCpu);
    tape.backward_from(out, seed);
    for (size_t i = 0; i < inputs.size(); ++i) {
      analytic[i].assign(static_cast<size_t>(inputs[i].numel()), 0.0f);
      if (!wrt[i]) continue;
      if (auto g = tape.grad(leaves[i])) std::copy_n(g->ptr<float>(), g->numel(), analytic[i].begin());
    }
  }
  arena.reset();

  auto eval = [&]() {
    Ctx c(cpu, arena, nullptr);
    double v = weighted_sum(fn(c, inputs), r);
    arena.reset();
    return v;
  };

  GradCheckReport rep;
  std::ostringstream mism;
  int shown = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!wrt[i]) continue;
    float* x = inputs[i].ptr<float>();
    const int64_t n = inputs[i].numel();
    const int64_t checks = std::min<int64_t>(n, options.max_checks_per_input);
    for (int64_t j = 0; j < checks; ++j) {
      // Evenly spread, with a random phase inside each stride so layouts with a period are not missed.
      const int64_t stride = n / checks;
      const int64_t e = j * stride + static_cast<int64_t>(random_u64(options.seed, 5, static_cast<uint64_t>(j)) %
                                                          static_cast<uint64_t>(stride));
      const float orig = x[e];
      const double h = options.step * std::max(1.0, std::fabs(static_cast<double>(orig)));
      x[e] = static_cast<float>(orig + h);
      const double hp = static_cast<double>(x[e]) - orig;  // the step f32 really took
      double lp = eval();
      x[e] = static_cast<float>(orig - h);
      const double hm = orig - static_cast<double>(x[e]);
      double lm = eval();
      x[e] = orig;
      const double numeric = (lp - lm) / (hp + hm);
      const double a = analytic[i][static_cast<size_t>(e)];
      const double err = std::fabs(a - numeric);
      const double rel = err / std::max(1e-12, std::max(std::fabs(a), std::fabs(numeric)));
      ++rep.checked;
      rep.max_abs_error = std::max(rep.max_abs_error, err);
      if (err > options.atol) rep.max_rel_error = std::max(rep.max_rel_error, rel);
      if (err > options.atol + options.rtol * std::max(std::fabs(a), std::fabs(numeric))) {
        rep.ok = false;
        if (shown++ < 8) mism << "\n  input " << i << " element " << e << ": analytic " << a << ", numeric " << numeric;
      }
    }
  }
  std::ostringstream s;
  s << (rep.ok ? "gradients match" : "GRADIENT MISMATCH") << ": " << rep.checked << " elements checked, max abs error "
    << rep.max_abs_error << ", max rel error " << rep.max_rel_error << mism.str();
  rep.summary = s.str();
  return rep;
}

}  // namespace loom
