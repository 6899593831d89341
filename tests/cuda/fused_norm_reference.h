// What the tests of the fused all-reduce + residual add + RMSNorm kernels share (tests/cuda/test_fused_norm_kernel.cc
// on virtual ranks, tests/mpi/test_fused_norm_ipc.cc across processes): seeded bf16 inputs and the host reference.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "core/dtype.h"
#include "core/rng.h"

namespace loom::test {

inline float bf(uint16_t b) {
  return bf16_to_f32(bf16{b});
}

// n bf16 values offset + scale * N(0, 1), from (seed, stream).
inline std::vector<uint16_t> random_bf16(int64_t n, uint64_t seed, uint64_t stream, float scale, float offset = 0.0f) {
  std::vector<uint16_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    v[static_cast<size_t>(i)] =
        f32_to_bf16(offset + scale * random_normal(seed, stream, static_cast<uint64_t>(i))).bits;
  return v;
}

// The new residual exactly as the kernels compute it (the partials summed in f32 in rank order, + residual, one
// rounding to bf16); the normalised rows (f32) and rstd (f64) from it in f64. rstd may be null.
inline void fused_norm_reference(const std::vector<std::vector<uint16_t>>& partials, const std::vector<uint16_t>& residual,
                                 const std::vector<uint16_t>& weight, int64_t rows, int64_t d, double eps,
                                 std::vector<uint16_t>* res, std::vector<float>* normed, std::vector<double>* rstd) {
  res->resize(static_cast<size_t>(rows * d));
  normed->resize(static_cast<size_t>(rows * d));
  if (rstd) rstd->resize(static_cast<size_t>(rows));
  for (int64_t row = 0; row < rows; ++row) {
    double sum_sq = 0;
    for (int64_t j = 0; j < d; ++j) {
      const size_t i = static_cast<size_t>(row * d + j);
      float acc = bf(partials[0][i]);
      for (size_t p = 1; p < partials.size(); ++p) acc += bf(partials[p][i]);
      (*res)[i] = f32_to_bf16(acc + bf(residual[i])).bits;
      const double x = bf((*res)[i]);
      sum_sq += x * x;
    }
    const double rs = 1.0 / std::sqrt(sum_sq / static_cast<double>(d) + eps);
    if (rstd) (*rstd)[static_cast<size_t>(row)] = rs;
    for (int64_t j = 0; j < d; ++j) {
      const size_t i = static_cast<size_t>(row * d + j);
      (*normed)[i] = static_cast<float>(bf((*res)[i]) * rs * bf(weight[static_cast<size_t>(j)]));
    }
  }
}

}  // namespace loom::test
