#include "parallel/fused_norm.h"

#include "core/error.h"

namespace loom::ops {

NormedResidual fused_allreduce_add_rmsnorm(Ctx& c, const Tensor& partial, const Tensor& residual, const Tensor& weight,
                                           float eps, Communicator* tp, bool side) {
  const char* op = "fused_allreduce_add_rmsnorm";
  LOOM_CHECK(partial.ndim() >= 1, kShape, op << ": partial must have at least one dimension");
  LOOM_CHECK(residual.shape() == partial.shape(), kShape,
             op << ": residual " << residual.shape().str() << " and partial " << partial.shape().str() << " differ");
  LOOM_CHECK(weight.ndim() == 1 && weight.size(0) == partial.size(-1), kShape,
             op << ": weight must be [" << partial.size(-1) << "], got " << weight.shape().str());
  LOOM_CHECK(partial.dtype() == c.compute_dtype() && residual.dtype() == c.compute_dtype() &&
                 weight.dtype() == c.compute_dtype(),
             kShape, op << ": partial, residual and weight must be " << dtype_name(c.compute_dtype()));
  LOOM_CHECK(eps > 0, kConfig, op << ": eps must be positive, got " << eps);
  const bool comm = tp != nullptr && tp->size() > 1;
  const bool grad = c.needs_grad({partial, residual, weight});

  NormedResidual out{c.output(partial.shape(), partial.dtype(), grad), c.output(partial.shape(), partial.dtype(), grad)};
  Backend& be = c.backend();
  Tensor r2 = out.residual.flatten_2d();
  Tensor rstd = c.scratch(Shape{r2.size(0)}, DType::kF32);
  SideScope on_side(be, side);
  // The communicator's one-kernel path where it has one (CUDA IPC on the GPUs of a node), else the reference.
  if (!comm || !tp->fused_allreduce_add_rmsnorm(partial.detach().flatten_2d(), residual.detach().flatten_2d(), weight,
                                                eps, r2, out.normed.flatten_2d(), rstd)) {
    Tensor sum = partial.detach();
    if (comm) tp->all_reduce(sum, ReduceOp::kSum);
    be.add(out.residual, residual, sum);
    be.rmsnorm_forward(out.normed.flatten_2d(), rstd, r2, weight, eps);
  }
  out.ready = on_side.close();
  if (!grad) return out;

  Backend* b = &be;
  ActivationArena* arena = &c.arena();
  const Tensor normed = out.normed, res_out = out.residual;
  auto backward = [=](Tape& t) {
    if (auto dn = t.grad(normed)) {
      // The consumers' partial input gradients, summed over TP once; then the RMSNorm backward, added to
      // whatever the residual stream's later users sent back (the slot of res_out, accumulated into).
      // One device call where the communicator has one (CUDA IPC on the GPUs of a node).
      auto dr = t.target(res_out);
      auto dw_t = t.target(weight);
      Tensor dw = dw_t ? dw_t->grad : arena->allocate(weight.shape(), DType::kF32);
      if (!dw_t || !dw_t->accumulate) b->fill(dw, 0.0f);
      if (!comm || !tp->fused_rmsnorm_backward(dn->flatten_2d(), r2, weight, rstd, dr->grad.flatten_2d(),
                                               dr->accumulate, dw)) {
        if (comm) tp->all_reduce(*dn, ReduceOp::kSum);
        b->rmsnorm_backward(dr->grad.flatten_2d(), dr->accumulate, dw, dn->flatten_2d(), r2, weight, rstd);
      }
    }
    auto g = t.grad(res_out);
    if (!g) return;
    if (auto tgt = t.target(residual)) b->axpy(tgt->grad, *g, 1.0f, tgt->accumulate);
    if (auto tgt = t.target(partial)) b->axpy(tgt->grad, *g, 1.0f, tgt->accumulate);
  };
  if (side) {
    c.tape()->record_side(backward);
  } else {
    c.tape()->record(backward);
  }
  return out;
}

}  // namespace loom::ops
