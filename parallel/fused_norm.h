// The TP hot path's fused op (TokenWeave's idea): where a row-parallel output (a partial sum on each TP rank)
// meets the residual stream, one op does
//
//   residual_out = residual + all_reduce_sum(partial)        (the residual stream after the sub-layer)
//   normed       = rmsnorm(residual_out) * weight            (the input of the next sub-layer)
//
// and its backward does the mirror image: the gradient of `normed` arrives as a partial sum (its consumers are
// column-parallel linears that leave their input gradient unreduced: ColumnParallelLinear::local), so it is
// all-reduced once, pushed through the RMSNorm backward, added to the residual stream's gradient, and that sum
// is the gradient of both `residual` and `partial` (the all-reduce's backward is the identity).
//
// Compared with reduce_from_tp + add + rmsnorm + copy_to_tp per consumer, the forward is bit-for-bit the same
// on the CPU path (the same all-reduce, add and RMSNorm kernels), and the backward saves one all-reduce per
// extra consumer (attention: q, k and v read the same normed input, three all-reduces become one), at the cost
// of summing the consumers' partial gradients before the all-reduce rather than after (a different rounding,
// within the TP-equivalence tolerance).
//
// Where the communicator offers a one-kernel path (Communicator::fused_allreduce_add_rmsnorm: NCCL groups of one
// node with parallel.fused_kernel, the CUDA IPC two-shot/one-shot kernels of docs/fused_norm.md), the forward
// is that kernel, and the backward its mirror kernel (Communicator::fused_rmsnorm_backward); otherwise each
// composes the communicator's all-reduce (MPI or NCCL) with the backend's add and RMSNorm kernels: the
// reference (the CPU path, bit-for-bit the unfused ops).
#pragma once

#include <cstdint>

#include "core/context.h"
#include "parallel/communicator.h"

namespace loom::ops {

struct NormedResidual {
  Tensor normed;       // [..., D], the next sub-layer's input
  Tensor residual;     // [..., D], the residual stream after this sub-layer
  uint64_t ready = 0;  // with `side`: the side work that writes them (Backend::join_side before reading)
};

// partial and residual [..., D] of the compute dtype, weight [D]. partial's storage is reused for the reduced
// sum (nothing reads a row-parallel partial product afterwards). tp null or of size 1: no communication.
// side: run the forward, and later its backward (Tape::record_side), on the backend's side stream; the caller
// joins `ready` before it reads the outputs on the compute stream (the token-split overlap).
NormedResidual fused_allreduce_add_rmsnorm(Ctx& c, const Tensor& partial, const Tensor& residual, const Tensor& weight,
                                           float eps, Communicator* tp, bool side = false);

}  // namespace loom::ops
