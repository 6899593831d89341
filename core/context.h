// Ctx: what a forward pass needs — the backend that runs kernels, the activation arena that holds outputs, and
// the tape that records backward closures (null in evaluation, so no gradients are tracked).
#pragma once

#include <initializer_list>

#include "core/arena.h"
#include "core/backend.h"
#include "core/tape.h"

namespace loom {

class Ctx {
 public:
  Ctx(Backend& backend, ActivationArena& arena, Tape* tape) : backend_(backend), arena_(arena), tape_(tape) {}

  Backend& backend() const { return backend_; }
  ActivationArena& arena() const { return arena_; }
  Tape* tape() const { return tape_; }
  bool grad_enabled() const { return tape_ != nullptr; }
  DType compute_dtype() const { return backend_.compute_dtype(); }

  // Scratch memory for this step, never differentiated.
  Tensor scratch(const Shape& shape, DType dtype) const { return arena_.allocate(shape, dtype); }
  // True when the tape is on and one of the inputs needs a gradient: then the op records its backward.
  bool needs_grad(std::initializer_list<Tensor> inputs) const {
    if (!tape_) return false;
    for (const Tensor& t : inputs)
      if (t.requires_grad()) return true;
    return false;
  }
  // An op's output: tracked on the tape when `tracked`.
  Tensor output(const Shape& shape, DType dtype, bool tracked) const {
    Tensor t = arena_.allocate(shape, dtype);
    return tracked ? tape_->track(t) : t;
  }

 private:
  Backend& backend_;
  ActivationArena& arena_;
  Tape* tape_;
};

}  // namespace loom
