// The CPU backend's class and the helpers its kernel files share. Private to core/cpu/: the rest of Loom
// reaches the backend through make_cpu_backend() (core/backend.h).
//
// The backend is split over three files by kind of work: cpu_backend.cc (memory, copy, matmul, the factory),
// cpu_kernels.cc (elementwise, normalisation, embedding, cross-entropy, reductions, AdamW) and
// cpu_attention.cc (causal attention). All activations are f32; every kernel checks the dtypes it is given
// because the CPU backend is also what tests and tools call directly.
//
// Threading: every kernel parallelises with OpenMP on `threads_` threads; OpenBLAS (matmul) is only ever called
// outside a parallel region. Exceptions are only thrown before a parallel region starts (one escaping a region
// would terminate the process).
//
// Vectorisation: Loom is built for the baseline x86-64 ISA, so the hot loops (attention, anything calling exp)
// live in functions marked LOOM_CPU_CLONES, which GCC compiles once per ISA level and dispatches at load time.
// Reductions that must vectorise carry `#pragma omp simd reduction`, which allows the reassociation.
#pragma once

#include <bit>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/error.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__gnu_linux__)
#define LOOM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LOOM_CPU_CLONES
#endif
// Small helpers called from cloned functions must be inlined into each clone to get its ISA.
#define LOOM_CPU_INLINE inline __attribute__((always_inline))

namespace loom::cpu {

// cos/sin of t * base^(-2i/Dh) for t < max_t, i < Dh/2, row-major [t][i]; shared by RoPE calls with the same
// (Dh, base), grown when a longer sequence arrives.
struct RopeTable {
  int64_t head_dim = 0;
  float base = 0;
  int64_t max_t = 0;
  std::vector<float> cos, sin;
};

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads);

  Device device() const override { return Device::kCpu; }
  DType compute_dtype() const override { return DType::kF32; }
  std::string name() const override { return name_; }

  void* allocate(size_t bytes) override;
  void deallocate(void* ptr) override;
  void copy(const Tensor& dst, const Tensor& src) override;
  void fill(const Tensor& dst, float value) override;
  void synchronize() override {}

  void add(const Tensor& out, const Tensor& a, const Tensor& b) override;
  void axpy(const Tensor& dst, const Tensor& src, float alpha, bool accumulate) override;
  void matmul(const Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
              float beta) override;

  void embedding_forward(const Tensor& out, const Tensor& table, const Tensor& tokens, int64_t vocab_start) override;
  void embedding_backward(const Tensor& dtable, const Tensor& dout, const Tensor& tokens, int64_t vocab_start) override;
  void rmsnorm_forward(const Tensor& y, const Tensor& rstd, const Tensor& x, const Tensor& w, float eps) override;
  void rmsnorm_backward(const Tensor& dx, bool accumulate_dx, const Tensor& dw, const Tensor& dy, const Tensor& x,
                        const Tensor& w, const Tensor& rstd) override;
  void rope_forward(const Tensor& out, const Tensor& x, float base) override;
  void rope_backward(const Tensor& dx, bool accumulate, const Tensor& dy, float base) override;
  void attention_forward(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                         float scale) override;
  void attention_backward(const Tensor& dq, const Tensor& dk, const Tensor& dv, bool accumulate, const Tensor& dout,
                          const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                          float scale) override;
  void swiglu_forward(const Tensor& out, const Tensor& gate, const Tensor& up) override;
  void swiglu_backward(const Tensor& dgate, const Tensor& dup, bool accumulate, const Tensor& dout, const Tensor& gate,
                       const Tensor& up) override;
  void ce_row_max(const Tensor& row_max, const Tensor& logits) override;
  void ce_sumexp_target(const Tensor& sumexp, const Tensor& target_logit, const Tensor& logits, const Tensor& row_max,
                        const Tensor& targets, int64_t vocab_start) override;
  void ce_loss_mean(const Tensor& loss_mean, const Tensor& row_max, const Tensor& sumexp,
                    const Tensor& target_logit) override;
  void ce_backward(const Tensor& dlogits, bool accumulate, const Tensor& logits, const Tensor& row_max,
                   const Tensor& sumexp, const Tensor& targets, int64_t vocab_start, const Tensor& dloss,
                   float scale) override;
  void sum_squares(const Tensor& out, const Tensor& x, bool accumulate) override;
  void adamw(const Tensor& master, const Tensor& m, const Tensor& v, const Tensor& grad, const Tensor& compute_out,
             const Tensor& norm_sq, const AdamWArgs& args) override;
  std::unique_ptr<HostCopy> copy_to_host_async(void* host_dst, const Tensor& src) override;

 private:
  // RoPE rotation shared by forward (sign +1) and backward (sign -1, the inverse rotation).
  void rope_rotate(const Tensor& dst, bool accumulate, const Tensor& src, float base, float sign, const char* op);
  std::shared_ptr<const RopeTable> rope_table(int64_t max_t, int64_t head_dim, float base);
  // At least `floats` floats of uninitialised scratch, 64-byte aligned, kept between calls so that a kernel does
  // not pay the page faults of fresh memory every step. The caller holds scratch_mutex_ while it uses it.
  float* scratch(size_t floats);

  int threads_;
  std::string name_;
  std::mutex rope_mutex_;
  std::shared_ptr<const RopeTable> rope_table_;
  std::mutex scratch_mutex_;
  std::unique_ptr<float[]> scratch_;
  size_t scratch_floats_ = 0;
};

// ---- argument access ---------------------------------------------------------------------------------
// The data pointer of a host tensor of the given dtype; throws a shape error naming op and argument otherwise.
float* f32_data(const Tensor& t, const char* op, const char* arg);
const int32_t* i32_data(const Tensor& t, const char* op, const char* arg);

// ---- parallel loops ----------------------------------------------------------------------------------
// Below this many elements of simple elementwise work, a parallel region costs more than it saves.
constexpr int64_t kElementGrain = int64_t{1} << 15;

// Runs fn(begin, end) over [0, n) split into at most `threads` contiguous chunks of at least `grain` items.
// Chunk boundaries are multiples of 16 items, so neighbouring threads do not write one cache line.
template <class Fn>
void parallel_for(int threads, int64_t n, int64_t grain, Fn&& fn) {
  if (n <= 0) return;
  int64_t chunks = (n + grain - 1) / grain;
  if (chunks > threads) chunks = threads;
  int64_t chunk = ((n + chunks - 1) / chunks + 15) / 16 * 16;
  chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t begin = c * chunk, end = begin + chunk < n ? begin + chunk : n;
    fn(begin, end);
  }
}

// ---- vectorisable math -------------------------------------------------------------------------------
// exp(x) in f32 with about 1 ulp of error (Cephes' expf: exp(x) = 2^n exp(r), |r| <= ln2/2, degree-6
// polynomial), written without calls or branches so that loops over it vectorise; glibc's expf only does under
// -ffast-math. Returns 0 below -87.3 (where expf is subnormal) and +inf above 88; NaN stays NaN.
LOOM_CPU_INLINE float fast_exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  constexpr float kLo = -87.33654f, kHi = 88.0f;
  float xc = x < kLo ? kLo : x;
  xc = xc > kHi ? kHi : xc;
  float t = xc * kLog2e + kMagic;
  float n = t - kMagic;
  float r = xc - n * 0.693359375f;  // ln2 split in two for an exact first product
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  int32_t ni = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(kMagic);
  float y = p * std::bit_cast<float>((ni + 127) << 23);
  y = x < kLo ? 0.0f : y;
  return x > kHi ? std::bit_cast<float>(0x7f800000u) : y;
}

LOOM_CPU_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// Sums of f32 vectors: f32 lanes over blocks of kSumBlock, the block sums added in double, so the error stays
// that of a short f32 sum however long the vector is.
constexpr int64_t kSumBlock = 256;

LOOM_CPU_INLINE double sum_f32(const float* x, int64_t n) {
  double total = 0;
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t e = b + kSumBlock < n ? b + kSumBlock : n;
    float acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = b; i < e; ++i) acc += x[i];
    total += acc;
  }
  return total;
}

// sum_i a[i] * b[i], blocked like sum_f32.
LOOM_CPU_INLINE double sum_product_f32(const float* a, const float* b, int64_t n) {
  double total = 0;
  for (int64_t blk = 0; blk < n; blk += kSumBlock) {
    const int64_t e = blk + kSumBlock < n ? blk + kSumBlock : n;
    float acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = blk; i < e; ++i) acc += a[i] * b[i];
    total += acc;
  }
  return total;
}

}  // namespace loom::cpu
