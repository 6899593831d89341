#include "parallel/tp_layers.h"

#include "core/error.h"
#include "parallel/tp_ops.h"

namespace loom {

ColumnParallelLinear::ColumnParallelLinear(int64_t in_features, int64_t out_features, TpGroup tp, InitSpec init)
    : tp_(tp), weight_(register_parameter("weight", Shape{out_features, in_features}, init, {tp.split(0)})) {}

Tensor ColumnParallelLinear::operator()(Ctx& c, const Tensor& x) const {
  return local(c, ops::copy_to_tp(c, x, tp_.comm));
}

Tensor ColumnParallelLinear::local(Ctx& c, const Tensor& x) const {
  return ops::linear(c, x, weight_.value());
}

RowParallelLinear::RowParallelLinear(int64_t in_features, int64_t out_features, TpGroup tp, InitSpec init)
    : tp_(tp), weight_(register_parameter("weight", Shape{out_features, in_features}, init, {tp.split(1)})) {}

Tensor RowParallelLinear::partial(Ctx& c, const Tensor& x) const {
  return ops::linear(c, x, weight_.value());
}

Tensor RowParallelLinear::operator()(Ctx& c, const Tensor& x) const {
  return ops::reduce_from_tp(c, partial(c, x), tp_.comm);
}

VocabParallelEmbedding::VocabParallelEmbedding(int64_t vocab, int64_t dim, TpGroup tp, InitSpec init)
    : tp_(tp),
      vocab_start_(tp.size > 1 ? tp.rank * (vocab / tp.size) : 0),
      weight_(register_parameter("weight", Shape{vocab, dim}, init, {tp.split(0)})) {}

Tensor VocabParallelEmbedding::operator()(Ctx& c, const Tensor& tokens) const {
  return ops::reduce_from_tp(c, ops::embedding(c, weight_.value(), tokens, vocab_start_), tp_.comm);
}

Tensor vocab_parallel_cross_entropy(Ctx& c, const Tensor& logits, const Tensor& targets, TpGroup tp) {
  if (tp.size <= 1 || tp.comm == nullptr) return ops::cross_entropy(c, logits, targets, 0, nullptr);
  CommReducer reducer(*tp.comm);
  return ops::cross_entropy(c, logits, targets, tp.rank * logits.size(1), &reducer);
}

}  // namespace loom
