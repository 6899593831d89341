// Tape: reverse-mode automatic differentiation for Loom's ops.
//
// Each differentiable op (core/ops.h, parallel/tp_ops.h, a user's CustomOp) runs its forward kernel and, when
// the Ctx has a tape and an input needs a gradient, records a backward closure here. backward() replays the
// closures in reverse. A model's author writes forward only.
//
// Gradients live in "slots" allocated from the activation arena on first use (activations), or in the
// parameter arena's gradient region (parameters, which always accumulate so micro-batches add up). The first
// contribution to a whole activation slot overwrites (no memset); later ones accumulate.
#pragma once

#include <functional>
#include <optional>
#include <vector>

#include "core/arena.h"
#include "core/tensor.h"

namespace loom {

class ParameterArena;

class Tape {
 public:
  using Node = std::function<void(Tape&)>;
  struct Target {
    Tensor grad;      // same shape as the tensor whose gradient it is
    bool accumulate;  // false: this is the first contribution, overwrite
  };

  Tape(ActivationArena& arena, ParameterArena* params);

  // A new gradient slot for t (an op's output, or a leaf input whose gradient a test wants).
  Tensor track(const Tensor& t);
  void record(Node node);

  // Where a backward closure writes its contribution to t's gradient; nullopt when t needs none.
  std::optional<Target> target(const Tensor& t);
  // The gradient that has flowed into t so far; nullopt when none has (its consumers were all unused).
  std::optional<Tensor> grad(const Tensor& t) const;

  // Seeds d(loss) = seed (loss is a one-element f32 tensor) and runs every recorded node in reverse.
  void backward(const Tensor& loss, float seed = 1.0f);
  // Seeds d(out) = seed_grad (same shape and dtype as out) and runs every node in reverse: the vector-Jacobian
  // product, used by the finite-difference checker and by callers that own the loss computation.
  void backward_from(const Tensor& out, const Tensor& seed_grad);

  size_t num_nodes() const { return nodes_.size(); }
  ActivationArena& arena() const { return arena_; }

 private:
  struct Slot {
    Shape shape;
    DType dtype;
    void* grad = nullptr;
    bool written = false;
  };
  Tensor slot_view(const Slot& s, const Tensor& t) const;
  void run_nodes();

  ActivationArena& arena_;
  ParameterArena* params_;
  std::vector<Slot> slots_;
  std::vector<Node> nodes_;
  bool ran_ = false;
};

}  // namespace loom
