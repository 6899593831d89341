// The CUDA backend against the CPU backend, method by method (core/backend.h is the contract both implement).
//
// Inputs are drawn in f32 on the host with fixed seeds (never all zero) and rounded to the dtype the GPU gets
// (bf16 for activations and weights); the CPU backend gets exactly those rounded values in f32, so the only
// difference between the two results is the kernels' arithmetic. Outputs are compared norm-wise,
// ||gpu - cpu|| / ||cpu||, against a tolerance set by what the GPU stores:
//   - bf16 outputs: 1e-2. One rounding to bf16 is at most 2^-9 ~ 2e-3 relative per element (about 1e-3 norm-wise);
//     kernels that also round an intermediate to bf16 for a tensor-core product add a few of those.
//   - f32 outputs (rstd, lse, row max, sum of exps, losses, sums of squares, AdamW state): 1e-5 .. 1e-4. Products
//     of bf16 values are exact in f32, so only the order of f32 additions differs.
//   - pure data movement (copies, gathers, fills, the max of the same values): exact.
// Each comparison prints its relative and max abs error, so a run on the GPU machine shows the margins; a
// failure also lists the first mismatching elements.
//
// Gradient outputs are checked with accumulate=false (the output poisoned with NaN first, so an element the
// kernel does not write shows) and accumulate=true (pre-filled with random values of about the size of the
// result, so a kernel that overwrites instead of adding fails). The reducing backward kernels (embedding,
// RMSNorm, attention, sum of squares) must be deterministic: two runs on the same inputs give the same bits.
//
// Every test skips with the reason when there is no usable GPU, and in builds without CUDA, where this file
// still compiles (tests/cuda/cuda_test_util.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "core/backend.h"
#include "core/error.h"
#include "core/rng.h"
#include "tests/cuda/cuda_test_util.h"

namespace loom {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr double kExact = 0;
constexpr double kBf16Tol = 1e-2;       // an output stored in bf16
constexpr double kF32Tol = 1e-5;        // an f32 output whose additions run in another order
constexpr double kF32MatmulTol = 1e-4;  // f32 matmul output: tensor cores align the f32 partial sums coarsely
constexpr double kLseTol = 1e-4;        // log-sum-exp through the GPU's exp2 approximation
// Attention gradients: the backward rounds P and dS = P * (dP - D) to bf16 for its tensor-core products, and
// dS is a difference of nearly equal terms, so its bf16 error is amplified before dQ and dK sum over it.
constexpr double kAttentionGradTol = 2e-2;

enum class Side { kCpu, kGpu };

float round_to(DType dtype, float x) {
  return dtype == DType::kBF16 ? bf16_to_f32(f32_to_bf16(x)) : x;
}

std::vector<float> randn(int64_t n, uint64_t seed, float scale = 1.0f, float shift = 0.0f) {
  std::vector<float> v(static_cast<size_t>(n));
  for (size_t i = 0; i < v.size(); ++i)
    v[i] = shift + scale * random_normal(seed, static_cast<uint64_t>(RngStream::kUser), i);
  return v;
}

// Concatenates anything streamable: the labels of the comparisons.
template <class... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  return s.str();
}
std::string label(const char* op, const std::string& detail) {
  return cat(op, " ", detail);
}
const char* dt(DType d) {
  return dtype_name(d);
}
std::string acc(bool accumulate) {
  return accumulate ? "accumulate" : "overwrite";
}

// ||got - want|| / max(||want||, floor), with the max abs error; non-finite values in `got` always fail.
// `floor` > 0 judges a reference that is (nearly) zero by design against that norm instead.
::testing::AssertionResult close_norm(const std::vector<float>& got, const std::vector<float>& want, double tol,
                                      const std::string& what, double floor = 0) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": " << got.size() << " elements, expected " << want.size();
  double diff2 = 0, ref2 = 0, max_abs = 0;
  size_t max_at = 0, nonfinite = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = static_cast<double>(got[i]) - static_cast<double>(want[i]);
    ref2 += static_cast<double>(want[i]) * want[i];
    if (!std::isfinite(got[i])) {
      ++nonfinite;
      continue;
    }
    diff2 += d * d;
    if (std::fabs(d) > max_abs) {
      max_abs = std::fabs(d);
      max_at = i;
    }
  }
  const double denom = std::max(std::sqrt(ref2), floor);
  const double rel = denom > 0 ? std::sqrt(diff2) / denom : (diff2 == 0 ? 0.0 : INFINITY);
  std::printf("  %-64s rel err %9.3g (tol %.0e)  max abs err %9.3g%s\n", what.c_str(), rel, tol, max_abs,
              nonfinite > 0 ? "  NON-FINITE VALUES" : "");
  if (ref2 == 0 && floor == 0 && !got.empty())
    return ::testing::AssertionFailure() << what << ": the CPU reference is all zero, so the test input is degenerate";
  if (nonfinite == 0 && rel <= tol) return ::testing::AssertionSuccess();
  const double rms = std::sqrt(ref2 / static_cast<double>(std::max<size_t>(1, want.size())));
  std::ostringstream first;
  size_t listed = 0;
  for (size_t i = 0; i < got.size() && listed < 8; ++i) {
    const double d = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (std::isfinite(got[i]) && d <= std::max(tol, 1e-6) * (std::fabs(want[i]) + rms)) continue;
    first << "\n    [" << i << "] gpu " << got[i] << ", cpu " << want[i];
    ++listed;
  }
  return ::testing::AssertionFailure() << what << ": relative error " << rel << " (tolerance " << tol
                                       << "), max abs error " << max_abs << " at [" << max_at << "] over the finite "
                                       << "elements, " << nonfinite << " non-finite of " << got.size()
                                       << "; first mismatches:" << first.str();
}

// Byte-for-byte equality of two buffers of `elem`-byte elements; lists the first differing elements.
::testing::AssertionResult same_bits(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want, size_t elem,
                                     const std::string& what) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": " << got.size() << " bytes, expected " << want.size();
  size_t bad = 0;
  std::ostringstream first;
  for (size_t i = 0; i + elem <= got.size(); i += elem) {
    if (std::memcmp(&got[i], &want[i], elem) == 0) continue;
    if (bad++ < 8) {
      uint32_t a = 0, b = 0;
      std::memcpy(&a, &got[i], elem);
      std::memcpy(&b, &want[i], elem);
      first << "\n    [" << i / elem << "] 0x" << std::hex << a << " vs 0x" << b << std::dec;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << bad << " of " << got.size() / elem
                                       << " elements differ bitwise:" << first.str();
}

template <class T>
std::vector<uint8_t> as_bytes(const std::vector<T>& v) {
  std::vector<uint8_t> b(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// Memory from a backend, returned to it on destruction.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend& backend, size_t bytes) : backend_(&backend), ptr_(backend.allocate(bytes)) {}
  ~Buffer() {
    if (ptr_) backend_->deallocate(ptr_);
  }
  Buffer(Buffer&& o) noexcept : backend_(o.backend_), ptr_(std::exchange(o.ptr_, nullptr)) {}
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(backend_, o.backend_);
    std::swap(ptr_, o.ptr_);
    return *this;
  }
  void* get() const { return ptr_; }

 private:
  Backend* backend_ = nullptr;
  void* ptr_ = nullptr;
};

// One kernel argument on both backends. The CPU backend reads and writes `host` (f32; i32 tokens in
// `host_i32`), the GPU holds the same values in `dtype`; `initial` keeps the starting values for reruns.
struct Arg {
  DType dtype = DType::kF32;
  std::vector<float> initial;
  std::vector<float> host;
  std::vector<int32_t> host_i32;
  Buffer gpu_mem;
  Tensor cpu, gpu;
  const Tensor& operator[](Side s) const { return s == Side::kCpu ? cpu : gpu; }
};

class CudaBackend : public test::CudaTest {
 protected:

  // `v` rounded to `dtype`, on both sides.
  Arg values(const Shape& shape, DType dtype, std::vector<float> v) {
    EXPECT_EQ(static_cast<int64_t>(v.size()), shape.numel()) << "test bug: values for " << shape.str();
    Arg a;
    a.dtype = dtype;
    for (float& x : v) x = round_to(dtype, x);
    a.initial = v;
    a.host = std::move(v);
    a.cpu = Tensor(a.host.data(), shape, DType::kF32, Device::kCpu);
    a.gpu_mem = Buffer(*gpu_, static_cast<size_t>(shape.numel()) * dtype_size(dtype));
    a.gpu = Tensor(a.gpu_mem.get(), shape, dtype, Device::kCuda);
    upload(a.gpu, a.initial);
    return a;
  }
  Arg random(const Shape& shape, DType dtype, uint64_t seed, float scale = 1.0f, float shift = 0.0f) {
    return values(shape, dtype, randn(shape.numel(), seed, scale, shift));
  }
  Arg poisoned(const Shape& shape, DType dtype) {
    return values(shape, dtype, std::vector<float>(static_cast<size_t>(shape.numel()), kNaN));
  }
  // A kernel output: NaN when the kernel overwrites, random values of about `scale` when it accumulates.
  Arg output(const Shape& shape, DType dtype, bool accumulate, uint64_t seed, float scale = 1.0f) {
    return accumulate ? random(shape, dtype, seed, scale) : poisoned(shape, dtype);
  }
  Arg tokens(const Shape& shape, std::vector<int32_t> ids) {
    EXPECT_EQ(static_cast<int64_t>(ids.size()), shape.numel()) << "test bug: tokens for " << shape.str();
    Arg a;
    a.dtype = DType::kI32;
    a.host_i32 = std::move(ids);
    a.cpu = Tensor(a.host_i32.data(), shape, DType::kI32, Device::kCpu);
    a.gpu_mem = Buffer(*gpu_, a.host_i32.size() * sizeof(int32_t));
    a.gpu = Tensor(a.gpu_mem.get(), shape, DType::kI32, Device::kCuda);
    gpu_->upload(a.gpu, a.host_i32.data());
    return a;
  }
  // Both sides back to the starting values.
  void restore(Arg& a) {
    a.host = a.initial;
    upload(a.gpu, a.initial);
  }

  // f32 values into a GPU tensor of any float dtype, converted on the host (the copy kernels are tested apart).
  void upload(const Tensor& gpu, const std::vector<float>& v) {
    if (gpu.dtype() == DType::kBF16) {
      std::vector<uint16_t> bits(v.size());
      for (size_t i = 0; i < v.size(); ++i) bits[i] = f32_to_bf16(v[i]).bits;
      gpu_->upload(gpu, bits.data());
    } else {
      ASSERT_EQ(gpu.dtype(), DType::kF32) << "test bug: upload of " << gpu.describe();
      gpu_->upload(gpu, v.data());
    }
  }
  std::vector<uint8_t> fetch_bytes(const Tensor& gpu) {
    std::vector<uint8_t> b(gpu.nbytes());
    gpu_->download(gpu, b.data());
    return b;
  }
  std::vector<float> fetch(const Tensor& gpu) {
    const std::vector<uint8_t> b = fetch_bytes(gpu);
    std::vector<float> v(static_cast<size_t>(gpu.numel()));
    for (size_t i = 0; i < v.size(); ++i) {
      if (gpu.dtype() == DType::kBF16) {
        bf16 h;
        std::memcpy(&h.bits, &b[2 * i], 2);
        v[i] = bf16_to_f32(h);
      } else if (gpu.dtype() == DType::kI32) {
        int32_t x;
        std::memcpy(&x, &b[4 * i], 4);
        v[i] = static_cast<float>(x);
      } else {
        std::memcpy(&v[i], &b[4 * i], 4);
      }
    }
    return v;
  }

  // Runs the same call on the CPU backend and then on the GPU, and waits for the GPU.
  template <class F>
  void run(F&& kernel) {
    kernel(*cpu_, Side::kCpu);
    kernel(*gpu_, Side::kGpu);
    gpu_->synchronize();
  }
  // The GPU's result in `a` against the CPU's.
  ::testing::AssertionResult matches(const Arg& a, double tol, const std::string& what, double floor = 0) {
    return close_norm(fetch(a.gpu), a.host, tol, what, floor);
  }
  // Runs `kernel` on the GPU twice from the same starting contents of `outs`; every output must come out
  // bitwise identical.
  template <class F>
  ::testing::AssertionResult deterministic(const std::vector<Arg*>& outs, F&& kernel, const std::string& what) {
    std::vector<std::vector<uint8_t>> first;
    for (int rep = 0; rep < 2; ++rep) {
      for (Arg* o : outs) restore(*o);
      kernel(*gpu_, Side::kGpu);
      gpu_->synchronize();
      for (size_t i = 0; i < outs.size(); ++i) {
        std::vector<uint8_t> bytes = fetch_bytes(outs[i]->gpu);
        if (rep == 0) {
          first.push_back(std::move(bytes));
          continue;
        }
        auto r =
            same_bits(bytes, first[i], dtype_size(outs[i]->dtype), cat(what, ", output ", i, ", second run vs first"));
        if (!r) return r;
      }
    }
    return ::testing::AssertionSuccess();
  }

  std::unique_ptr<Backend> cpu_ = make_cpu_backend(CpuBackendOptions{0});
};

// ---- identity and memory -----------------------------------------------------------------------------------

TEST_F(CudaBackend, ReportsDeviceDtypeAndName) {
  EXPECT_EQ(gpu_->device(), Device::kCuda);
  EXPECT_EQ(gpu_->compute_dtype(), DType::kBF16);
  EXPECT_EQ(gpu_->name().rfind("cuda:0", 0), 0u) << gpu_->name();
  std::printf("  %s\n", gpu_->name().c_str());
}

TEST_F(CudaBackend, AllocateIsAlignedAndFailureNamesTheSize) {
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{255}, size_t{256}, size_t{1000}, size_t{1} << 20}) {
    void* p = gpu_->allocate(bytes);
    ASSERT_NE(p, nullptr) << bytes << " bytes";
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 256, 0u) << bytes << " bytes";
    gpu_->deallocate(p);
  }
  const size_t huge = size_t{1} << 50;  // 1 PiB
  try {
    void* p = gpu_->allocate(huge);
    gpu_->deallocate(p);
    FAIL() << "allocating 2^50 bytes on the GPU succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kCuda) << e.what();
    EXPECT_NE(std::string(e.what()).find(std::to_string(huge)), std::string::npos) << e.what();
  }
  // The failed allocation leaves no sticky error: the next kernel runs.
  Arg a = poisoned(Shape{1000}, DType::kF32);
  gpu_->fill(a.gpu, 3.0f);
  EXPECT_EQ(fetch(a.gpu), std::vector<float>(1000, 3.0f));
}

// ---- copies and fill: conversions must round exactly as the host does (round to nearest even) -------------

TEST_F(CudaBackend, CopyConvertsLikeTheHostInEveryDirection) {
  for (int64_t n : {int64_t{1001}, int64_t{300007}}) {
    std::vector<float> v = randn(n, 1);
    for (size_t i = 0; i < v.size(); i += 7) v[i] *= 1e4f;
    for (size_t i = 3; i < v.size(); i += 11) v[i] *= 1e-4f;
    // Signed zero, ties (1 + 2^-8 rounds down to even, 1 + 3 * 2^-8 up), a carry into the next binade, the
    // largest finite f32 (rounds to infinity) and infinities.
    const float specials[] = {0.0f,        -0.0f,        1.00390625f,
                              1.01171875f, -1.00390625f, 1.99999988f,
                              65504.0f,    -3.0e38f,     std::numeric_limits<float>::max(),
                              INFINITY,    -INFINITY,    1.0e-30f};
    std::copy(std::begin(specials), std::end(specials), v.begin());
    const Shape shape{n};
    std::vector<uint16_t> want_bits(v.size());
    std::vector<float> want_back(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      want_bits[i] = f32_to_bf16(v[i]).bits;
      want_back[i] = bf16_to_f32(bf16{want_bits[i]});
    }
    const std::string size = cat("n=", n);
    Tensor host_f32(v.data(), shape, DType::kF32, Device::kCpu);
    Buffer bf_mem(*gpu_, v.size() * 2), f_mem(*gpu_, v.size() * 4), bf2_mem(*gpu_, v.size() * 2),
        f2_mem(*gpu_, v.size() * 4);
    Tensor dev_bf(bf_mem.get(), shape, DType::kBF16, Device::kCuda),
        dev_f(f_mem.get(), shape, DType::kF32, Device::kCuda);
    Tensor dev_bf2(bf2_mem.get(), shape, DType::kBF16, Device::kCuda),
        dev_f2(f2_mem.get(), shape, DType::kF32, Device::kCuda);

    // host f32 -> device bf16 (converted on the way up)
    gpu_->copy(dev_bf, host_f32);
    gpu_->synchronize();
    EXPECT_TRUE(same_bits(fetch_bytes(dev_bf), as_bytes(want_bits), 2, "copy host f32 -> device bf16 " + size));
    // device bf16 -> host f32
    std::vector<float> back(v.size(), kNaN);
    gpu_->copy(Tensor(back.data(), shape, DType::kF32, Device::kCpu), dev_bf);
    gpu_->synchronize();
    EXPECT_TRUE(same_bits(as_bytes(back), as_bytes(want_back), 4, "copy device bf16 -> host f32 " + size));
    // host f32 -> device f32 -> host f32
    gpu_->copy(dev_f, host_f32);
    std::vector<float> back_f(v.size(), kNaN);
    gpu_->copy(Tensor(back_f.data(), shape, DType::kF32, Device::kCpu), dev_f);
    gpu_->synchronize();
    EXPECT_TRUE(same_bits(as_bytes(back_f), as_bytes(v), 4, "copy host f32 <-> device f32 " + size));
    // device f32 -> device bf16 (the conversion kernel)
    gpu_->fill(dev_bf2, kNaN);
    gpu_->copy(dev_bf2, dev_f);
    gpu_->synchronize();
    EXPECT_TRUE(same_bits(fetch_bytes(dev_bf2), as_bytes(want_bits), 2, "copy device f32 -> device bf16 " + size));
    // device bf16 -> device f32 (the conversion kernel)
    gpu_->fill(dev_f2, kNaN);
    gpu_->copy(dev_f2, dev_bf);
    gpu_->synchronize();
    EXPECT_TRUE(same_bits(fetch_bytes(dev_f2), as_bytes(want_back), 4, "copy device bf16 -> device f32 " + size));
    // device -> device, same dtype
    gpu_->fill(dev_bf2, kNaN);
    gpu_->copy(dev_bf2, dev_bf);
    gpu_->fill(dev_f2, kNaN);
    gpu_->copy(dev_f2, dev_f);
    gpu_->synchronize();
    EXPECT_TRUE(same_bits(fetch_bytes(dev_bf2), as_bytes(want_bits), 2, "copy device bf16 -> device bf16 " + size));
    EXPECT_TRUE(same_bits(fetch_bytes(dev_f2), as_bytes(v), 4, "copy device f32 -> device f32 " + size));
    // host bf16 <-> device bf16
    std::vector<uint16_t> bits_back(v.size(), 0xffff);
    gpu_->fill(dev_bf2, kNaN);
    gpu_->copy(dev_bf2, Tensor(want_bits.data(), shape, DType::kBF16, Device::kCpu));
    gpu_->copy(Tensor(bits_back.data(), shape, DType::kBF16, Device::kCpu), dev_bf2);
    gpu_->synchronize();
    EXPECT_TRUE(same_bits(as_bytes(bits_back), as_bytes(want_bits), 2, "copy host bf16 <-> device bf16 " + size));
  }
}

TEST_F(CudaBackend, FillWritesEveryElement) {
  for (int64_t n : {int64_t{1}, int64_t{1001}, int64_t{300007}}) {
    const std::string size = cat(" n=", n);
    Arg f = poisoned(Shape{n}, DType::kF32);
    Arg b = poisoned(Shape{n}, DType::kBF16);
    gpu_->fill(f.gpu, -2.75f);
    gpu_->fill(b.gpu, 1.7f);
    std::vector<int32_t> minus_one(static_cast<size_t>(n), -1);
    Arg i = tokens(Shape{n}, minus_one);
    gpu_->fill(i.gpu, 42.0f);
    gpu_->synchronize();
    EXPECT_TRUE(same_bits(fetch_bytes(f.gpu), as_bytes(std::vector<float>(static_cast<size_t>(n), -2.75f)), 4,
                          "fill f32" + size));
    EXPECT_TRUE(same_bits(fetch_bytes(b.gpu),
                          as_bytes(std::vector<uint16_t>(static_cast<size_t>(n), f32_to_bf16(1.7f).bits)), 2,
                          "fill bf16" + size));
    EXPECT_TRUE(same_bits(fetch_bytes(i.gpu), as_bytes(std::vector<int32_t>(static_cast<size_t>(n), 42)), 4,
                          "fill i32" + size));
  }
}

// ---- elementwise ---------------------------------------------------------------------------------------------

TEST_F(CudaBackend, AddIncludingOutputAliasingAnInput) {
  for (DType d : {DType::kF32, DType::kBF16}) {
    // f32: one IEEE addition on both sides, exact. bf16: the sum rounded to bf16 once.
    const double tol = d == DType::kF32 ? kExact : kBf16Tol;
    for (int64_t n : {int64_t{1001}, int64_t{300007}}) {
      const std::string what = cat(dt(d), " n=", n);
      Arg a = random(Shape{n}, d, 10), b = random(Shape{n}, d, 11, 0.5f), out = poisoned(Shape{n}, d);
      run([&](Backend& be, Side s) { be.add(out[s], a[s], b[s]); });
      EXPECT_TRUE(matches(out, tol, label("add", what)));
      run([&](Backend& be, Side s) { be.add(a[s], a[s], b[s]); });
      EXPECT_TRUE(matches(a, tol, label("add out=a", what)));
      run([&](Backend& be, Side s) { be.add(b[s], a[s], b[s]); });
      EXPECT_TRUE(matches(b, tol, label("add out=b", what)));
    }
  }
}

TEST_F(CudaBackend, AxpyMixedDtypesAndAliasing) {
  const struct {
    DType dst, src;
  } kinds[] = {{DType::kF32, DType::kF32}, {DType::kF32, DType::kBF16}, {DType::kBF16, DType::kBF16}};
  const int64_t n = 100003;
  for (const auto& k : kinds) {
    for (bool accumulate : {false, true}) {
      const std::string what = cat("dst ", dt(k.dst), " src ", dt(k.src), " ", acc(accumulate));
      Arg src = random(Shape{n}, k.src, 20), dst = output(Shape{n}, k.dst, accumulate, 21);
      run([&](Backend& be, Side s) { be.axpy(dst[s], src[s], -0.75f, accumulate); });
      EXPECT_TRUE(matches(dst, k.dst == DType::kF32 ? kF32Tol : kBf16Tol, label("axpy", what)));
    }
  }
  // dst == src: the gradient-averaging use (x = x / n) and doubling.
  for (DType d : {DType::kF32, DType::kBF16}) {
    for (bool accumulate : {false, true}) {
      Arg x = random(Shape{n}, d, 22);
      run([&](Backend& be, Side s) { be.axpy(x[s], x[s], 0.5f, accumulate); });
      EXPECT_TRUE(
          matches(x, d == DType::kF32 ? kF32Tol : kBf16Tol, label("axpy dst=src", cat(dt(d), " ", acc(accumulate)))));
    }
  }
}

// ---- matmul --------------------------------------------------------------------------------------------------

TEST_F(CudaBackend, MatmulEveryTransposeOddSizes) {
  const int64_t m = 37, n = 29, k = 53;
  uint64_t seed = 100;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      for (DType cd : {DType::kBF16, DType::kF32}) {
        for (float beta : {0.0f, 1.0f}) {
          const std::string what = cat(ta ? "T" : "N", tb ? "T" : "N", " ", m, "x", n, "x", k, " C ", dt(cd),
                                       beta == 0 ? " beta 0" : " beta 1");
          Arg a = random(ta ? Shape{k, m} : Shape{m, k}, DType::kBF16, seed++);
          Arg b = random(tb ? Shape{n, k} : Shape{k, n}, DType::kBF16, seed++);
          Arg c = beta == 0 ? poisoned(Shape{m, n}, cd) : random(Shape{m, n}, cd, seed++, 4.0f);
          run([&](Backend& be, Side s) { be.matmul(c[s], a[s], ta, b[s], tb, 0.5f, beta); });
          EXPECT_TRUE(matches(c, cd == DType::kF32 ? kF32MatmulTol : kBf16Tol, label("matmul", what)));
        }
      }
    }
  }
}

TEST_F(CudaBackend, MatmulBig2048) {
  const int64_t n = 2048;
  Arg a = random(Shape{n, n}, DType::kBF16, 110), b = random(Shape{n, n}, DType::kBF16, 111);
  // A linear layer's forward (X W^T) into bf16, and a weight gradient (dW += dY^T X) into f32.
  Arg y = poisoned(Shape{n, n}, DType::kBF16);
  run([&](Backend& be, Side s) { be.matmul(y[s], a[s], false, b[s], true, 1.0f, 0.0f); });
  EXPECT_TRUE(matches(y, kBf16Tol, "matmul NT 2048^3 C bf16 beta 0"));
  Arg dw = random(Shape{n, n}, DType::kF32, 112, 30.0f);
  run([&](Backend& be, Side s) { be.matmul(dw[s], a[s], true, b[s], false, 1.0f, 1.0f); });
  EXPECT_TRUE(matches(dw, kF32MatmulTol, "matmul TN 2048^3 C f32 beta 1"));
}

// ---- embedding -----------------------------------------------------------------------------------------------

// Token ids in [lo, hi) with the edges of the shard [start, start + v_local) and a negative id forced in.
std::vector<int32_t> shard_tokens(int64_t n, int32_t lo, int32_t hi, int32_t start, int32_t v_local, uint64_t seed) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (size_t i = 0; i < ids.size(); ++i)
    ids[i] = lo + static_cast<int32_t>(random_u64(seed, static_cast<uint64_t>(RngStream::kUser), i) %
                                       static_cast<uint64_t>(hi - lo));
  const int32_t edges[] = {start, start + v_local - 1, start - 1, start + v_local, -5};
  for (size_t i = 0; i < std::size(edges) && i < ids.size(); ++i) ids[i] = edges[i];
  return ids;
}

TEST_F(CudaBackend, EmbeddingOnAVocabShardWithOutOfRangeAndRepeatedTokens) {
  const int64_t v_local = 50, d = 40, n = 300;
  const int32_t start = 100;
  std::vector<int32_t> ids = shard_tokens(n, 80, 170, start, static_cast<int32_t>(v_local), 30);
  const int64_t inside =
      std::count_if(ids.begin(), ids.end(), [&](int32_t t) { return t >= start && t < start + v_local; });
  ASSERT_GT(inside, v_local) << "the test needs repeated in-shard tokens";
  ASSERT_LT(inside, n) << "the test needs out-of-shard tokens";
  Arg tok = tokens(Shape{n}, ids);
  Arg table = random(Shape{v_local, d}, DType::kBF16, 31);
  // Forward is a gather: exact, zero rows included.
  Arg out = poisoned(Shape{n, d}, DType::kBF16);
  run([&](Backend& be, Side s) { be.embedding_forward(out[s], table[s], tok[s], start); });
  EXPECT_TRUE(matches(out, kExact, "embedding_forward"));
  // Backward always accumulates, into an f32 or a bf16 table gradient.
  Arg dout = random(Shape{n, d}, DType::kBF16, 32);
  for (DType gd : {DType::kF32, DType::kBF16}) {
    Arg dtable = random(Shape{v_local, d}, gd, 33, 2.0f);
    run([&](Backend& be, Side s) { be.embedding_backward(dtable[s], dout[s], tok[s], start); });
    EXPECT_TRUE(matches(dtable, gd == DType::kF32 ? kF32Tol : kBf16Tol, label("embedding_backward dtable", dt(gd))));
  }
}

TEST_F(CudaBackend, EmbeddingBackwardIsDeterministicUnderHeavyRepetition) {
  // 8192 tokens over 16 ids: about 512 contributions to every row, where racing float atomics show.
  const int64_t v_local = 64, d = 256, n = 8192;
  const int32_t start = 1000;
  Arg tok = tokens(Shape{n}, shard_tokens(n, start - 4, start + 12, start, static_cast<int32_t>(v_local), 34));
  Arg dout = random(Shape{n, d}, DType::kBF16, 35);
  for (DType gd : {DType::kF32, DType::kBF16}) {
    Arg dtable = random(Shape{v_local, d}, gd, 36, 10.0f);
    auto kernel = [&](Backend& be, Side s) { be.embedding_backward(dtable[s], dout[s], tok[s], start); };
    run(kernel);
    EXPECT_TRUE(matches(dtable, gd == DType::kF32 ? kF32Tol : kBf16Tol,
                        label("embedding_backward 512 repeats dtable", dt(gd))));
    EXPECT_TRUE(deterministic({&dtable}, kernel, label("embedding_backward dtable", dt(gd))));
  }
}

// ---- RMSNorm -------------------------------------------------------------------------------------------------

TEST_F(CudaBackend, RmsnormForwardAndBackward) {
  const float eps = 1e-5f;
  const std::pair<int64_t, int64_t> shapes[] = {{77, 200}, {33, 2048}};
  for (auto [n, d] : shapes) {
    const std::string shape = cat("[", n, ", ", d, "]");
    Arg x = random(Shape{n, d}, DType::kBF16, 40, 2.0f), w = random(Shape{d}, DType::kBF16, 41, 0.1f, 1.0f);
    Arg y = poisoned(Shape{n, d}, DType::kBF16), rstd = poisoned(Shape{n}, DType::kF32);
    run([&](Backend& be, Side s) { be.rmsnorm_forward(y[s], rstd[s], x[s], w[s], eps); });
    EXPECT_TRUE(matches(y, kBf16Tol, label("rmsnorm_forward y", shape)));
    EXPECT_TRUE(matches(rstd, kF32Tol, label("rmsnorm_forward rstd", shape)));

    Arg r = values(Shape{n}, DType::kF32, rstd.host);  // the CPU's statistics, on both sides
    Arg dy = random(Shape{n, d}, DType::kBF16, 42);
    for (bool accumulate : {false, true}) {
      for (DType wd : {DType::kF32, DType::kBF16}) {
        const std::string what = shape + " dx " + acc(accumulate) + ", dw " + dt(wd);
        Arg dx = output(Shape{n, d}, DType::kBF16, accumulate, 43);
        Arg dw = random(Shape{d}, wd, 44, 4.0f);
        run([&](Backend& be, Side s) { be.rmsnorm_backward(dx[s], accumulate, dw[s], dy[s], x[s], w[s], r[s]); });
        EXPECT_TRUE(matches(dx, kBf16Tol, label("rmsnorm_backward dx", what)));
        EXPECT_TRUE(matches(dw, wd == DType::kF32 ? kF32Tol : kBf16Tol, label("rmsnorm_backward dw", what)));
      }
    }
  }
}

TEST_F(CudaBackend, RmsnormBackwardIsDeterministic) {
  // dw sums over 4096 rows.
  const int64_t n = 4096, d = 512;
  Arg x = random(Shape{n, d}, DType::kBF16, 45), w = random(Shape{d}, DType::kBF16, 46, 0.1f, 1.0f);
  Arg dy = random(Shape{n, d}, DType::kBF16, 47);
  Arg y = poisoned(Shape{n, d}, DType::kBF16), rstd = poisoned(Shape{n}, DType::kF32);
  cpu_->rmsnorm_forward(y.cpu, rstd.cpu, x.cpu, w.cpu, 1e-5f);
  Arg r = values(Shape{n}, DType::kF32, rstd.host);
  Arg dx = poisoned(Shape{n, d}, DType::kBF16), dw = random(Shape{d}, DType::kF32, 48, 30.0f);
  auto kernel = [&](Backend& be, Side s) { be.rmsnorm_backward(dx[s], false, dw[s], dy[s], x[s], w[s], r[s]); };
  run(kernel);
  EXPECT_TRUE(matches(dx, kBf16Tol, "rmsnorm_backward [4096, 512] dx"));
  EXPECT_TRUE(matches(dw, kF32Tol, "rmsnorm_backward [4096, 512] dw"));
  EXPECT_TRUE(deterministic({&dx, &dw}, kernel, "rmsnorm_backward"));
}

// ---- RoPE ----------------------------------------------------------------------------------------------------

TEST_F(CudaBackend, RopeForwardAndBackward) {
  const float base = 10000.0f;
  // The second shape reaches position 2047, where an imprecise angle or sine shows.
  for (const Shape& shape : {Shape{2, 37, 3, 64}, Shape{1, 2048, 2, 128}}) {
    Arg x = random(shape, DType::kBF16, 50), out = poisoned(shape, DType::kBF16);
    run([&](Backend& be, Side s) { be.rope_forward(out[s], x[s], base); });
    EXPECT_TRUE(matches(out, kBf16Tol, label("rope_forward", shape.str())));
    Arg dy = random(shape, DType::kBF16, 51);
    for (bool accumulate : {false, true}) {
      Arg dx = output(shape, DType::kBF16, accumulate, 52);
      run([&](Backend& be, Side s) { be.rope_backward(dx[s], accumulate, dy[s], base); });
      EXPECT_TRUE(matches(dx, kBf16Tol, label("rope_backward", shape.str() + " " + acc(accumulate))));
    }
  }
}

// ---- attention -----------------------------------------------------------------------------------------------

class CudaBackendAttention : public CudaBackend, public ::testing::WithParamInterface<std::tuple<int64_t, int64_t>> {};

TEST_P(CudaBackendAttention, Forward) {
  const auto [t, dh] = GetParam();
  const int64_t b = 2, h = 3;
  const Shape shape{b, t, h, dh};
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  const std::string what = cat("B=2 T=", t, " H=3 Dh=", dh);
  Arg q = random(shape, DType::kBF16, 60, 1.5f), k = random(shape, DType::kBF16, 61),
      v = random(shape, DType::kBF16, 62);
  Arg out = poisoned(shape, DType::kBF16), lse = poisoned(Shape{b, h, t}, DType::kF32);
  run([&](Backend& be, Side s) { be.attention_forward(out[s], lse[s], q[s], k[s], v[s], scale); });
  EXPECT_TRUE(matches(out, kBf16Tol, label("attention_forward out", what)));
  EXPECT_TRUE(matches(lse, kLseTol, label("attention_forward lse", what)));
}

TEST_P(CudaBackendAttention, BackwardAndDeterminism) {
  const auto [t, dh] = GetParam();
  const int64_t b = 2, h = 3;
  const Shape shape{b, t, h, dh};
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  const std::string what = cat("B=2 T=", t, " H=3 Dh=", dh);
  Arg q = random(shape, DType::kBF16, 60, 1.5f), k = random(shape, DType::kBF16, 61),
      v = random(shape, DType::kBF16, 62);
  // The forward's out (rounded to bf16, as the GPU stores it) and lse from the CPU, given to both backwards.
  Arg out_cpu = poisoned(shape, DType::kF32), lse_cpu = poisoned(Shape{b, h, t}, DType::kF32);
  cpu_->attention_forward(out_cpu.cpu, lse_cpu.cpu, q.cpu, k.cpu, v.cpu, scale);
  Arg out = values(shape, DType::kBF16, out_cpu.host), lse = values(Shape{b, h, t}, DType::kF32, lse_cpu.host);
  Arg dout = random(shape, DType::kBF16, 63);
  // With T = 1 every query sees one key, so dq and dk are zero up to rounding: judge them against the
  // size of an O(1) gradient instead of their own (vanishing) norm.
  const double qk_floor = t == 1 ? std::sqrt(static_cast<double>(shape.numel())) : 0.0;
  for (bool accumulate : {false, true}) {
    Arg dq = output(shape, DType::kBF16, accumulate, 64, 0.3f), dk = output(shape, DType::kBF16, accumulate, 65, 0.3f),
        dv = output(shape, DType::kBF16, accumulate, 66, 0.3f);
    auto kernel = [&](Backend& be, Side s) {
      be.attention_backward(dq[s], dk[s], dv[s], accumulate, dout[s], q[s], k[s], v[s], out[s], lse[s], scale);
    };
    run(kernel);
    const std::string w = what + " " + acc(accumulate);
    EXPECT_TRUE(matches(dq, kAttentionGradTol, label("attention_backward dq", w), accumulate ? 0 : qk_floor));
    EXPECT_TRUE(matches(dk, kAttentionGradTol, label("attention_backward dk", w), accumulate ? 0 : qk_floor));
    EXPECT_TRUE(matches(dv, kAttentionGradTol, label("attention_backward dv", w)));
    EXPECT_TRUE(deterministic({&dq, &dk, &dv}, kernel, label("attention_backward", w)));
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaBackendAttention,
                         ::testing::Combine(::testing::Values(int64_t{1}, int64_t{37}, int64_t{256}),
                                            ::testing::Values(int64_t{16}, int64_t{32}, int64_t{64}, int64_t{128})),
                         [](const ::testing::TestParamInfo<std::tuple<int64_t, int64_t>>& info) {
                           return cat("T", std::get<0>(info.param), "_Dh", std::get<1>(info.param));
                         });

// ---- SwiGLU --------------------------------------------------------------------------------------------------

TEST_F(CudaBackend, SwigluForwardAndBackward) {
  const Shape shape{7, 143};
  Arg gate = random(shape, DType::kBF16, 70, 2.0f), up = random(shape, DType::kBF16, 71);
  Arg out = poisoned(shape, DType::kBF16);
  run([&](Backend& be, Side s) { be.swiglu_forward(out[s], gate[s], up[s]); });
  EXPECT_TRUE(matches(out, kBf16Tol, "swiglu_forward"));
  Arg dout = random(shape, DType::kBF16, 72);
  for (bool accumulate : {false, true}) {
    Arg dgate = output(shape, DType::kBF16, accumulate, 73), dup = output(shape, DType::kBF16, accumulate, 74);
    run([&](Backend& be, Side s) { be.swiglu_backward(dgate[s], dup[s], accumulate, dout[s], gate[s], up[s]); });
    EXPECT_TRUE(matches(dgate, kBf16Tol, label("swiglu_backward dgate", acc(accumulate))));
    EXPECT_TRUE(matches(dup, kBf16Tol, label("swiglu_backward dup", acc(accumulate))));
  }
}

// ---- cross-entropy -------------------------------------------------------------------------------------------

TEST_F(CudaBackend, CrossEntropyPiecesOnAVocabShard) {
  const int64_t n = 77, v_local = 1000;
  const int32_t start = 300;
  std::vector<int32_t> ids = shard_tokens(n, 0, 1600, start, static_cast<int32_t>(v_local), 80);
  ids[4] = 0;  // no negative targets: targets are real ids
  const int64_t inside =
      std::count_if(ids.begin(), ids.end(), [&](int32_t t) { return t >= start && t < start + v_local; });
  ASSERT_GT(inside, 0) << "the test needs targets inside the shard";
  ASSERT_LT(inside, n) << "the test needs targets outside the shard";
  Arg targets = tokens(Shape{n}, ids);
  Arg logits = random(Shape{n, v_local}, DType::kBF16, 81, 2.0f);

  Arg row_max = poisoned(Shape{n}, DType::kF32);
  run([&](Backend& be, Side s) { be.ce_row_max(row_max[s], logits[s]); });
  EXPECT_TRUE(matches(row_max, kExact, "ce_row_max"));

  // Each piece gets the CPU's results of the pieces before it.
  Arg rm = values(Shape{n}, DType::kF32, row_max.host);
  Arg sumexp = poisoned(Shape{n}, DType::kF32), target_logit = poisoned(Shape{n}, DType::kF32);
  run([&](Backend& be, Side s) {
    be.ce_sumexp_target(sumexp[s], target_logit[s], logits[s], rm[s], targets[s], start);
  });
  EXPECT_TRUE(matches(sumexp, kF32Tol, "ce_sumexp_target sumexp"));
  EXPECT_TRUE(matches(target_logit, kExact, "ce_sumexp_target target_logit"));

  Arg se = values(Shape{n}, DType::kF32, sumexp.host), tl = values(Shape{n}, DType::kF32, target_logit.host);
  Arg loss = poisoned(Shape{1}, DType::kF32);
  run([&](Backend& be, Side s) { be.ce_loss_mean(loss[s], rm[s], se[s], tl[s]); });
  EXPECT_TRUE(matches(loss, kF32Tol, "ce_loss_mean"));
  EXPECT_EQ(gpu_->read_scalar(loss.gpu), fetch(loss.gpu)[0]) << "read_scalar";

  Arg dloss = values(Shape{1}, DType::kF32, {1.7f});
  for (bool accumulate : {false, true}) {
    // The gradient is about 0.85 at targets and 0.85 p elsewhere: pre-fill at that scale.
    Arg dlogits = output(Shape{n, v_local}, DType::kBF16, accumulate, 82, 0.01f);
    run([&](Backend& be, Side s) {
      be.ce_backward(dlogits[s], accumulate, logits[s], rm[s], se[s], targets[s], start, dloss[s], 0.5f);
    });
    EXPECT_TRUE(matches(dlogits, kBf16Tol, label("ce_backward", acc(accumulate))));
  }
}

// ---- reductions and AdamW ------------------------------------------------------------------------------------

TEST_F(CudaBackend, SumSquaresOfAMillionElements) {
  const int64_t n = 1000003;
  for (DType d : {DType::kF32, DType::kBF16}) {
    Arg x = random(Shape{n}, d, 90);
    for (bool accumulate : {false, true}) {
      Arg out = accumulate ? values(Shape{1}, DType::kF32, {12345.0f}) : poisoned(Shape{1}, DType::kF32);
      auto kernel = [&](Backend& be, Side s) { be.sum_squares(out[s], x[s], accumulate); };
      run(kernel);
      const std::string what = cat(dt(d), " ", acc(accumulate));
      EXPECT_TRUE(matches(out, kF32Tol, label("sum_squares", what)));
      EXPECT_TRUE(deterministic({&out}, kernel, label("sum_squares", what)));
    }
  }
}

TEST_F(CudaBackend, AdamwSeveralStepsWithAndWithoutClipping) {
  const struct Case {
    const char* name;
    DType grad_dtype;
    double clip_ratio;  // max_norm as a multiple of the scaled gradient norm; 0 turns clipping off
    bool pass_norm_sq;
  } cases[] = {
      {"clipping active, f32 gradients", DType::kF32, 0.5, true},
      {"clipping active, bf16 gradients", DType::kBF16, 0.5, true},
      {"clipping off (max_norm 0)", DType::kF32, 0.0, true},
      {"norm below max_norm", DType::kBF16, 4.0, true},
      {"null norm_sq (no clipping)", DType::kF32, 0.5, false},
  };
  const int64_t n = 100003;
  const Shape shape{n};
  for (const Case& c : cases) {
    std::vector<float> v0 = randn(n, 101, 0.01f);
    for (float& x : v0) x = x * x + 1e-8f;
    Arg master = random(shape, DType::kF32, 100), m = random(shape, DType::kF32, 102, 0.01f);
    Arg v = values(shape, DType::kF32, v0), weights = poisoned(shape, DType::kBF16);
    for (int64_t step = 1; step <= 3; ++step) {
      const std::string what = cat(c.name, ", step ", step);
      Arg grad = random(shape, c.grad_dtype, 110 + static_cast<uint64_t>(step), 0.05f);
      double norm_sq = 0;
      for (float g : grad.host) norm_sq += static_cast<double>(g) * g;
      Arg ns = values(Shape{1}, DType::kF32, {static_cast<float>(norm_sq)});
      AdamWArgs args;
      args.lr = 1e-2f;
      args.weight_decay = 0.1f;
      args.grad_scale = 0.5f;
      args.max_norm = static_cast<float>(c.clip_ratio * std::sqrt(norm_sq) * args.grad_scale);
      args.step = step;
      const std::vector<float> before_cpu = master.host, before_gpu = fetch(master.gpu);
      run([&](Backend& be, Side s) {
        be.adamw(master[s], m[s], v[s], grad[s], weights[s], c.pass_norm_sq ? ns[s] : Tensor(), args);
      });
      const std::vector<float> after_gpu = fetch(master.gpu);
      EXPECT_TRUE(matches(master, kF32Tol, label("adamw master", what)));
      EXPECT_TRUE(matches(m, kF32Tol, label("adamw m", what)));
      EXPECT_TRUE(matches(v, kF32Tol, label("adamw v", what)));
      // The update itself (about lr per element) to 1e-4: the master's own comparison hides it under |w| ~ 1.
      std::vector<float> delta_cpu(before_cpu.size()), delta_gpu(before_cpu.size());
      for (size_t i = 0; i < delta_cpu.size(); ++i) {
        delta_cpu[i] = master.host[i] - before_cpu[i];
        delta_gpu[i] = after_gpu[i] - before_gpu[i];
      }
      EXPECT_TRUE(close_norm(delta_gpu, delta_cpu, 1e-4, label("adamw update", what)));
      // The compute-precision copy is exactly the new master rounded to bf16.
      std::vector<uint16_t> want_bits(after_gpu.size());
      for (size_t i = 0; i < want_bits.size(); ++i) want_bits[i] = f32_to_bf16(after_gpu[i]).bits;
      EXPECT_TRUE(same_bits(fetch_bytes(weights.gpu), as_bytes(want_bits), 2, label("adamw compute_out", what)));
    }
  }
}

}  // namespace
}  // namespace loom
