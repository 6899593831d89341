#include "core/optimizer.h"

#include <cmath>

#include "core/error.h"

namespace loom {

double LrSchedule::at(int64_t step) const {
  if (warmup > 0 && step < warmup) return lr_max * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const double span = static_cast<double>(std::max<int64_t>(1, total - warmup));
  const double p = std::min(1.0, static_cast<double>(step - warmup) / span);
  return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + std::cos(M_PI * p));
}

AdamW::AdamW(ParameterArena& params, AdamWConfig config) : params_(params), config_(config) {
  LOOM_CHECK(params.finalized(), kConfig, "AdamW needs a finalized ParameterArena");
  LOOM_CHECK(config.beta1 >= 0 && config.beta1 < 1 && config.beta2 >= 0 && config.beta2 < 1, kConfig,
             "AdamW betas must be in [0, 1), got " << config.beta1 << ", " << config.beta2);
  LOOM_CHECK(config.eps > 0, kConfig, "AdamW eps must be positive, got " << config.eps);
  LOOM_CHECK(config.grad_clip >= 0, kConfig, "grad_clip must be >= 0 (0 disables), got " << config.grad_clip);
  LOOM_CHECK(config.weight_decay >= 0, kConfig, "weight_decay must be >= 0, got " << config.weight_decay);
  Backend& be = params.backend();
  scratch_ = be.allocate(2 * sizeof(float));
  norm_sharded_ = Tensor(scratch_, Shape{1}, DType::kF32, be.device());
  norm_replicated_ = Tensor(static_cast<float*>(scratch_) + 1, Shape{1}, DType::kF32, be.device());
}

AdamW::~AdamW() {
  if (scratch_) params_.backend().deallocate(scratch_);
}

void AdamW::step(double lr, double grad_scale, GroupReducer* tp) {
  Backend& be = params_.backend();
  const Tensor grads = params_.grads();
  // Squared norm: TP-sharded groups are summed over the TP group, replicated groups counted once.
  be.fill(norm_sharded_, 0.0f);
  be.fill(norm_replicated_, 0.0f);
  for (const ParamGroup& g : params_.groups()) {
    be.sum_squares(g.tp_replicated ? norm_replicated_ : norm_sharded_, grads.flat_range(g.offset, g.offset + g.count),
                   true);
  }
  if (tp) tp->all_reduce_sum(norm_sharded_);
  be.add(norm_sharded_, norm_sharded_, norm_replicated_);  // total, unscaled
  ++steps_;
  last_scale_ = grad_scale;
  for (const ParamGroup& g : params_.groups()) {
    AdamWArgs a;
    a.lr = static_cast<float>(lr);
    a.beta1 = static_cast<float>(config_.beta1);
    a.beta2 = static_cast<float>(config_.beta2);
    a.eps = static_cast<float>(config_.eps);
    a.weight_decay = g.weight_decay ? static_cast<float>(config_.weight_decay) : 0.0f;
    a.grad_scale = static_cast<float>(grad_scale);
    a.max_norm = static_cast<float>(config_.grad_clip);
    a.step = steps_;
    auto range = [&](const Tensor& r) { return r.flat_range(g.offset, g.offset + g.count); };
    be.adamw(range(params_.master()), range(params_.adam_m()), range(params_.adam_v()), range(grads),
             range(params_.compute()), norm_sharded_, a);
  }
}

double AdamW::last_grad_norm() {
  return std::sqrt(static_cast<double>(params_.backend().read_scalar(norm_sharded_))) * last_scale_;
}

}  // namespace loom
