// Tape: reverse-mode automatic differentiation for Loom's ops.
//
// Each differentiable op (core/ops.h, parallel/tp_ops.h, a user's CustomOp) runs its forward kernel and, when
// the Ctx has a tape and an input needs a gradient, records a backward closure here. backward() replays the
// closures in reverse. A model's author writes forward only.
//
// Gradients live in "slots" allocated from the activation arena on first use (activations), or in the
// parameter arena's gradient region (parameters, which always accumulate so micro-batches add up). The first
// contribution to a whole activation slot overwrites (no memset); later ones accumulate.
//
// Token-split overlap (docs/fused_norm.md): a model may run two halves of a batch as lanes 1 and 2 and put
// each half's communication on the backend's side stream (record_side). backward() then does not replay a run
// of lane nodes strictly in reverse: it takes each lane's nodes in reverse and switches lanes after every side
// node, so one half's communication is enqueued before the other half's compute and runs beside it. The lanes
// of a run (the nodes between two lane-0 nodes) must not depend on each other — disjoint rows of a batch —
// and meet only by accumulating into gradients (parameters, or disjoint views of one slot).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <unordered_map>
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
  // A node whose work goes to the backend's side stream: backward() runs it between Backend::begin_side() and
  // end_side(), and the gradients it touches (through target() or grad()) are joined by the next target() or
  // grad() of them outside a side node, so the compute stream waits for exactly that work before it reads or
  // overwrites them.
  void record_side(Node node);
  // Nodes recorded from now on belong to `lane` (0: the shared lane, the default).
  void set_lane(int lane);
  int lane() const { return lane_; }

  // Where a backward closure writes its contribution to t's gradient; nullopt when t needs none.
  std::optional<Target> target(const Tensor& t);
  // The gradient that has flowed into t so far; nullopt when none has (its consumers were all unused).
  std::optional<Tensor> grad(const Tensor& t);

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
    uint64_t side_ticket = 0;  // the side work that last wrote it (Backend::end_side), 0: none pending
  };
  struct Entry {
    Node node;
    int lane;
    bool side;
  };
  Tensor slot_view(const Slot& s, const Tensor& t) const;
  // Before a target() or grad() of the gradient behind g: inside a side node, remember it as written there;
  // outside, make the compute stream wait for the side work that wrote it last.
  void sync_side(const GradRef& g);
  void run(Entry& e);
  void run_nodes();

  ActivationArena& arena_;
  ParameterArena* params_;
  std::vector<Slot> slots_;
  std::vector<Entry> nodes_;
  int lane_ = 0;
  bool in_side_ = false;
  std::vector<GradRef> side_writes_;                   // of the side node running now
  std::unordered_map<int32_t, uint64_t> param_ticket_;  // as Slot::side_ticket, for parameters
  bool ran_ = false;
};

}  // namespace loom
