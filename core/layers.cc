#include "core/layers.h"

#include "core/error.h"

namespace loom {

Linear::Linear(int64_t in_features, int64_t out_features, InitSpec init, ParamOptions options)
    : weight_(register_parameter("weight", Shape{out_features, in_features}, init, options)) {}

RMSNorm::RMSNorm(int64_t dim, float eps)
    : weight_(register_parameter("weight", Shape{dim}, InitSpec::ones())), eps_(eps) {}

Embedding::Embedding(int64_t vocab, int64_t dim, InitSpec init)
    : weight_(register_parameter("weight", Shape{vocab, dim}, init)) {}

}  // namespace loom
