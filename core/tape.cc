#include "core/tape.h"

#include <utility>

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
  nodes_.push_back(Entry{std::move(node), lane_, false});
}

void Tape::record_side(Node node) {
  record(std::move(node));
  nodes_.back().side = true;
}

void Tape::set_lane(int lane) {
  LOOM_CHECK(lane >= 0, kInternal, "tape lanes are numbered from 0, got " << lane);
  lane_ = lane;
}

void Tape::sync_side(const GradRef& g) {
  if (g.kind == GradRef::Kind::kNone) return;
  if (in_side_) {
    side_writes_.push_back(g);
    return;
  }
  uint64_t ticket = 0;
  if (g.kind == GradRef::Kind::kSlot) {
    ticket = std::exchange(slots_[static_cast<size_t>(g.index)].side_ticket, 0);
  } else if (auto it = param_ticket_.find(g.index); it != param_ticket_.end()) {
    ticket = it->second;
    param_ticket_.erase(it);
  }
  if (ticket != 0) arena_.backend().join_side(ticket);
}

Tensor Tape::slot_view(const Slot& s, const Tensor& t) const {
  const GradRef& g = t.grad_ref();
  LOOM_ASSERT(g.offset + t.numel() <= s.shape.numel());
  char* base = static_cast<char*>(s.grad) + static_cast<size_t>(g.offset) * dtype_size(s.dtype);
  return Tensor(base, t.shape(), s.dtype, arena_.backend().device());
}

std::optional<Tape::Target> Tape::target(const Tensor& t) {
  const GradRef& g = t.grad_ref();
  sync_side(g);
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

std::optional<Tensor> Tape::grad(const Tensor& t) {
  const GradRef& g = t.grad_ref();
  if (g.kind != GradRef::Kind::kSlot) return std::nullopt;
  sync_side(g);
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

void Tape::run(Entry& e) {
  if (!e.side) {
    e.node(*this);
    return;
  }
  side_writes_.clear();
  SideScope on_side(arena_.backend());
  in_side_ = true;
  try {
    e.node(*this);
  } catch (...) {
    // Its work may be enqueued already: the caller may free or reuse the memory once this throws.
    in_side_ = false;
    try {
      on_side.close();
      arena_.backend().join_all_side();
    } catch (...) {  // the node's error is the one to report
    }
    throw;
  }
  in_side_ = false;
  const uint64_t ticket = on_side.close();
  for (const GradRef& g : side_writes_) {
    if (g.kind == GradRef::Kind::kSlot) slots_[static_cast<size_t>(g.index)].side_ticket = ticket;
    if (g.kind == GradRef::Kind::kParam) param_ticket_[g.index] = ticket;
  }
}

void Tape::run_nodes() {
  ran_ = true;
  size_t end = nodes_.size();  // nodes [0, end) are still to run, the last first
  while (end > 0) {
    if (nodes_[end - 1].lane == 0) {
      run(nodes_[--end]);
      continue;
    }
    // A run of lane nodes [begin, end): each lane's nodes in reverse, switching lanes after each side node.
    size_t begin = end;
    while (begin > 0 && nodes_[begin - 1].lane != 0) --begin;
    std::vector<std::vector<size_t>> lanes;  // per lane (in order of first appearance from the back): indices
    std::unordered_map<int, size_t> lane_index;
    for (size_t i = end; i-- > begin;) {
      auto [it, added] = lane_index.emplace(nodes_[i].lane, lanes.size());
      if (added) lanes.emplace_back();
      lanes[it->second].push_back(i);
    }
    std::vector<size_t> next(lanes.size(), 0);
    for (size_t left = end - begin, l = 0; left > 0; l = (l + 1) % lanes.size()) {
      while (next[l] < lanes[l].size()) {
        Entry& e = nodes_[lanes[l][next[l]++]];
        --left;
        run(e);
        if (e.side) break;
      }
    }
    end = begin;
  }
  // Whatever side work is left (the last writes of parameter gradients) is done before the caller's next work.
  arena_.backend().join_all_side();
}

}  // namespace loom
