// The two conjugate tensor-parallel ops of Megatron-LM (its mappings.py), as differentiable Loom ops:
//
//   copy_to_tp      forward: identity             backward: all-reduce(sum) of the gradient over TP
//   reduce_from_tp  forward: all-reduce(sum) over TP   backward: identity
//
// A column-parallel linear starts with copy_to_tp (its input is replicated; each rank's partial input gradient
// must be summed), a row-parallel linear ends with reduce_from_tp (each rank holds a partial sum of the output).
// With a TP size of 1 both are the identity and record nothing.
#pragma once

#include "core/context.h"
#include "parallel/communicator.h"

namespace loom::ops {

Tensor copy_to_tp(Ctx& c, const Tensor& x, Communicator* tp);
// Sums x over the TP group. x's storage is reused for the result (x is a row-parallel partial product, which
// nothing reads after this op).
Tensor reduce_from_tp(Ctx& c, const Tensor& x, Communicator* tp);

}  // namespace loom::ops
