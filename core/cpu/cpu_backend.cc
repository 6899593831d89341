// CPU backend, part 1: construction, memory, copies and the matrix product (OpenBLAS sgemm), plus the
// argument helpers of cpu_internal.h. Assumes the OpenBLAS build is the pthreads one (openblas-pthread), whose
// thread count is set once here and which is never entered from inside an OpenMP region.
#include <cblas.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <sstream>
#include <mutex>
#include <thread>

#include "core/cpu/cpu_internal.h"
#include "core/log.h"

namespace loom {
namespace cpu {
namespace {

constexpr size_t kAlignment = 256;

// "OpenBLAS 0.3.21 SkylakeX": the runtime library's version (from its configuration string, "OpenBLAS 0.3.21
// DYNAMIC_ARCH ...") and the kernels it chose for this CPU, which decide matmul speed more than anything else.
std::string openblas_description() {
  std::istringstream config(openblas_get_config());
  std::string product, version;
  config >> product >> version;
  std::string out = product.empty() ? "OpenBLAS" : product + (version.empty() ? "" : " " + version);
  const char* core = openblas_get_corename();
  if (core != nullptr && *core != 0) out += std::string(" ") + core;
  return out;
}

// OpenBLAS picks its kernels from the CPU model once, at load time. A model the library does not know (a newer
// one, or one a VM disguises) gets the generic "Prescott" SSE3 kernels: on a 16-core AVX-512 VM that made an
// 8192x2048x2048 sgemm 5x slower (206 vs 1049 GFLOP/s) than OPENBLAS_CORETYPE=SkylakeX. The choice cannot be
// changed after load, so say once what to set.
void warn_if_generic_openblas_kernels() {
#if defined(__x86_64__) && defined(__GNUC__)
  static std::atomic<bool> warned{false};
  const char* core = openblas_get_corename();
  if (core == nullptr || std::strcmp(core, "Prescott") != 0) return;
  const char* better = __builtin_cpu_supports("avx512f")                                   ? "SkylakeX"
                       : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? "Haswell"
                                                                                           : nullptr;
  if (better == nullptr || warned.exchange(true)) return;
  LOOM_WARN("OpenBLAS chose its generic '"
            << core << "' kernels on a CPU with " << (better[0] == 'S' ? "AVX-512" : "AVX2")
            << ": matmul runs several times slower than it could; set OPENBLAS_CORETYPE=" << better
            << " in the environment of every rank");
#endif
}

void check_host(const Tensor& t, const char* op, const char* arg) {
  LOOM_CHECK(
      t.device() == Device::kCpu, kShape,
      op << ": argument '" << arg << "' is on " << device_name(t.device()) << ", the CPU backend needs host memory");
  LOOM_CHECK(t.data() != nullptr || t.numel() == 0, kShape, op << ": argument '" << arg << "' has no storage");
}

}  // namespace

float* f32_data(const Tensor& t, const char* op, const char* arg) {
  check_dtype(t, DType::kF32, op, arg);
  check_host(t, op, arg);
  return t.ptr<float>();
}

const int32_t* i32_data(const Tensor& t, const char* op, const char* arg) {
  check_dtype(t, DType::kI32, op, arg);
  check_host(t, op, arg);
  return t.ptr<int32_t>();
}

CpuBackend::CpuBackend(int threads) : threads_(threads) {
  LOOM_CHECK(threads >= 0, kConfig, "cpu backend: threads must be >= 0 (0: all hardware threads), got " << threads);
  if (threads_ == 0) threads_ = static_cast<int>(std::thread::hardware_concurrency());
  if (threads_ < 1) threads_ = 1;
  // One threading runtime: OpenBLAS runs single-threaded inside Loom's OpenMP pool (matmul splits the product
  // over the pool). With both pools live, each spins after its work and steals the cores the other needs:
  // on 2 cores that made a tiny-model step 1.7x slower.
  openblas_set_num_threads(1);
  warn_if_generic_openblas_kernels();
  name_ =
      "cpu (" + std::to_string(threads_) + (threads_ == 1 ? " thread, " : " threads, ") + openblas_description() + ")";
}

// ---- memory ------------------------------------------------------------------------------------------

void* CpuBackend::allocate(size_t bytes) {
  // aligned_alloc wants a multiple of the alignment; a zero-byte request still gets a unique pointer.
  size_t rounded = bytes == 0 ? kAlignment : (bytes + kAlignment - 1) / kAlignment * kAlignment;
  void* p = rounded >= bytes ? std::aligned_alloc(kAlignment, rounded) : nullptr;
  LOOM_CHECK(p != nullptr, kIo, "cpu backend: out of host memory allocating " << bytes << " bytes");
  return p;
}

void CpuBackend::deallocate(void* ptr) {
  std::free(ptr);
}

float* CpuBackend::scratch(size_t floats) {
  constexpr size_t kLineFloats = 16;  // 64 bytes
  if (floats > scratch_floats_) {
    scratch_.reset();  // release the old block before taking a larger one
    scratch_floats_ = 0;
    scratch_.reset(new (std::nothrow) float[floats + kLineFloats]);
    LOOM_CHECK(scratch_ != nullptr, kIo,
               "cpu backend: out of host memory allocating " << (floats + kLineFloats) * sizeof(float)
                                                             << " bytes of kernel scratch");
    scratch_floats_ = floats;
  }
  const uintptr_t base = reinterpret_cast<uintptr_t>(scratch_.get());
  return reinterpret_cast<float*>((base + 63) / 64 * 64);
}

void CpuBackend::copy(const Tensor& dst, const Tensor& src) {
  check_host(dst, "copy", "dst");
  check_host(src, "copy", "src");
  LOOM_CHECK(dst.numel() == src.numel(), kShape,
             "copy: 'dst' " << dst.describe() << " and 'src' " << src.describe() << " differ in element count");
  const int64_t n = dst.numel();
  if (dst.dtype() == src.dtype()) {
    if (dst.data() == src.data()) return;
    const size_t elem = dtype_size(dst.dtype());
    char* d = static_cast<char*>(dst.data());
    const char* s = static_cast<const char*>(src.data());
    parallel_for(threads_, n, kElementGrain * 8, [&](int64_t i0, int64_t i1) {
      std::memcpy(d + static_cast<size_t>(i0) * elem, s + static_cast<size_t>(i0) * elem,
                  static_cast<size_t>(i1 - i0) * elem);
    });
  } else if (dst.dtype() == DType::kBF16 && src.dtype() == DType::kF32) {
    bf16* d = dst.ptr<bf16>();
    const float* s = src.ptr<float>();
    parallel_for(threads_, n, kElementGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) d[i] = f32_to_bf16(s[i]);
    });
  } else if (dst.dtype() == DType::kF32 && src.dtype() == DType::kBF16) {
    float* d = dst.ptr<float>();
    const bf16* s = src.ptr<bf16>();
    parallel_for(threads_, n, kElementGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) d[i] = bf16_to_f32(s[i]);
    });
  } else {
    LOOM_THROW(kShape, "copy: cannot convert " << src.describe() << " to " << dst.describe()
                                               << " (only f32 <-> bf16 convert; other dtypes must match)");
  }
}

void CpuBackend::fill(const Tensor& dst, float value) {
  check_host(dst, "fill", "dst");
  const int64_t n = dst.numel();
  auto fill_with = [&](auto* d, auto v) {
    parallel_for(threads_, n, kElementGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) d[i] = v;
    });
  };
  switch (dst.dtype()) {
    case DType::kF32: fill_with(dst.ptr<float>(), value); break;
    case DType::kBF16: fill_with(dst.ptr<bf16>(), f32_to_bf16(value)); break;
    case DType::kI32: fill_with(dst.ptr<int32_t>(), static_cast<int32_t>(value)); break;
    case DType::kU16: fill_with(dst.ptr<uint16_t>(), static_cast<uint16_t>(value)); break;
  }
}

// ---- matrix product ----------------------------------------------------------------------------------

// Below this many multiply-adds a product runs on one thread: splitting it costs more than it saves.
constexpr int64_t kParallelGemmWork = int64_t{1} << 18;

void CpuBackend::matmul(const Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
                        float beta) {
  float* pc = f32_data(c, "matmul", "c");
  const float* pa = f32_data(a, "matmul", "a");
  const float* pb = f32_data(b, "matmul", "b");
  LOOM_CHECK(
      a.ndim() == 2 && b.ndim() == 2 && c.ndim() == 2, kShape,
      "matmul: a, b and c must be 2-D, got " << a.shape().str() << ", " << b.shape().str() << ", " << c.shape().str());
  const int64_t m = trans_a ? a.size(1) : a.size(0);
  const int64_t k = trans_a ? a.size(0) : a.size(1);
  const int64_t kb = trans_b ? b.size(1) : b.size(0);
  const int64_t n = trans_b ? b.size(0) : b.size(1);
  LOOM_CHECK(k == kb, kShape,
             "matmul: inner dimensions differ: op(a) is [" << m << ", " << k << "], op(b) is [" << kb << ", " << n
                                                           << "] (trans_a " << trans_a << ", trans_b " << trans_b
                                                           << ")");
  check_shape(c, Shape{m, n}, "matmul", "c");
  if (m == 0 || n == 0) return;
  if (k == 0) {
    // An empty product is zero; scale C ourselves rather than rely on how BLAS treats k == 0.
    parallel_for(threads_, m * n, kElementGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) pc[i] = beta == 0.0f ? 0.0f : beta * pc[i];
    });
    return;
  }
  // BLAS takes int dimensions.
  constexpr int64_t kMaxDim = 0x7fffffff;
  LOOM_CHECK(m <= kMaxDim && n <= kMaxDim && k <= kMaxDim && a.size(1) <= kMaxDim && b.size(1) <= kMaxDim, kShape,
             "matmul: dimensions of " << a.shape().str() << " x " << b.shape().str() << " exceed the BLAS int range");
  // BLAS (reference semantics, which OpenBLAS follows) does not read C when beta is zero.
  const int lda = static_cast<int>(a.size(1)), ldb = static_cast<int>(b.size(1)), ldc = static_cast<int>(n);
  const CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
  // Split the larger output dimension into one block per thread (blocks of whole 16-element panels); each
  // block is an independent product, so threads share nothing but the inputs.
  const bool split_rows = m >= n;
  const int64_t extent = split_rows ? m : n;
  const int64_t min_block = 16;
  const int parts = static_cast<int>(std::min<int64_t>(threads_, std::max<int64_t>(1, extent / min_block)));
  if (parts == 1 || m * n * k < kParallelGemmWork) {
    cblas_sgemm(CblasRowMajor, ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, pa, lda,
                pb, ldb, beta, pc, ldc);
    return;
  }
#pragma omp parallel for num_threads(parts) schedule(static)
  for (int part = 0; part < parts; ++part) {
    const int64_t per = (extent / parts + min_block - 1) / min_block * min_block;
    const int64_t lo = std::min(extent, part * per), hi = part == parts - 1 ? extent : std::min(extent, lo + per);
    if (lo >= hi) continue;
    if (split_rows) {  // C[lo:hi, :] = op(A)[lo:hi, :] op(B)
      const float* a_blk = trans_a ? pa + lo : pa + lo * lda;
      cblas_sgemm(CblasRowMajor, ta, tb, static_cast<int>(hi - lo), static_cast<int>(n), static_cast<int>(k), alpha,
                  a_blk, lda, pb, ldb, beta, pc + lo * ldc, ldc);
    } else {  // C[:, lo:hi] = op(A) op(B)[:, lo:hi]
      const float* b_blk = trans_b ? pb + lo * ldb : pb + lo;
      cblas_sgemm(CblasRowMajor, ta, tb, static_cast<int>(m), static_cast<int>(hi - lo), static_cast<int>(k), alpha, pa,
                  lda, b_blk, ldb, beta, pc + lo, ldc);
    }
  }
}

namespace {
// The copy runs on its own thread so that training goes on meanwhile; wait() and fence() join it once.
class CpuHostCopy final : public Backend::HostCopy {
 public:
  CpuHostCopy(void* dst, const void* src, size_t bytes)
      : thread_([dst, src, bytes] { std::memcpy(dst, src, bytes); }) {}
  ~CpuHostCopy() override { wait(); }
  void wait() override {
    std::call_once(joined_, [this] { thread_.join(); });
  }
  void fence() override { wait(); }

 private:
  std::thread thread_;
  std::once_flag joined_;
};
}  // namespace

std::unique_ptr<Backend::HostCopy> CpuBackend::copy_to_host_async(void* host_dst, const Tensor& src) {
  check_host(src, "copy_to_host_async", "src");
  return std::make_unique<CpuHostCopy>(host_dst, src.data(), src.nbytes());
}

}  // namespace cpu

std::unique_ptr<Backend> make_cpu_backend(const CpuBackendOptions& options) {
  return std::make_unique<cpu::CpuBackend>(options.threads);
}

}  // namespace loom
