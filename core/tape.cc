#include "core/tape.h"

#include "core/error.h"
#include "core/param_arena.h"

namespace loom {

Tape::Tape(ActivationArena& arena, ParameterArena* params) : arena_(arena), params_(params) {}

Tensor Tape::track(const Tensor& t) {
  slots_.push_back(Slot{t.shape(), t.dtype()});
  return t.with_grad(GradRef{GradRef::Kind::kSlot, static_cast<int32_t>(slots_.size() - 1), 0});
}

void Tape::record(Node node) {
  LOOM_CHECK(!ran_, kInternal, "an op was recorded on a tape after backward() ran");
  nodes_.push_back(std::move(node));
}

Tensor Tape::slot_view(const Slot& s, const Tensor& t) const {
  const GradRef& g = t.grad_ref();
  LOOM_ASSERT(g.offset + t.numel() <= s.shape.numel());
  char* base = static_cast<char*>(s.grad) + static_cast<size_t>(g.offset) * dtype_size(s.dtype);
  return Tensor(base, t.shape(), s.dtype, arena_.backend().device());
}

std::optional<Tape::Target> Tape::target(const Tensor& t) {
  const GradRef& g = t.grad_ref();
  switch (g.kind) {
    case GradRef::Kind::kNone: return std::nullopt;
    case GradRef::Kind::kParam: {
      LOOM_ASSERT(params_ != nullptr);
      Tensor full = params_->grad_of(g.index);
      return Target{full.flat_range(g.offset, g.offset + t.numel()).reshape(t.shape()), true};
    }
    case GradRef::Kind::kSlot: {
      LOOM_ASSERT(g.index >= 0 && static_cast<size_t>(g.index) < slots_.size());
      Slot& s = slots_[static_cast<size_t>(g.index)];
      if (s.grad == nullptr) {
        s.grad = arena_.allocate(s.shape, s.dtype).data();
        bool whole = g.offset == 0 && t.numel() == s.shape.numel();
        if (!whole) arena_.backend().fill(Tensor(s.grad, s.shape, s.dtype, arena_.backend().device()), 0.0f);
        s.written = true;
        return Target{slot_view(s, t), !whole};
      }
      return Target{slot_view(s, t), true};
    }
  }
  return std::nullopt;
}

std::optional<Tensor> Tape::grad(const Tensor& t) const {
  const GradRef& g = t.grad_ref();
  if (g.kind != GradRef::Kind::kSlot) return std::nullopt;
  const Slot& s = slots_[static_cast<size_t>(g.index)];
  if (!s.written) return std::nullopt;
  return slot_view(s, t);
}

void Tape::backward(const Tensor& loss, float seed) {
  LOOM_CHECK(loss.numel() == 1 && loss.dtype() == DType::kF32, kShape,
             "backward() needs a one-element f32 loss, got " << loss.describe());
  LOOM_CHECK(loss.requires_grad(), kShape, "backward(): the loss does not depend on anything that needs a gradient");
  LOOM_CHECK(!ran_, kInternal, "backward() called twice on one tape");
  auto tgt = target(loss);
  arena_.backend().fill(tgt->grad, seed);
  run_nodes();
}

void Tape::backward_from(const Tensor& out, const Tensor& seed_grad) {
  LOOM_CHECK(out.requires_grad(), kShape, "backward_from(): the output does not need a gradient");
  LOOM_CHECK(out.shape() == seed_grad.shape(), kShape,
             "backward_from(): seed " << seed_grad.shape().str() << " does not match output " << out.shape().str());
  LOOM_CHECK(!ran_, kInternal, "backward() called twice on one tape");
  auto tgt = target(out);
  arena_.backend().copy(tgt->grad, seed_grad);
  run_nodes();
}

void Tape::run_nodes() {
  for (auto it = nodes_.rbegin(); it != nodes_.rend(); ++it) (*it)(*this);
  ran_ = true;
}

}  // namespace loom
