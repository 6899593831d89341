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

// The backward of the fused op: dn = bf16(the partials of the normalised rows' gradient summed in f32 in rank
// order) exactly as the kernels round it; from it, in f64, g = rstd (w dn - xhat mean_d(w dn xhat)) with
// xhat = x rstd, dx = g (+ dx_old where given), and dw = sum over rows of dn xhat.
inline void fused_norm_backward_reference(const std::vector<std::vector<uint16_t>>& dn_partials,
                                          const std::vector<uint16_t>& x, const std::vector<uint16_t>& weight,
                                          const std::vector<float>& rstd, const std::vector<uint16_t>* dx_old,
                                          int64_t rows, int64_t d, std::vector<uint16_t>* dn,
                                          std::vector<double>* dx, std::vector<double>* dw) {
  dn->resize(static_cast<size_t>(rows * d));
  dx->assign(static_cast<size_t>(rows * d), 0.0);
  dw->assign(static_cast<size_t>(d), 0.0);
  for (int64_t row = 0; row < rows; ++row) {
    const double rs = rstd[static_cast<size_t>(row)];
    double dot = 0;
    for (int64_t j = 0; j < d; ++j) {
      const size_t i = static_cast<size_t>(row * d + j);
      float acc = bf(dn_partials[0][i]);
      for (size_t p = 1; p < dn_partials.size(); ++p) acc += bf(dn_partials[p][i]);
      (*dn)[i] = f32_to_bf16(acc).bits;
      dot += bf(weight[static_cast<size_t>(j)]) * bf((*dn)[i]) * bf(x[i]) * rs;
    }
    const double mean = dot / static_cast<double>(d);
    for (int64_t j = 0; j < d; ++j) {
      const size_t i = static_cast<size_t>(row * d + j);
      const double xhat = bf(x[i]) * rs, g = bf((*dn)[i]);
      (*dx)[i] = rs * (bf(weight[static_cast<size_t>(j)]) * g - xhat * mean) + (dx_old ? bf((*dx_old)[i]) : 0.0);
      (*dw)[static_cast<size_t>(j)] += g * xhat;
    }
  }
}

// A backward problem's host inputs, from a seed: per-rank partial gradients of the normalised rows, the forward's
// residual rows x (the same on every rank), weight, rstd from x (as the forward gives it), an old dx.
struct BackwardInputs {
  std::vector<std::vector<uint16_t>> dn;
  std::vector<uint16_t> x, weight, dx_old;
  std::vector<float> rstd;

  BackwardInputs(int ranks, int64_t rows, int64_t d, uint64_t seed) {
    const int64_t n = rows * d;
    for (int r = 0; r < ranks; ++r) dn.push_back(random_bf16(n, seed, 20 + static_cast<uint64_t>(r), 0.3f));
    x = random_bf16(n, seed, 3, 1.0f);
    weight = random_bf16(d, seed, 4, 0.2f, 1.0f);
    dx_old = random_bf16(n, seed, 5, 0.1f);
    rstd.resize(static_cast<size_t>(rows));
    for (int64_t row = 0; row < rows; ++row) {
      double sq = 0;
      for (int64_t j = 0; j < d; ++j) sq += std::pow(bf(x[static_cast<size_t>(row * d + j)]), 2.0);
      rstd[static_cast<size_t>(row)] = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(d) + 1e-5));
    }
  }
};

// sqrt(sum (got - want)^2 / sum want^2): the norm-wise relative error.
template <class G>
double relative_error(const std::vector<G>& got, const std::vector<double>& want, double (*value)(G)) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double e = value(got[i]) - want[i];
    num += e * e;
    den += want[i] * want[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

}  // namespace loom::test
