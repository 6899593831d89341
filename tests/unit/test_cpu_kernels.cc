// The CPU backend's kernels against straightforward double-precision references written here (naive loops over
// the formulas of core/backend.h), on random inputs with fixed seeds. Gradient outputs are checked with
// accumulate=false (the output poisoned with NaN first, so an unwritten element shows) and accumulate=true (the
// output pre-filled with random values). The CUDA backend is tested against this one, so these tests pin down
// the contract itself.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/cpu/cpu_internal.h"
#include "core/error.h"
#include "core/rng.h"

namespace loom {
namespace {

using Ref = std::vector<double>;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::vector<float> randn(int64_t n, uint64_t seed, float scale = 1.0f) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    v[static_cast<size_t>(i)] =
        scale * random_normal(seed, static_cast<uint64_t>(RngStream::kUser), static_cast<uint64_t>(i));
  return v;
}

Tensor view(std::vector<float>& v, Shape shape) {
  EXPECT_EQ(static_cast<int64_t>(v.size()), shape.numel());
  return Tensor(v.data(), shape, DType::kF32, Device::kCpu);
}

Tensor view(std::vector<int32_t>& v, Shape shape) {
  EXPECT_EQ(static_cast<int64_t>(v.size()), shape.numel());
  return Tensor(v.data(), shape, DType::kI32, Device::kCpu);
}

Ref to_ref(const std::vector<float>& v) {
  return Ref(v.begin(), v.end());
}

// got[i] must be within rtol * |want[i]| + atol of want[i], where atol defaults to rtol * max |want| (errors
// are judged against the size of the tensor, so elements that cancel to near zero do not need 1e-5 relative).
::testing::AssertionResult all_close(const std::vector<float>& got, const Ref& want, double rtol = 1e-5,
                                     double atol = -1) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << ", expected " << want.size();
  double scale = 0;
  for (double w : want) scale = std::max(scale, std::abs(w));
  if (atol < 0) atol = rtol * scale;
  double max_diff = 0;
  size_t bad = 0;
  std::ostringstream first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double diff = std::abs(static_cast<double>(got[i]) - want[i]);
    const bool ok = diff <= rtol * std::abs(want[i]) + atol;  // false for NaN
    if (!(diff <= max_diff)) max_diff = diff;
    if (!ok && bad++ < 5) first << "\n  [" << i << "] got " << got[i] << ", expected " << want[i];
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " elements differ (max |diff| " << max_diff
                                       << ", rtol " << rtol << ", atol " << atol << ")" << first.str();
}

::testing::AssertionResult all_equal(const std::vector<float>& got, const std::vector<float>& want) {
  size_t bad = 0;
  std::ostringstream first;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], 4) != 0 && bad++ < 5)
      first << "\n  [" << i << "] " << got[i] << " vs " << want[i];
  if (got.size() == want.size() && bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " elements differ bitwise (sizes " << got.size() << ", " << want.size()
                                       << ")" << first.str();
}

Ref plus(const std::vector<float>& base, const Ref& delta) {
  Ref r(delta.size());
  for (size_t i = 0; i < r.size(); ++i) r[i] = base[i] + delta[i];
  return r;
}

class CpuKernels : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be = make_cpu_backend(CpuBackendOptions{2});
};

// ---- identity and memory -----------------------------------------------------------------------------

TEST(CpuBackend, ReportsDeviceDtypeAndName) {
  auto be = make_cpu_backend(CpuBackendOptions{2});
  EXPECT_EQ(be->device(), Device::kCpu);
  EXPECT_EQ(be->compute_dtype(), DType::kF32);
  EXPECT_NE(be->name().find("cpu (2 threads, OpenBLAS"), std::string::npos) << be->name();
  auto all = make_cpu_backend(CpuBackendOptions{0});
  EXPECT_NE(all->name().find("thread"), std::string::npos) << all->name();
  EXPECT_THROW(make_cpu_backend(CpuBackendOptions{-1}), Error);
}

TEST_F(CpuKernels, AllocateIsAlignedAndNamesTheSizeOnFailure) {
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{255}, size_t{256}, size_t{1000}, size_t{1} << 20}) {
    void* p = be->allocate(bytes);
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 256, 0u) << bytes << " bytes";
    std::memset(p, 0xab, bytes);
    be->deallocate(p);
  }
  const size_t huge = size_t{1} << 62;
  try {
    be->allocate(huge);
    FAIL() << "allocating 2^62 bytes succeeded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(std::to_string(huge)), std::string::npos) << e.what();
  }
}

// ---- the vectorisable exp of the kernels ------------------------------------------------------------

TEST(CpuBackend, FastExpIsWithinTwoUlpOfExp) {
  double worst = 0;
  float worst_at = 0;
  for (int64_t i = 0; i <= 1750000; ++i) {
    const float x = -87.0f + static_cast<float>(i) * 1e-4f;  // -87 .. 88
    const double want = std::exp(static_cast<double>(x));
    const double err = std::abs(static_cast<double>(cpu::fast_exp(x)) - want) / want;
    if (err > worst) {
      worst = err;
      worst_at = x;
    }
  }
  EXPECT_LT(worst, 1.2e-7) << "max relative error " << worst << " at x = " << worst_at;
  EXPECT_EQ(cpu::fast_exp(0.0f), 1.0f);
  EXPECT_EQ(cpu::fast_exp(-88.0f), 0.0f);
  EXPECT_EQ(cpu::fast_exp(-1e30f), 0.0f);
  EXPECT_EQ(cpu::fast_exp(-std::numeric_limits<float>::infinity()), 0.0f);
  EXPECT_EQ(cpu::fast_exp(89.0f), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(cpu::fast_exp(kNaN)));
}

// ---- copy and fill -----------------------------------------------------------------------------------

TEST_F(CpuKernels, CopyConvertsBetweenF32AndBf16) {
  std::vector<float> src = randn(3001, 11, 100.0f);
  src[0] = 0.0f;
  src[1] = -0.0f;
  src[2] = std::numeric_limits<float>::infinity();
  src[3] = -std::numeric_limits<float>::infinity();
  src[4] = kNaN;
  src[5] = 1e-30f;
  src[6] = 3.0e38f;
  const int64_t n = static_cast<int64_t>(src.size());
  std::vector<bf16> half(src.size(), bf16{0x7fc1});
  be->copy(Tensor(half.data(), Shape{n}, DType::kBF16, Device::kCpu), view(src, Shape{n}));
  for (size_t i = 0; i < src.size(); ++i)
    ASSERT_EQ(half[i].bits, f32_to_bf16(src[i]).bits) << "element " << i << " = " << src[i];

  std::vector<float> back(src.size(), kNaN);
  be->copy(view(back, Shape{n}), Tensor(half.data(), Shape{n}, DType::kBF16, Device::kCpu));
  for (size_t i = 0; i < src.size(); ++i) {
    const float expect = bf16_to_f32(half[i]);
    ASSERT_EQ(std::memcmp(&back[i], &expect, 4), 0) << "element " << i;
    if (std::isfinite(src[i]) && std::abs(src[i]) < 3e38f) {
      ASSERT_LE(std::abs(back[i] - src[i]), std::abs(src[i]) * (1.0f / 256)) << "round trip of element " << i;
    }
  }
  EXPECT_TRUE(std::isnan(back[4]));
  EXPECT_TRUE(std::signbit(back[1]));
}

TEST_F(CpuKernels, CopyIsVerbatimForEqualDtypes) {
  std::vector<float> f = randn(70001, 12);  // large enough to be split over threads
  std::vector<float> f_out(f.size(), kNaN);
  const int64_t nf = static_cast<int64_t>(f.size());
  be->copy(view(f_out, Shape{nf}), view(f, Shape{nf}));
  EXPECT_TRUE(all_equal(f_out, f));

  std::vector<int32_t> i(777), i_out(777, -1);
  for (size_t j = 0; j < i.size(); ++j) i[j] = static_cast<int32_t>(j * 2654435761u);
  be->copy(view(i_out, Shape{777}), view(i, Shape{777}));
  EXPECT_EQ(i_out, i);

  std::vector<uint16_t> u(513), u_out(513, 0);
  for (size_t j = 0; j < u.size(); ++j) u[j] = static_cast<uint16_t>(j * 40503u);
  be->copy(Tensor(u_out.data(), Shape{513}, DType::kU16, Device::kCpu),
           Tensor(u.data(), Shape{513}, DType::kU16, Device::kCpu));
  EXPECT_EQ(u_out, u);

  std::vector<uint16_t> h_out(513, 0);  // bf16 -> bf16 keeps every bit pattern, NaN payloads included
  be->copy(Tensor(h_out.data(), Shape{513}, DType::kBF16, Device::kCpu),
           Tensor(u.data(), Shape{513}, DType::kBF16, Device::kCpu));
  EXPECT_EQ(h_out, u);
}

TEST_F(CpuKernels, CopyRejectsMismatchedArguments) {
  std::vector<float> a(10), b(12);
  std::vector<int32_t> ints(10);
  EXPECT_THROW(be->copy(view(a, Shape{10}), view(b, Shape{12})), Error);
  EXPECT_THROW(be->copy(view(a, Shape{10}), view(ints, Shape{10})), Error);
  EXPECT_THROW(be->copy(Tensor(a.data(), Shape{10}, DType::kF32, Device::kCuda), view(a, Shape{10})), Error);
}

TEST_F(CpuKernels, FillWritesEveryElement) {
  std::vector<float> f(50001, kNaN);
  be->fill(view(f, Shape{50001}), -2.5f);
  EXPECT_TRUE(all_equal(f, std::vector<float>(f.size(), -2.5f)));
  std::vector<bf16> h(99, bf16{0});
  be->fill(Tensor(h.data(), Shape{99}, DType::kBF16, Device::kCpu), 1.1f);
  for (const bf16& x : h) ASSERT_EQ(x.bits, f32_to_bf16(1.1f).bits);
  std::vector<int32_t> ints(33, 0);
  be->fill(view(ints, Shape{33}), 7.0f);
  EXPECT_EQ(ints, std::vector<int32_t>(33, 7));
}

// ---- elementwise -------------------------------------------------------------------------------------

TEST_F(CpuKernels, AddAndAxpy) {
  const int64_t n = 40003;
  std::vector<float> a = randn(n, 21), b = randn(n, 22), out(n, kNaN);
  Ref sum(n);
  for (int64_t i = 0; i < n; ++i) sum[i] = static_cast<double>(a[i]) + b[i];
  be->add(view(out, Shape{n}), view(a, Shape{n}), view(b, Shape{n}));
  EXPECT_TRUE(all_close(out, sum, 1e-7));
  std::vector<float> alias = a;  // out aliases a
  be->add(view(alias, Shape{n}), view(alias, Shape{n}), view(b, Shape{n}));
  EXPECT_TRUE(all_equal(alias, out));

  for (bool accumulate : {false, true}) {
    std::vector<float> dst = accumulate ? randn(n, 23) : std::vector<float>(n, kNaN);
    const std::vector<float> before = dst;
    Ref want(n);
    for (int64_t i = 0; i < n; ++i) want[i] = (accumulate ? before[i] : 0.0) - 0.75 * a[i];
    be->axpy(view(dst, Shape{n}), view(a, Shape{n}), -0.75f, accumulate);
    EXPECT_TRUE(all_close(dst, want, 1e-6)) << "accumulate " << accumulate;
  }
}

// ---- matmul ------------------------------------------------------------------------------------------

TEST_F(CpuKernels, MatmulAllTransposesAndBetas) {
  struct Size {
    int64_t m, n, k;
  };
  for (Size sz : {Size{19, 23, 37}, Size{67, 45, 130}, Size{1, 5, 3}, Size{4, 3, 0}}) {  // k = 0: C = beta C
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        for (float beta : {0.0f, 1.0f}) {
          const int64_t m = sz.m, n = sz.n, k = sz.k;
          std::vector<float> a = randn(m * k, 31), b = randn(k * n, 32);
          std::vector<float> c = beta == 0 ? std::vector<float>(m * n, kNaN) : randn(m * n, 33);
          const std::vector<float> c0 = c;
          const float alpha = 0.75f;
          // Stored shapes: A is [m, k] or, transposed, [k, m]; B is [k, n] or [n, k].
          auto at = [&](int64_t i, int64_t p) { return static_cast<double>(ta ? a[p * m + i] : a[i * k + p]); };
          auto bt = [&](int64_t p, int64_t j) { return static_cast<double>(tb ? b[j * k + p] : b[p * n + j]); };
          Ref want(m * n);
          for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < n; ++j) {
              double s = 0;
              for (int64_t p = 0; p < k; ++p) s += at(i, p) * bt(p, j);
              want[i * n + j] = alpha * s + (beta == 0 ? 0.0 : beta * c0[i * n + j]);
            }
          be->matmul(view(c, Shape{m, n}), view(a, ta ? Shape{k, m} : Shape{m, k}), ta,
                     view(b, tb ? Shape{n, k} : Shape{k, n}), tb, alpha, beta);
          EXPECT_TRUE(all_close(c, want, 1e-5))
              << m << "x" << n << "x" << k << " trans_a " << ta << " trans_b " << tb << " beta " << beta;
        }
      }
    }
  }
}

TEST_F(CpuKernels, MatmulRejectsBadArguments) {
  std::vector<float> a(6), b(6), c(4);
  std::vector<uint16_t> c16(4);
  EXPECT_THROW(be->matmul(view(c, Shape{2, 2}), view(a, Shape{2, 3}), false, view(b, Shape{2, 3}), false, 1, 0),
               Error);  // inner dimensions 3 vs 2
  EXPECT_THROW(be->matmul(Tensor(c16.data(), Shape{2, 2}, DType::kBF16, Device::kCpu), view(a, Shape{2, 3}), false,
                          view(b, Shape{3, 2}), false, 1, 0),
               Error);  // C must be f32
  EXPECT_THROW(be->matmul(view(c, Shape{4, 1}), view(a, Shape{2, 3}), false, view(b, Shape{3, 2}), false, 1, 0),
               Error);  // C has the wrong shape
}

// ---- embedding ---------------------------------------------------------------------------------------

TEST_F(CpuKernels, EmbeddingShardWithOutOfRangeTokens) {
  const int64_t v_local = 11, d = 24, start = 7;
  std::vector<int32_t> tokens = {7, 17, 3, 18, 12, 12, -5, 100, 7, 9, 9, 9, 0, 16, 12, 25, 8, 11, 13, 14};
  const int64_t n = static_cast<int64_t>(tokens.size());
  std::vector<float> table = randn(v_local * d, 41);

  std::vector<float> out(n * d, kNaN);
  be->embedding_forward(view(out, Shape{n, d}), view(table, Shape{v_local, d}), view(tokens, Shape{n}), start);
  Ref want(n * d, 0.0);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t row = tokens[r] - start;
    if (row >= 0 && row < v_local)
      for (int64_t c = 0; c < d; ++c) want[r * d + c] = table[row * d + c];
  }
  EXPECT_TRUE(all_close(out, want, 0, 0));

  std::vector<float> dout = randn(n * d, 42), dtable = randn(v_local * d, 43);
  Ref dwant = to_ref(dtable);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t row = tokens[r] - start;
    if (row >= 0 && row < v_local)
      for (int64_t c = 0; c < d; ++c) dwant[row * d + c] += dout[r * d + c];
  }
  be->embedding_backward(view(dtable, Shape{v_local, d}), view(dout, Shape{n, d}), view(tokens, Shape{n}), start);
  EXPECT_TRUE(all_close(dtable, dwant, 1e-6));
}

TEST_F(CpuKernels, EmbeddingBackwardWideTable) {
  // Wide enough (and enough tokens) that the column split runs on both threads.
  const int64_t v_local = 50, d = 200, n = 300;
  std::vector<int32_t> tokens(n);
  for (int64_t i = 0; i < n; ++i) tokens[i] = static_cast<int32_t>(random_u64(44, 3, static_cast<uint64_t>(i)) % 60);
  std::vector<float> dout = randn(n * d, 45), dtable = randn(v_local * d, 46);
  Ref dwant = to_ref(dtable);
  for (int64_t r = 0; r < n; ++r)
    if (tokens[r] < v_local)
      for (int64_t c = 0; c < d; ++c) dwant[tokens[r] * d + c] += dout[r * d + c];
  be->embedding_backward(view(dtable, Shape{v_local, d}), view(dout, Shape{n, d}), view(tokens, Shape{n}), 0);
  EXPECT_TRUE(all_close(dtable, dwant, 1e-5));
}

// ---- RMSNorm -----------------------------------------------------------------------------------------

TEST_F(CpuKernels, RmsNormForwardAndBackward) {
  const int64_t n = 13, d = 70;
  const float eps = 1e-5f;
  std::vector<float> x = randn(n * d, 51, 2.0f), w = randn(d, 52), dy = randn(n * d, 53);
  Ref y_ref(n * d), rstd_ref(n), dx_ref(n * d), dw_ref(d, 0.0);
  for (int64_t r = 0; r < n; ++r) {
    double ss = 0;
    for (int64_t c = 0; c < d; ++c) ss += static_cast<double>(x[r * d + c]) * x[r * d + c];
    const double rs = 1.0 / std::sqrt(ss / d + eps);
    rstd_ref[r] = rs;
    double mean = 0;
    for (int64_t c = 0; c < d; ++c) {
      const double xhat = x[r * d + c] * rs;
      y_ref[r * d + c] = xhat * w[c];
      mean += w[c] * static_cast<double>(dy[r * d + c]) * xhat / d;
      dw_ref[c] += dy[r * d + c] * xhat;
    }
    for (int64_t c = 0; c < d; ++c)
      dx_ref[r * d + c] = rs * (w[c] * static_cast<double>(dy[r * d + c]) - x[r * d + c] * rs * mean);
  }
  std::vector<float> y(n * d, kNaN), rstd(n, kNaN);
  be->rmsnorm_forward(view(y, Shape{n, d}), view(rstd, Shape{n}), view(x, Shape{n, d}), view(w, Shape{d}), eps);
  EXPECT_TRUE(all_close(y, y_ref));
  EXPECT_TRUE(all_close(rstd, rstd_ref));

  for (bool accumulate : {false, true}) {
    std::vector<float> dx = accumulate ? randn(n * d, 54) : std::vector<float>(n * d, kNaN);
    std::vector<float> dw = randn(d, 55);  // dw always accumulates
    const Ref dx_want = accumulate ? plus(dx, dx_ref) : dx_ref;
    const Ref dw_want = plus(dw, dw_ref);
    be->rmsnorm_backward(view(dx, Shape{n, d}), accumulate, view(dw, Shape{d}), view(dy, Shape{n, d}),
                         view(x, Shape{n, d}), view(w, Shape{d}), view(rstd, Shape{n}));
    EXPECT_TRUE(all_close(dx, dx_want)) << "dx, accumulate " << accumulate;
    EXPECT_TRUE(all_close(dw, dw_want)) << "dw, accumulate " << accumulate;
  }
}

// ---- RoPE --------------------------------------------------------------------------------------------

Ref rope_ref(const std::vector<float>& x, int64_t b, int64_t t, int64_t h, int64_t dh, double base, double sign) {
  Ref out(x.size());
  const int64_t half = dh / 2;
  for (int64_t i0 = 0; i0 < b * t * h; ++i0) {
    const int64_t pos = (i0 / h) % t;
    const float* xr = x.data() + i0 * dh;
    for (int64_t i = 0; i < half; ++i) {
      const double a = pos * std::pow(base, -2.0 * i / dh);
      const double c = std::cos(a), s = sign * std::sin(a);
      out[i0 * dh + i] = xr[i] * c - xr[i + half] * s;
      out[i0 * dh + i + half] = xr[i + half] * c + xr[i] * s;
    }
  }
  return out;
}

TEST_F(CpuKernels, RopeForwardBackwardAndInverse) {
  struct Case {
    int64_t b, t, h, dh;
    float base;
  };
  // The second case grows the cached table, the third changes base, the fourth goes back to a shorter T.
  for (Case cs : {Case{2, 37, 3, 16, 10000.0f}, Case{1, 300, 2, 8, 10000.0f}, Case{2, 37, 3, 16, 500.0f},
                  Case{1, 5, 1, 64, 10000.0f}}) {
    const Shape shape{cs.b, cs.t, cs.h, cs.dh};
    const int64_t n = shape.numel();
    std::vector<float> x = randn(n, 61), out(n, kNaN);
    be->rope_forward(view(out, shape), view(x, shape), cs.base);
    // Angles reach t ~ 300 rad: allow the f32 rounding of cos/sin of a large angle.
    EXPECT_TRUE(all_close(out, rope_ref(x, cs.b, cs.t, cs.h, cs.dh, cs.base, 1.0), 2e-6))
        << "forward T " << cs.t << " base " << cs.base;

    std::vector<float> dy = randn(n, 62);
    const Ref inv = rope_ref(dy, cs.b, cs.t, cs.h, cs.dh, cs.base, -1.0);
    for (bool accumulate : {false, true}) {
      std::vector<float> dx = accumulate ? randn(n, 63) : std::vector<float>(n, kNaN);
      const Ref want = accumulate ? plus(dx, inv) : inv;
      be->rope_backward(view(dx, shape), accumulate, view(dy, shape), cs.base);
      EXPECT_TRUE(all_close(dx, want, 2e-6)) << "backward T " << cs.t << " accumulate " << accumulate;
    }
    // The backward is the inverse rotation: it undoes the forward.
    std::vector<float> round_trip(n, kNaN);
    be->rope_backward(view(round_trip, shape), false, view(out, shape), cs.base);
    EXPECT_TRUE(all_close(round_trip, to_ref(x), 1e-6));
  }
}

// ---- attention ---------------------------------------------------------------------------------------

struct AttentionRef {
  Ref out, lse, dq, dk, dv;
};

// Naive causal attention in double over [B, T, H, Dh] tensors, with the gradients for dout.
AttentionRef attention_ref(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                           const std::vector<float>& dout, int64_t B, int64_t T, int64_t H, int64_t Dh, double scale) {
  AttentionRef r{Ref(q.size(), 0.0), Ref(B * H * T), Ref(q.size(), 0.0), Ref(q.size(), 0.0), Ref(q.size(), 0.0)};
  auto at = [&](int64_t b, int64_t t, int64_t h) { return ((b * T + t) * H + h) * Dh; };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        Ref s(t + 1), p(t + 1);
        double m = -1e300;
        for (int64_t u = 0; u <= t; ++u) {
          double dot = 0;
          for (int64_t d = 0; d < Dh; ++d) dot += static_cast<double>(q[at(b, t, h) + d]) * k[at(b, u, h) + d];
          s[u] = scale * dot;
          m = std::max(m, s[u]);
        }
        double z = 0;
        for (int64_t u = 0; u <= t; ++u) z += std::exp(s[u] - m);
        r.lse[(b * H + h) * T + t] = m + std::log(z);
        for (int64_t u = 0; u <= t; ++u) {
          p[u] = std::exp(s[u] - m) / z;
          for (int64_t d = 0; d < Dh; ++d) r.out[at(b, t, h) + d] += p[u] * v[at(b, u, h) + d];
        }
        double delta = 0;
        for (int64_t d = 0; d < Dh; ++d) delta += dout[at(b, t, h) + d] * r.out[at(b, t, h) + d];
        for (int64_t u = 0; u <= t; ++u) {
          double dp = 0;
          for (int64_t d = 0; d < Dh; ++d) dp += static_cast<double>(dout[at(b, t, h) + d]) * v[at(b, u, h) + d];
          const double ds = p[u] * (dp - delta);
          for (int64_t d = 0; d < Dh; ++d) {
            r.dv[at(b, u, h) + d] += p[u] * dout[at(b, t, h) + d];
            r.dq[at(b, t, h) + d] += scale * ds * k[at(b, u, h) + d];
            r.dk[at(b, u, h) + d] += scale * ds * q[at(b, t, h) + d];
          }
        }
      }
  return r;
}

struct AttnCase {
  int64_t b, t, h, dh;
};

TEST_F(CpuKernels, AttentionForwardAndBackward) {
  // Odd sizes; T = 1; Dh not a multiple of anything; several key blocks (T > 128); and rows split into several
  // tasks and several row blocks per task (T = 600 with one head).
  for (AttnCase cs : {AttnCase{2, 37, 3, 16}, AttnCase{1, 1, 2, 8}, AttnCase{1, 6, 1, 5}, AttnCase{1, 70, 2, 32},
                      AttnCase{1, 130, 2, 72}, AttnCase{1, 600, 1, 8}}) {
    const Shape shape{cs.b, cs.t, cs.h, cs.dh};
    const Shape lse_shape{cs.b, cs.h, cs.t};
    const int64_t n = shape.numel();
    const float scale = 1.0f / std::sqrt(static_cast<float>(cs.dh));
    std::vector<float> q = randn(n, 71, 1.5f), k = randn(n, 72, 1.5f), v = randn(n, 73), dout = randn(n, 74);
    const AttentionRef ref = attention_ref(q, k, v, dout, cs.b, cs.t, cs.h, cs.dh, scale);
    std::vector<float> out(n, kNaN), lse(cs.b * cs.h * cs.t, kNaN);
    be->attention_forward(view(out, shape), view(lse, lse_shape), view(q, shape), view(k, shape), view(v, shape),
                          scale);
    const std::string where = "B " + std::to_string(cs.b) + " T " + std::to_string(cs.t) + " H " +
                              std::to_string(cs.h) + " Dh " + std::to_string(cs.dh);
    EXPECT_TRUE(all_close(out, ref.out)) << "out, " << where;
    EXPECT_TRUE(all_close(lse, ref.lse)) << "lse, " << where;

    for (bool accumulate : {false, true}) {
      std::vector<float> dq = accumulate ? randn(n, 75) : std::vector<float>(n, kNaN);
      std::vector<float> dk = accumulate ? randn(n, 76) : std::vector<float>(n, kNaN);
      std::vector<float> dv = accumulate ? randn(n, 77) : std::vector<float>(n, kNaN);
      const Ref dq_want = accumulate ? plus(dq, ref.dq) : ref.dq;
      const Ref dk_want = accumulate ? plus(dk, ref.dk) : ref.dk;
      const Ref dv_want = accumulate ? plus(dv, ref.dv) : ref.dv;
      be->attention_backward(view(dq, shape), view(dk, shape), view(dv, shape), accumulate, view(dout, shape),
                             view(q, shape), view(k, shape), view(v, shape), view(out, shape), view(lse, lse_shape),
                             scale);
      EXPECT_TRUE(all_close(dq, dq_want)) << "dq, " << where << ", accumulate " << accumulate;
      EXPECT_TRUE(all_close(dk, dk_want)) << "dk, " << where << ", accumulate " << accumulate;
      EXPECT_TRUE(all_close(dv, dv_want)) << "dv, " << where << ", accumulate " << accumulate;
    }
  }
}

TEST_F(CpuKernels, AttentionGradientMatchesFiniteDifferences) {
  const int64_t B = 1, T = 5, H = 2, Dh = 4, n = B * T * H * Dh;
  const Shape shape{B, T, H, Dh}, lse_shape{B, H, T};
  const float scale = 0.5f;
  std::vector<float> q = randn(n, 81), k = randn(n, 82), v = randn(n, 83), w = randn(n, 84);
  std::vector<float> out(n), lse(B * H * T);
  // loss = sum out * w, accumulated in double; its gradient with respect to out is w.
  auto loss = [&]() {
    be->attention_forward(view(out, shape), view(lse, lse_shape), view(q, shape), view(k, shape), view(v, shape),
                          scale);
    double l = 0;
    for (int64_t i = 0; i < n; ++i) l += static_cast<double>(out[i]) * w[i];
    return l;
  };
  loss();
  std::vector<float> dq(n, kNaN), dk(n, kNaN), dv(n, kNaN);
  be->attention_backward(view(dq, shape), view(dk, shape), view(dv, shape), false, view(w, shape), view(q, shape),
                         view(k, shape), view(v, shape), view(out, shape), view(lse, lse_shape), scale);
  const float h = 1e-2f;
  auto numeric = [&](std::vector<float>& x) {
    Ref g(n);
    for (int64_t i = 0; i < n; ++i) {
      const float x0 = x[i];
      x[i] = x0 + h;
      const double up = loss();
      x[i] = x0 - h;
      const double down = loss();
      x[i] = x0;
      g[i] = (up - down) / (static_cast<double>(x0 + h) - static_cast<double>(x0 - h));
    }
    return g;
  };
  // Central differences of an f32 forward: truncation ~h^2, rounding ~1e-7 / h.
  EXPECT_TRUE(all_close(dq, numeric(q), 1e-3, 1e-3)) << "dq";
  EXPECT_TRUE(all_close(dk, numeric(k), 1e-3, 1e-3)) << "dk";
  EXPECT_TRUE(all_close(dv, numeric(v), 1e-3, 1e-3)) << "dv";
}

// ---- SwiGLU ------------------------------------------------------------------------------------------

TEST_F(CpuKernels, SwigluForwardAndBackward) {
  const int64_t n = 40001;  // split over threads
  std::vector<float> gate = randn(n, 91, 3.0f), up = randn(n, 92), dout = randn(n, 93);
  // Saturated gates: exp(-g) overflows or underflows f32 there.
  const float extremes[] = {0.0f, 30.0f, -30.0f, 90.0f, -90.0f, 100.0f, -100.0f, 1e-8f};
  for (size_t i = 0; i < std::size(extremes); ++i) gate[i] = extremes[i];
  Ref out_ref(n), dg_ref(n), du_ref(n);
  for (int64_t i = 0; i < n; ++i) {
    const double g = gate[i], s = 1.0 / (1.0 + std::exp(-g));
    out_ref[i] = g * s * up[i];
    dg_ref[i] = dout[i] * static_cast<double>(up[i]) * s * (1.0 + g * (1.0 - s));
    du_ref[i] = dout[i] * g * s;
  }
  std::vector<float> out(n, kNaN);
  be->swiglu_forward(view(out, Shape{n}), view(gate, Shape{n}), view(up, Shape{n}));
  EXPECT_TRUE(all_close(out, out_ref));
  for (bool accumulate : {false, true}) {
    std::vector<float> dg = accumulate ? randn(n, 94) : std::vector<float>(n, kNaN);
    std::vector<float> du = accumulate ? randn(n, 95) : std::vector<float>(n, kNaN);
    const Ref dg_want = accumulate ? plus(dg, dg_ref) : dg_ref;
    const Ref du_want = accumulate ? plus(du, du_ref) : du_ref;
    be->swiglu_backward(view(dg, Shape{n}), view(du, Shape{n}), accumulate, view(dout, Shape{n}), view(gate, Shape{n}),
                        view(up, Shape{n}));
    EXPECT_TRUE(all_close(dg, dg_want)) << "dgate, accumulate " << accumulate;
    EXPECT_TRUE(all_close(du, du_want)) << "dup, accumulate " << accumulate;
  }
}

// ---- cross-entropy -----------------------------------------------------------------------------------

TEST_F(CpuKernels, CrossEntropyShardWithForeignTargets) {
  const int64_t n = 9, v = 23, start = 40;
  std::vector<float> logits = randn(n * v, 101, 3.0f);
  // Targets inside the shard [40, 63) and outside it, on both sides.
  std::vector<int32_t> targets = {40, 62, 3, 51, 63, 100, 45, 0, 57};
  Ref max_ref(n), sumexp_ref(n), target_ref(n), dl_ref(n * v);
  double loss_ref = 0;
  const float dloss = 0.7f, scale = 1.0f / n;
  for (int64_t r = 0; r < n; ++r) {
    double m = -1e300;
    for (int64_t c = 0; c < v; ++c) m = std::max(m, static_cast<double>(logits[r * v + c]));
    double z = 0;
    for (int64_t c = 0; c < v; ++c) z += std::exp(logits[r * v + c] - m);
    const int64_t col = targets[r] - start;
    const bool local = col >= 0 && col < v;
    max_ref[r] = m;
    sumexp_ref[r] = z;
    target_ref[r] = local ? logits[r * v + col] : 0.0;
    loss_ref += (std::log(z) + m - target_ref[r]) / n;
    for (int64_t c = 0; c < v; ++c)
      dl_ref[r * v + c] =
          dloss * static_cast<double>(scale) * (std::exp(logits[r * v + c] - m) / z - (c == col ? 1 : 0));
  }
  const Shape lshape{n, v};
  std::vector<float> row_max(n, kNaN), stats(2 * n, kNaN), loss(1, kNaN);
  be->ce_row_max(view(row_max, Shape{n}), view(logits, lshape));
  EXPECT_TRUE(all_close(row_max, max_ref, 0, 0));
  Tensor stats_t = view(stats, Shape{2, n});
  Tensor sumexp = stats_t.rows(0, 1).reshape(Shape{n}), target_logit = stats_t.rows(1, 2).reshape(Shape{n});
  be->ce_sumexp_target(sumexp, target_logit, view(logits, lshape), view(row_max, Shape{n}), view(targets, Shape{n}),
                       start);
  EXPECT_TRUE(all_close(std::vector<float>(stats.begin(), stats.begin() + n), sumexp_ref)) << "sumexp";
  EXPECT_TRUE(all_close(std::vector<float>(stats.begin() + n, stats.end()), target_ref, 0, 0)) << "target_logit";
  be->ce_loss_mean(view(loss, Shape{1}), view(row_max, Shape{n}), sumexp, target_logit);
  EXPECT_NEAR(loss[0], loss_ref, 1e-6 * std::abs(loss_ref));

  std::vector<float> dl_one(1, dloss);
  for (bool accumulate : {false, true}) {
    std::vector<float> dlogits = accumulate ? randn(n * v, 102, 0.1f) : std::vector<float>(n * v, kNaN);
    const Ref want = accumulate ? plus(dlogits, dl_ref) : dl_ref;
    be->ce_backward(view(dlogits, lshape), accumulate, view(logits, lshape), view(row_max, Shape{n}), sumexp,
                    view(targets, Shape{n}), start, view(dl_one, Shape{1}), scale);
    EXPECT_TRUE(all_close(dlogits, want)) << "accumulate " << accumulate;
  }
}

TEST_F(CpuKernels, CrossEntropyShardsCombineToTheFullVocabulary) {
  // What vocab-parallel cross-entropy does with two shards, the all-reduces done by hand.
  const int64_t n = 6, v = 50, split = 23;
  std::vector<float> logits = randn(n * v, 111, 2.0f);
  std::vector<int32_t> targets = {0, 22, 23, 49, 30, 5};
  auto columns = [&](int64_t c0, int64_t c1) {
    std::vector<float> part(n * (c1 - c0));
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = c0; c < c1; ++c) part[r * (c1 - c0) + c - c0] = logits[r * v + c];
    return part;
  };
  std::vector<float> shard[2] = {columns(0, split), columns(split, v)};
  const int64_t start[2] = {0, split}, width[2] = {split, v - split};
  std::vector<float> row_max(n, -std::numeric_limits<float>::infinity());
  for (int s = 0; s < 2; ++s) {
    std::vector<float> m(n);
    be->ce_row_max(view(m, Shape{n}), view(shard[s], Shape{n, width[s]}));
    for (int64_t r = 0; r < n; ++r) row_max[r] = std::max(row_max[r], m[r]);
  }
  std::vector<float> stats(2 * n, 0.0f);
  for (int s = 0; s < 2; ++s) {
    std::vector<float> part(2 * n);
    Tensor pt = view(part, Shape{2, n});
    be->ce_sumexp_target(pt.rows(0, 1).reshape(Shape{n}), pt.rows(1, 2).reshape(Shape{n}),
                         view(shard[s], Shape{n, width[s]}), view(row_max, Shape{n}), view(targets, Shape{n}),
                         start[s]);
    for (int64_t i = 0; i < 2 * n; ++i) stats[i] += part[i];
  }
  Tensor st = view(stats, Shape{2, n});
  std::vector<float> loss(1);
  be->ce_loss_mean(view(loss, Shape{1}), view(row_max, Shape{n}), st.rows(0, 1).reshape(Shape{n}),
                   st.rows(1, 2).reshape(Shape{n}));
  double want = 0;
  for (int64_t r = 0; r < n; ++r) {
    double m = -1e300, z = 0;
    for (int64_t c = 0; c < v; ++c) m = std::max(m, static_cast<double>(logits[r * v + c]));
    for (int64_t c = 0; c < v; ++c) z += std::exp(logits[r * v + c] - m);
    want += (m + std::log(z) - logits[r * v + targets[r]]) / n;
  }
  EXPECT_NEAR(loss[0], want, 1e-6 * std::abs(want));

  // The shards' gradients, side by side, are the full softmax minus one-hot.
  std::vector<float> dl_one(1, 1.0f);
  for (int s = 0; s < 2; ++s) {
    std::vector<float> d(n * width[s], kNaN);
    be->ce_backward(view(d, Shape{n, width[s]}), false, view(shard[s], Shape{n, width[s]}), view(row_max, Shape{n}),
                    st.rows(0, 1).reshape(Shape{n}), view(targets, Shape{n}), start[s], view(dl_one, Shape{1}),
                    1.0f / n);
    Ref ref(n * width[s]);
    for (int64_t r = 0; r < n; ++r) {
      double m = -1e300, z = 0;
      for (int64_t c = 0; c < v; ++c) m = std::max(m, static_cast<double>(logits[r * v + c]));
      for (int64_t c = 0; c < v; ++c) z += std::exp(logits[r * v + c] - m);
      for (int64_t c = 0; c < width[s]; ++c) {
        const int64_t col = start[s] + c;
        ref[r * width[s] + c] = (std::exp(logits[r * v + col] - m) / z - (col == targets[r] ? 1 : 0)) / n;
      }
    }
    EXPECT_TRUE(all_close(d, ref)) << "shard " << s;
  }
}

// ---- sum of squares ----------------------------------------------------------------------------------

TEST_F(CpuKernels, SumSquaresOfAMillionElements) {
  const int64_t n = (int64_t{1} << 20) + 77;
  std::vector<float> x = randn(n, 121, 0.3f);
  x[5] += 2.0f;  // not centred, so the sum is not a cancellation
  double ref = 0;
  for (float a : x) ref += static_cast<double>(a) * a;
  std::vector<float> out(1, kNaN);
  be->sum_squares(view(out, Shape{1}), view(x, Shape{n}), false);
  EXPECT_NEAR(out[0], ref, 1e-6 * ref);
  out[0] = 3.5f;
  be->sum_squares(view(out, Shape{1}), view(x, Shape{n}), true);
  EXPECT_NEAR(out[0], ref + 3.5, 1e-6 * ref);
  // Short input, and an empty one.
  std::vector<float> few = {1.0f, -2.0f, 0.5f};
  be->sum_squares(view(out, Shape{1}), view(few, Shape{3}), false);
  EXPECT_FLOAT_EQ(out[0], 5.25f);
  be->sum_squares(view(out, Shape{1}), Tensor(few.data(), Shape{0}, DType::kF32, Device::kCpu), false);
  EXPECT_EQ(out[0], 0.0f);
}

// ---- AdamW -------------------------------------------------------------------------------------------

TEST_F(CpuKernels, AdamwOverSeveralSteps) {
  const int64_t n = 1000;
  struct Case {
    const char* what;
    float weight_decay, grad_scale, max_norm;
    bool pass_norm, alias;
  };
  const Case cases[] = {
      {"plain", 0.0f, 1.0f, 0.0f, false, false},
      {"weight decay, grad scale, clipping", 0.1f, 0.5f, 1.0f, true, false},
      {"clipping threshold above the norm", 0.1f, 0.5f, 1e6f, true, false},
      {"max_norm without norm_sq: no clipping", 0.05f, 1.0f, 1.0f, false, false},
      {"compute_out aliases master", 0.1f, 1.0f, 2.0f, true, true},
  };
  for (const Case& cs : cases) {
    std::vector<float> master = randn(n, 131), m(n, 0.0f), v(n, 0.0f), out(n, kNaN), norm_sq(1);
    Ref rw = to_ref(master), rm(n, 0.0), rv(n, 0.0);
    for (int64_t step = 1; step <= 5; ++step) {
      AdamWArgs args;
      args.lr = 1e-2f;
      args.beta1 = 0.9f;
      args.beta2 = 0.95f;
      args.eps = 1e-8f;
      args.weight_decay = cs.weight_decay;
      args.grad_scale = cs.grad_scale;
      args.max_norm = cs.max_norm;
      args.step = step;
      std::vector<float> grad = randn(n, 140 + static_cast<uint64_t>(step), 0.2f);
      double ns = 0;
      for (float g : grad) ns += static_cast<double>(g) * g;
      norm_sq[0] = static_cast<float>(ns);
      double clip = 1.0;
      if (cs.max_norm > 0 && cs.pass_norm)
        clip = std::min(1.0, cs.max_norm / (std::sqrt(static_cast<double>(norm_sq[0])) * cs.grad_scale + 1e-6));
      if (cs.max_norm == 1.0f && cs.pass_norm) {
        EXPECT_LT(clip, 0.5) << "the clipping case must clip";
      }
      for (int64_t i = 0; i < n; ++i) {
        const double g = grad[i] * static_cast<double>(cs.grad_scale) * clip;
        rm[i] = 0.9 * rm[i] + 0.1 * g;
        rv[i] = 0.95 * rv[i] + 0.05 * g * g;
        const double mhat = rm[i] / (1 - std::pow(0.9, step)), vhat = rv[i] / (1 - std::pow(0.95, step));
        rw[i] -= 1e-2 * (mhat / (std::sqrt(vhat) + 1e-8) + cs.weight_decay * rw[i]);
      }
      Tensor out_t = cs.alias ? view(master, Shape{n}) : view(out, Shape{n});
      be->adamw(view(master, Shape{n}), view(m, Shape{n}), view(v, Shape{n}), view(grad, Shape{n}), out_t,
                cs.pass_norm ? view(norm_sq, Shape{1}) : Tensor(), args);
    }
    EXPECT_TRUE(all_close(master, rw, 1e-5)) << cs.what << ": master";
    EXPECT_TRUE(all_close(m, rm, 1e-5)) << cs.what << ": m";
    EXPECT_TRUE(all_close(v, rv, 1e-5)) << cs.what << ": v";
    if (!cs.alias) {
      EXPECT_TRUE(all_equal(out, master)) << cs.what << ": compute_out";
    }
  }
}

// ---- determinism -------------------------------------------------------------------------------------

TEST(CpuBackend, ResultsDoNotDependOnTheThreadCount) {
  auto one = make_cpu_backend(CpuBackendOptions{1});
  auto two = make_cpu_backend(CpuBackendOptions{2});
  const int64_t n = 300000;
  std::vector<float> x = randn(n, 151);
  std::vector<float> s1(1), s2(1);
  one->sum_squares(view(s1, Shape{1}), view(x, Shape{n}), false);
  two->sum_squares(view(s2, Shape{1}), view(x, Shape{n}), false);
  EXPECT_TRUE(all_equal(s1, s2)) << "sum_squares";

  const int64_t rows = 500, d = 96;
  std::vector<float> xr = randn(rows * d, 152), w = randn(d, 153), dy = randn(rows * d, 154), rstd(rows), y(rows * d);
  one->rmsnorm_forward(view(y, Shape{rows, d}), view(rstd, Shape{rows}), view(xr, Shape{rows, d}), view(w, Shape{d}),
                       1e-5f);
  std::vector<float> dx1(rows * d), dx2(rows * d), dw1(d, 0.0f), dw2(d, 0.0f);
  one->rmsnorm_backward(view(dx1, Shape{rows, d}), false, view(dw1, Shape{d}), view(dy, Shape{rows, d}),
                        view(xr, Shape{rows, d}), view(w, Shape{d}), view(rstd, Shape{rows}));
  two->rmsnorm_backward(view(dx2, Shape{rows, d}), false, view(dw2, Shape{d}), view(dy, Shape{rows, d}),
                        view(xr, Shape{rows, d}), view(w, Shape{d}), view(rstd, Shape{rows}));
  EXPECT_TRUE(all_equal(dx1, dx2)) << "rmsnorm dx";
  EXPECT_TRUE(all_equal(dw1, dw2)) << "rmsnorm dw";

  // The forward splits heads into row blocks by the thread count: the split must not change any bit.
  for (AttnCase cs : {AttnCase{2, 45, 4, 16}, AttnCase{1, 600, 1, 8}}) {
    const Shape shape{cs.b, cs.t, cs.h, cs.dh}, lse_shape{cs.b, cs.h, cs.t};
    const int64_t na = shape.numel(), nl = lse_shape.numel();
    std::vector<float> q = randn(na, 155), k = randn(na, 156), v = randn(na, 157), dout = randn(na, 158);
    std::vector<float> o1(na), o2(na), l1(nl), l2(nl);
    one->attention_forward(view(o1, shape), view(l1, lse_shape), view(q, shape), view(k, shape), view(v, shape), 0.25f);
    two->attention_forward(view(o2, shape), view(l2, lse_shape), view(q, shape), view(k, shape), view(v, shape), 0.25f);
    EXPECT_TRUE(all_equal(o1, o2)) << "attention out, T " << cs.t;
    EXPECT_TRUE(all_equal(l1, l2)) << "attention lse, T " << cs.t;
    std::vector<float> g1(3 * na), g2(3 * na);
    auto grads = [&](Backend& be, std::vector<float>& g) {
      Tensor all = view(g, Shape{3 * cs.b, cs.t, cs.h, cs.dh});
      be.attention_backward(all.rows(0, cs.b), all.rows(cs.b, 2 * cs.b), all.rows(2 * cs.b, 3 * cs.b), false,
                            view(dout, shape), view(q, shape), view(k, shape), view(v, shape), view(o1, shape),
                            view(l1, lse_shape), 0.25f);
    };
    grads(*one, g1);
    grads(*two, g2);
    EXPECT_TRUE(all_equal(g1, g2)) << "attention gradients, T " << cs.t;
  }
}

}  // namespace
}  // namespace loom
