// Shared helpers for unit tests: random host tensors that own their storage, and comparisons that print the
// worst difference and the first mismatches.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <sstream>
#include <vector>

#include "core/rng.h"
#include "core/tensor.h"

namespace loom::test {

// A host f32/i32 tensor that owns its storage.
struct HostTensor {
  std::vector<float> f;
  std::vector<int32_t> i;
  Tensor t;
  static HostTensor randn(Shape shape, uint64_t seed, float scale = 1.0f) {
    HostTensor h;
    h.f.resize(static_cast<size_t>(shape.numel()));
    for (size_t k = 0; k < h.f.size(); ++k) h.f[k] = scale * random_normal(seed, 11, k);
    h.t = Tensor(h.f.data(), shape, DType::kF32, Device::kCpu);
    return h;
  }
  static HostTensor tokens(Shape shape, int64_t vocab, uint64_t seed) {
    HostTensor h;
    h.i.resize(static_cast<size_t>(shape.numel()));
    for (size_t k = 0; k < h.i.size(); ++k) h.i[k] = static_cast<int32_t>(random_u64(seed, 12, k) % vocab);
    h.t = Tensor(h.i.data(), shape, DType::kI32, Device::kCpu);
    return h;
  }
  HostTensor() = default;
  HostTensor(const HostTensor&) = delete;
  HostTensor(HostTensor&& o) noexcept : f(std::move(o.f)), i(std::move(o.i)), t(o.t) {
    // vectors keep their buffers on move, so the view stays valid
  }
};

// Max |a-b| / (atol + rtol*|b|) style check with a useful message.
inline ::testing::AssertionResult all_close(const float* a, const float* b, size_t n, double rtol, double atol) {
  double worst = 0;
  size_t worst_i = 0, bad = 0;
  std::ostringstream first;
  for (size_t k = 0; k < n; ++k) {
    double d = std::fabs(static_cast<double>(a[k]) - b[k]);
    bool ok = d <= atol + rtol * std::fabs(static_cast<double>(b[k])) && std::isfinite(a[k]);
    if (d > worst || !std::isfinite(a[k])) {
      worst = std::isfinite(a[k]) ? d : INFINITY;
      worst_i = k;
    }
    if (!ok && bad++ < 5) first << "\n  [" << k << "] got " << a[k] << ", expected " << b[k];
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << n << " elements differ; max abs diff " << worst << " at "
                                       << worst_i << first.str();
}

inline ::testing::AssertionResult all_close(const std::vector<float>& a, const std::vector<float>& b, double rtol,
                                            double atol) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "size " << a.size() << " != " << b.size();
  return all_close(a.data(), b.data(), a.size(), rtol, atol);
}

}  // namespace loom::test
