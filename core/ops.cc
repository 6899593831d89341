#include "core/ops.h"

#include <cmath>

#include "core/error.h"

namespace loom::ops {
namespace {

// Runs fn(grad, accumulate) when t needs a gradient.
template <class Fn>
void with_target(Tape& tape, const Tensor& t, Fn&& fn) {
  if (auto tgt = tape.target(t)) fn(tgt->grad, tgt->accumulate);
}

void check_compute(const Ctx& c, const Tensor& t, const char* op, const char* arg) {
  check_dtype(t, c.compute_dtype(), op, arg);
  LOOM_CHECK(t.device() == c.backend().device(), kShape,
             op << ": argument '" << arg << "' is on " << device_name(t.device()) << ", the backend on "
                << device_name(c.backend().device()));
}

void check_tokens(const Ctx& c, const Tensor& t, const char* op, const char* arg) {
  check_dtype(t, DType::kI32, op, arg);
  LOOM_CHECK(t.device() == c.backend().device(), kShape, op << ": '" << arg << "' is on the wrong device");
}

// Kernels that write several input gradients take one accumulate flag. When any target must accumulate, the
// targets that would be overwritten are zero-filled first; an input that needs no gradient gets scratch (zeroed
// when the kernel accumulates into it).
struct JointTargets {
  std::vector<Tensor> grads;
  bool accumulate = false;
};

JointTargets joint_targets(Tape& t, std::initializer_list<Tensor> inputs) {
  ActivationArena& arena = t.arena();
  Backend& be = arena.backend();
  std::vector<std::optional<Tape::Target>> targets;
  JointTargets out;
  for (const Tensor& in : inputs) {
    targets.push_back(t.target(in));
    out.accumulate = out.accumulate || (targets.back() && targets.back()->accumulate);
  }
  size_t i = 0;
  for (const Tensor& in : inputs) {
    auto& tg = targets[i++];
    Tensor g = tg ? tg->grad : arena.allocate(in.shape(), in.dtype());
    if (out.accumulate && (!tg || !tg->accumulate)) be.fill(g, 0.0f);
    out.grads.push_back(g);
  }
  return out;
}

}  // namespace

Tensor linear(Ctx& c, const Tensor& x, const Tensor& w) {
  check_compute(c, x, "linear", "x");
  check_compute(c, w, "linear", "weight");
  LOOM_CHECK(w.ndim() == 2, kShape, "linear: weight must be 2-D [out, in], got " << w.shape().str());
  LOOM_CHECK(x.ndim() >= 1 && x.size(-1) == w.size(1), kShape,
             "linear: input " << x.shape().str() << " has " << (x.ndim() ? x.size(-1) : 0) << " features, the weight "
                              << w.shape().str() << " expects " << w.size(1));
  Shape out_shape = x.shape();
  out_shape[-1] = w.size(0);
  bool grad = c.needs_grad({x, w});
  Tensor y = c.output(out_shape, x.dtype(), grad);
  Tensor x2 = x.flatten_2d(), y2 = y.flatten_2d();
  c.backend().matmul(y2, x2, false, w, true, 1.0f, 0.0f);
  if (grad) {
    Backend* b = &c.backend();
    c.tape()->record([=](Tape& t) {
      auto dy = t.grad(y);
      if (!dy) return;
      Tensor dy2 = dy->flatten_2d();
      with_target(t, x, [&](Tensor dx, bool acc) {
        b->matmul(dx.flatten_2d(), dy2, false, w, false, 1.0f, acc ? 1.0f : 0.0f);
      });
      with_target(t, w, [&](Tensor dw, bool acc) { b->matmul(dw, dy2, true, x2, false, 1.0f, acc ? 1.0f : 0.0f); });
    });
  }
  return y;
}

Tensor add(Ctx& c, const Tensor& a, const Tensor& b) {
  check_compute(c, a, "add", "a");
  check_compute(c, b, "add", "b");
  check_shape(b, a.shape(), "add", "b");
  bool grad = c.needs_grad({a, b});
  Tensor y = c.output(a.shape(), a.dtype(), grad);
  c.backend().add(y, a, b);
  if (grad) {
    Backend* be = &c.backend();
    c.tape()->record([=](Tape& t) {
      auto dy = t.grad(y);
      if (!dy) return;
      with_target(t, a, [&](Tensor da, bool acc) { be->axpy(da, *dy, 1.0f, acc); });
      with_target(t, b, [&](Tensor db, bool acc) { be->axpy(db, *dy, 1.0f, acc); });
    });
  }
  return y;
}

Tensor concat_rows(Ctx& c, const std::vector<Tensor>& parts) {
  LOOM_CHECK(!parts.empty(), kShape, "concat_rows: no parts");
  const Tensor& first = parts.front();
  LOOM_CHECK(first.ndim() >= 1, kShape, "concat_rows: part 0 must have at least one dimension");
  auto beyond_rows = [](const Tensor& t) {
    Shape s = t.shape();
    s[0] = 0;
    return s;
  };
  Shape shape = beyond_rows(first);
  bool grad = false;
  for (size_t i = 0; i < parts.size(); ++i) {
    const Tensor& p = parts[i];
    LOOM_CHECK(p.ndim() == first.ndim() && p.dtype() == first.dtype() && beyond_rows(p) == beyond_rows(first), kShape,
               "concat_rows: part " << i << " is " << p.describe() << ", part 0 " << first.describe()
                                    << " (they may differ in dimension 0 only)");
    shape[0] += p.size(0);
    grad = grad || c.needs_grad({p});
  }
  Tensor y = c.output(shape, first.dtype(), grad);
  for (int64_t row = 0; const Tensor& p : parts) {
    c.backend().copy(y.rows(row, row + p.size(0)), p.detach());
    row += p.size(0);
  }
  if (grad) {
    Backend* be = &c.backend();
    c.tape()->record([=](Tape& t) {
      auto dy = t.grad(y);
      if (!dy) return;
      for (int64_t row = 0; const Tensor& p : parts) {
        const Tensor rows = dy->rows(row, row + p.size(0));
        with_target(t, p, [&](Tensor dp, bool acc) { be->axpy(dp, rows, 1.0f, acc); });
        row += p.size(0);
      }
    });
  }
  return y;
}

Tensor scale(Ctx& c, const Tensor& x, float alpha) {
  check_compute(c, x, "scale", "x");
  bool grad = c.needs_grad({x});
  Tensor y = c.output(x.shape(), x.dtype(), grad);
  c.backend().axpy(y, x, alpha, false);
  if (grad) {
    Backend* be = &c.backend();
    c.tape()->record([=](Tape& t) {
      auto dy = t.grad(y);
      if (!dy) return;
      with_target(t, x, [&](Tensor dx, bool acc) { be->axpy(dx, *dy, alpha, acc); });
    });
  }
  return y;
}

Tensor rmsnorm(Ctx& c, const Tensor& x, const Tensor& w, float eps) {
  check_compute(c, x, "rmsnorm", "x");
  check_compute(c, w, "rmsnorm", "weight");
  LOOM_CHECK(x.ndim() >= 1, kShape, "rmsnorm: input must have at least one dimension");
  check_shape(w, Shape{x.size(-1)}, "rmsnorm", "weight");
  LOOM_CHECK(eps > 0, kConfig, "rmsnorm: eps must be positive, got " << eps);
  bool grad = c.needs_grad({x, w});
  Tensor y = c.output(x.shape(), x.dtype(), grad);
  Tensor x2 = x.flatten_2d();
  Tensor rstd = c.scratch(Shape{x2.size(0)}, DType::kF32);
  c.backend().rmsnorm_forward(y.flatten_2d(), rstd, x2, w, eps);
  if (grad) {
    Backend* be = &c.backend();
    ActivationArena* arena = &c.arena();
    c.tape()->record([=](Tape& t) {
      auto dy = t.grad(y);
      if (!dy) return;
      auto dx_t = t.target(x);
      auto dw_t = t.target(w);
      // The kernel produces both; a gradient nobody wants goes to scratch.
      Tensor dx = dx_t ? dx_t->grad.flatten_2d() : arena->allocate(x2.shape(), x2.dtype());
      Tensor dw = dw_t ? dw_t->grad : arena->allocate(w.shape(), DType::kF32);
      if (dw_t && !dw_t->accumulate) be->fill(dw, 0.0f);
      if (!dw_t) be->fill(dw, 0.0f);
      be->rmsnorm_backward(dx, dx_t && dx_t->accumulate, dw, dy->flatten_2d(), x2, w, rstd);
    });
  }
  return y;
}

Tensor embedding(Ctx& c, const Tensor& table, const Tensor& tokens, int64_t vocab_start) {
  check_compute(c, table, "embedding", "table");
  check_tokens(c, tokens, "embedding", "tokens");
  LOOM_CHECK(table.ndim() == 2, kShape, "embedding: table must be 2-D [vocab, dim], got " << table.shape().str());
  Shape out_shape = tokens.shape();
  out_shape.push_back(table.size(1));
  bool grad = c.needs_grad({table});
  Tensor y = c.output(out_shape, table.dtype(), grad);
  Tensor flat_tokens = tokens.reshape(Shape{tokens.numel()});
  c.backend().embedding_forward(y.flatten_2d(), table, flat_tokens, vocab_start);
  if (grad) {
    Backend* be = &c.backend();
    c.tape()->record([=](Tape& t) {
      auto dy = t.grad(y);
      if (!dy) return;
      with_target(t, table, [&](Tensor dt, bool acc) {
        if (!acc) be->fill(dt, 0.0f);
        be->embedding_backward(dt, dy->flatten_2d(), flat_tokens, vocab_start);
      });
    });
  }
  return y;
}

static void check_bthd(const Tensor& t, const char* op, const char* arg) {
  LOOM_CHECK(t.ndim() == 4, kShape, op << ": '" << arg << "' must be [B, T, H, Dh], got " << t.shape().str());
}

Tensor rope(Ctx& c, const Tensor& x, float base) {
  check_compute(c, x, "rope", "x");
  check_bthd(x, "rope", "x");
  LOOM_CHECK(x.size(3) % 2 == 0, kShape, "rope: head dimension " << x.size(3) << " must be even");
  bool grad = c.needs_grad({x});
  Tensor y = c.output(x.shape(), x.dtype(), grad);
  c.backend().rope_forward(y, x, base);
  if (grad) {
    Backend* be = &c.backend();
    c.tape()->record([=](Tape& t) {
      auto dy = t.grad(y);
      if (!dy) return;
      with_target(t, x, [&](Tensor dx, bool acc) { be->rope_backward(dx, acc, *dy, base); });
    });
  }
  return y;
}

Tensor causal_attention(Ctx& c, const Tensor& q, const Tensor& k, const Tensor& v) {
  check_compute(c, q, "causal_attention", "q");
  check_compute(c, k, "causal_attention", "k");
  check_compute(c, v, "causal_attention", "v");
  check_bthd(q, "causal_attention", "q");
  check_shape(k, q.shape(), "causal_attention", "k");
  check_shape(v, q.shape(), "causal_attention", "v");
  const float sc = 1.0f / std::sqrt(static_cast<float>(q.size(3)));
  bool grad = c.needs_grad({q, k, v});
  Tensor y = c.output(q.shape(), q.dtype(), grad);
  Tensor lse = c.scratch(Shape{q.size(0), q.size(2), q.size(1)}, DType::kF32);
  c.backend().attention_forward(y, lse, q, k, v, sc);
  if (grad) {
    Backend* be = &c.backend();
    c.tape()->record([=](Tape& t) {
      auto dy = t.grad(y);
      if (!dy) return;
      JointTargets g = joint_targets(t, {q, k, v});
      be->attention_backward(g.grads[0], g.grads[1], g.grads[2], g.accumulate, *dy, q, k, v, y, lse, sc);
    });
  }
  return y;
}

Tensor swiglu(Ctx& c, const Tensor& gate, const Tensor& up) {
  check_compute(c, gate, "swiglu", "gate");
  check_compute(c, up, "swiglu", "up");
  check_shape(up, gate.shape(), "swiglu", "up");
  bool grad = c.needs_grad({gate, up});
  Tensor y = c.output(gate.shape(), gate.dtype(), grad);
  c.backend().swiglu_forward(y, gate, up);
  if (grad) {
    Backend* be = &c.backend();
    c.tape()->record([=](Tape& t) {
      auto dy = t.grad(y);
      if (!dy) return;
      JointTargets g = joint_targets(t, {gate, up});
      be->swiglu_backward(g.grads[0], g.grads[1], g.accumulate, *dy, gate, up);
    });
  }
  return y;
}

Tensor cross_entropy(Ctx& c, const Tensor& logits, const Tensor& targets, int64_t vocab_start, GroupReducer* tp) {
  check_compute(c, logits, "cross_entropy", "logits");
  check_tokens(c, targets, "cross_entropy", "targets");
  LOOM_CHECK(logits.ndim() == 2, kShape, "cross_entropy: logits must be [N, V], got " << logits.shape().str());
  check_shape(targets, Shape{logits.size(0)}, "cross_entropy", "targets");
  const int64_t n = logits.size(0);
  LOOM_CHECK(n > 0, kShape, "cross_entropy: no tokens");
  Backend& be = c.backend();
  Tensor row_max = c.scratch(Shape{n}, DType::kF32);
  be.ce_row_max(row_max, logits);
  if (tp) tp->all_reduce_max(row_max);
  // sumexp and target_logit side by side so one all-reduce carries both.
  Tensor stats = c.scratch(Shape{2, n}, DType::kF32);
  Tensor sumexp = stats.rows(0, 1).reshape(Shape{n}), target_logit = stats.rows(1, 2).reshape(Shape{n});
  be.ce_sumexp_target(sumexp, target_logit, logits, row_max, targets, vocab_start);
  if (tp) tp->all_reduce_sum(stats);
  bool grad = c.needs_grad({logits});
  Tensor loss = c.output(Shape{1}, DType::kF32, grad);
  be.ce_loss_mean(loss, row_max, sumexp, target_logit);
  if (grad) {
    Backend* b = &be;
    c.tape()->record([=](Tape& t) {
      auto dl = t.grad(loss);
      if (!dl) return;
      with_target(t, logits, [&](Tensor dlogits, bool acc) {
        b->ce_backward(dlogits, acc, logits, row_max, sumexp, targets, vocab_start, *dl, 1.0f / static_cast<float>(n));
      });
    });
  }
  return loss;
}

Tensor apply(Ctx& c, std::shared_ptr<CustomOp> op, const std::vector<Tensor>& inputs) {
  LOOM_CHECK(op != nullptr, kConfig, "ops::apply: null custom op");
  LOOM_CHECK(!inputs.empty(), kShape, "custom op '" << op->name() << "' called without inputs");
  Shape out_shape = op->output_shape(inputs);
  bool grad = false;
  for (const Tensor& t : inputs) grad = grad || (c.tape() && t.requires_grad());
  Tensor y = c.output(out_shape, inputs[0].dtype(), grad);
  op->forward(c.backend(), inputs, y);
  if (grad) {
    Backend* be = &c.backend();
    ActivationArena* arena = &c.arena();
    c.tape()->record([=](Tape& t) {
      auto dy = t.grad(y);
      if (!dy) return;
      std::vector<Tensor> fresh(inputs.size());
      for (size_t i = 0; i < inputs.size(); ++i)
        if (inputs[i].requires_grad()) fresh[i] = arena->allocate(inputs[i].shape(), inputs[i].dtype());
      op->backward(*be, inputs, y, *dy, fresh);
      for (size_t i = 0; i < inputs.size(); ++i)
        if (!fresh[i].is_null())
          with_target(t, inputs[i], [&](Tensor g, bool acc) { be->axpy(g, fresh[i], 1.0f, acc); });
    });
  }
  return y;
}

}  // namespace loom::ops
