// Differentiable ops. Each runs its forward kernel on the Ctx's backend, allocates its output from the
// activation arena, and — when the Ctx has a tape and an input needs a gradient — records its hand-written
// backward. Shapes are checked here, with messages naming the op and the argument.
//
// Layouts: activations are [..., features] row-major; attention tensors are [B, T, H, Dh]; linear weights are
// [out, in] (y = x W^T, as in PyTorch); tokens are i32.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/context.h"

namespace loom {

// All-reduce over the tensor-parallel group, as the vocab-parallel cross-entropy needs it. parallel/ provides
// the implementation; core only sees this interface, so it does not depend on a communicator.
class GroupReducer {
 public:
  virtual ~GroupReducer() = default;
  virtual void all_reduce_sum(const Tensor& t) = 0;  // in place, f32
  virtual void all_reduce_max(const Tensor& t) = 0;  // in place, f32
};

namespace ops {

// x [..., in], w [out, in] -> [..., out]
Tensor linear(Ctx& c, const Tensor& x, const Tensor& w);
// a + b, same shape.
Tensor add(Ctx& c, const Tensor& a, const Tensor& b);
// alpha * x
Tensor scale(Ctx& c, const Tensor& x, float alpha);
// The parts stacked along dimension 0 (the same trailing dimensions and dtype): the batch halves of the
// token-split overlap put back together.
Tensor concat_rows(Ctx& c, const std::vector<Tensor>& parts);
// RMSNorm over the last dimension with weight w [D].
Tensor rmsnorm(Ctx& c, const Tensor& x, const Tensor& w, float eps);
// table [V_local, D] holding rows vocab_start.., tokens i32 [...] -> [..., D]
Tensor embedding(Ctx& c, const Tensor& table, const Tensor& tokens, int64_t vocab_start = 0);
// Rotary embedding of x [B, T, H, Dh] (rotate-half convention, positions 0..T-1).
Tensor rope(Ctx& c, const Tensor& x, float base);
// Causal softmax attention, q/k/v [B, T, H, Dh] -> [B, T, H, Dh], scale 1/sqrt(Dh).
Tensor causal_attention(Ctx& c, const Tensor& q, const Tensor& k, const Tensor& v);
// silu(gate) * up
Tensor swiglu(Ctx& c, const Tensor& gate, const Tensor& up);
// Mean cross-entropy (f32 [1]) of logits [N, V_local] (vocab columns vocab_start..) against targets i32 [N].
// With tp != nullptr the logits are one shard of the vocabulary and the softmax statistics are all-reduced
// over the group; no full-vocabulary logits are ever formed.
Tensor cross_entropy(Ctx& c, const Tensor& logits, const Tensor& targets, int64_t vocab_start = 0,
                     GroupReducer* tp = nullptr);

}  // namespace ops

// A user-defined differentiable op: supply forward and backward kernels; check them with check_gradients()
// (core/gradcheck.h). Loom allocates the output and the input gradients and handles accumulation.
class CustomOp {
 public:
  virtual ~CustomOp() = default;
  virtual std::string name() const = 0;
  // The output shape for these inputs; throw loom::Error (kShape) for inputs the op cannot take.
  virtual Shape output_shape(const std::vector<Tensor>& inputs) const = 0;
  virtual void forward(Backend& backend, const std::vector<Tensor>& inputs, const Tensor& out) = 0;
  // Overwrite input_grads[i] with d(loss)/d(inputs[i]) given dout = d(loss)/d(out). input_grads[i] is a null
  // Tensor where that input needs no gradient.
  virtual void backward(Backend& backend, const std::vector<Tensor>& inputs, const Tensor& out, const Tensor& dout,
                        const std::vector<Tensor>& input_grads) = 0;
};

namespace ops {
// Runs a custom op; its output has the dtype of inputs[0].
Tensor apply(Ctx& c, std::shared_ptr<CustomOp> op, const std::vector<Tensor>& inputs);
}  // namespace ops

}  // namespace loom
