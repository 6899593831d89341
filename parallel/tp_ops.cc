#include "parallel/tp_ops.h"

namespace loom::ops {

static bool active(const Communicator* tp) {
  return tp != nullptr && tp->size() > 1;
}

Tensor copy_to_tp(Ctx& c, const Tensor& x, Communicator* tp) {
  if (!active(tp) || !c.needs_grad({x})) return x;
  // Same data, a new gradient slot: the gradient is summed over TP before it flows into x.
  Tensor y = c.tape()->track(x.detach());
  Backend* be = &c.backend();
  c.tape()->record([=](Tape& t) {
    auto dy = t.grad(y);
    if (!dy) return;
    tp->all_reduce(*dy, ReduceOp::kSum);
    if (auto tgt = t.target(x)) be->axpy(tgt->grad, *dy, 1.0f, tgt->accumulate);
  });
  return y;
}

Tensor reduce_from_tp(Ctx& c, const Tensor& x, Communicator* tp) {
  if (!active(tp)) return x;
  tp->all_reduce(x.detach(), ReduceOp::kSum);
  if (!c.needs_grad({x})) return x.detach();
  Tensor y = c.tape()->track(x.detach());
  Backend* be = &c.backend();
  c.tape()->record([=](Tape& t) {
    auto dy = t.grad(y);
    if (!dy) return;
    if (auto tgt = t.target(x)) be->axpy(tgt->grad, *dy, 1.0f, tgt->accumulate);
  });
  return y;
}

}  // namespace loom::ops
