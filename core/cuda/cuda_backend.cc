#include "core/cuda/cuda_backend.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/cuda/cuda_check.h"
#include "core/cuda/kernels.h"
#include "core/log.h"

#define LOOM_CUBLAS_CHECK(expr)                                                                  \
  do {                                                                                           \
    cublasStatus_t loom_st_ = (expr);                                                            \
    if (loom_st_ != CUBLAS_STATUS_SUCCESS)                                                       \
      LOOM_THROW(kCuda, #expr << " failed: " << cublasLtGetStatusName(loom_st_) << " ("          \
                              << cublasLtGetStatusString(loom_st_) << ")");                      \
  } while (0)

namespace loom::cuda {

// ---- pointer helpers -----------------------------------------------------------------------------------

const void* device_ptr(const Tensor& t, const char* op, const char* arg) {
  LOOM_CHECK(t.device() == Device::kCuda, kShape,
             op << ": argument '" << arg << "' is in host memory, the CUDA backend needs device memory");
  LOOM_CHECK(t.data() != nullptr || t.numel() == 0, kShape, op << ": argument '" << arg << "' has no storage");
  return t.data();
}

void* device_mut_ptr(const Tensor& t, const char* op, const char* arg) {
  return const_cast<void*>(device_ptr(t, op, arg));
}

void check_float_dtype(const Tensor& t, const char* op, const char* arg) {
  LOOM_CHECK(t.dtype() == DType::kF32 || t.dtype() == DType::kBF16, kShape,
             op << ": argument '" << arg << "' has dtype " << dtype_name(t.dtype()) << ", expected f32 or bf16");
}

// ---- device and memory ---------------------------------------------------------------------------------

CudaBackend::CudaBackend(int device) : device_(device) {
  int count = 0;
  LOOM_CUDA_CHECK(cudaGetDeviceCount(&count));
  LOOM_CHECK(device >= 0 && device < count, kCuda, "GPU " << device << " does not exist (" << count << " visible)");
  LOOM_CUDA_CHECK(cudaSetDevice(device));
  cudaDeviceProp prop{};
  LOOM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  num_sms_ = prop.multiProcessorCount;
  LOOM_CUDA_CHECK(cudaStreamCreateWithFlags(&main_stream_, cudaStreamNonBlocking));
  stream_ = main_stream_;
  // Lowest priority: staging copies yield to compute whenever both want the copy engines' scheduler. Highest:
  // the side stream's communication gets SMs as soon as blocks of the compute stream retire.
  int least = 0, greatest = 0;
  LOOM_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  LOOM_CUDA_CHECK(cudaStreamCreateWithPriority(&copy_stream_, cudaStreamNonBlocking, least));
  LOOM_CUDA_CHECK(cudaStreamCreateWithPriority(&side_stream_, cudaStreamNonBlocking, greatest));
  LOOM_CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
  for (cudaEvent_t& e : side_events_) LOOM_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  LOOM_CUBLAS_CHECK(cublasLtCreate(&lt_));
  workspace_bytes_ = size_t{32} << 20;
  LOOM_CUDA_CHECK(cudaMalloc(&lanes_[0].workspace, workspace_bytes_));
  name_ = "cuda:" + std::to_string(device) + " (" + prop.name + ", " + std::to_string(num_sms_) + " SMs, " +
          std::to_string(prop.totalGlobalMem >> 30) + " GiB, bf16 compute)";
}

struct CudaBackend::GemmPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~GemmPlan() {
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

CudaBackend::~CudaBackend() {
  cudaSetDevice(device_);
  for (cudaStream_t s : {main_stream_, side_stream_, copy_stream_})
    if (s) cudaStreamSynchronize(s);
  for (auto& [key, plan] : gemm_plans_) delete plan;
  if (lt_) cublasLtDestroy(lt_);
  for (Lane& l : lanes_) {
    if (l.workspace) cudaFree(l.workspace);
    if (l.scratch) cudaFree(l.scratch);
  }
  for (cudaEvent_t e : side_events_)
    if (e) cudaEventDestroy(e);
  if (fork_) cudaEventDestroy(fork_);
  for (cudaStream_t s : {main_stream_, side_stream_, copy_stream_})
    if (s) cudaStreamDestroy(s);
}

// ---- staging copies to host memory ---------------------------------------------------------------------

namespace {
class CudaHostCopy final : public Backend::HostCopy {
 public:
  CudaHostCopy(cudaStream_t compute, cudaEvent_t done) : compute_(compute), done_(done) {}
  ~CudaHostCopy() override {
    cudaEventSynchronize(done_);
    cudaEventDestroy(done_);
  }
  void wait() override { LOOM_CUDA_CHECK(cudaEventSynchronize(done_)); }
  void fence() override { LOOM_CUDA_CHECK(cudaStreamWaitEvent(compute_, done_, 0)); }

 private:
  cudaStream_t compute_;
  cudaEvent_t done_;
};
}  // namespace

std::unique_ptr<Backend::HostCopy> CudaBackend::copy_to_host_async(void* host_dst, const Tensor& src) {
  const void* p = device_ptr(src, "copy_to_host_async", "src");
  LOOM_CHECK(!on_side(), kInternal, "copy_to_host_async inside a side region");
  join_all_side();
  cudaEvent_t ready = nullptr, done = nullptr;
  LOOM_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
  LOOM_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  LOOM_CUDA_CHECK(cudaEventRecord(ready, stream_));  // after the work that produced src
  LOOM_CUDA_CHECK(cudaStreamWaitEvent(copy_stream_, ready, 0));
  // Chunks of 64 MiB keep each transfer large while letting the scheduler interleave other copies.
  const size_t chunk = size_t{64} << 20;
  for (size_t off = 0; off < src.nbytes(); off += chunk) {
    const size_t n = std::min(chunk, src.nbytes() - off);
    LOOM_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(host_dst) + off, static_cast<const char*>(p) + off, n,
                                    cudaMemcpyDeviceToHost, copy_stream_));
  }
  LOOM_CUDA_CHECK(cudaEventRecord(done, copy_stream_));
  LOOM_CUDA_CHECK(cudaEventDestroy(ready));
  return std::make_unique<CudaHostCopy>(main_stream_, done);
}

void CudaBackend::pin_host_memory(void* ptr, size_t bytes) {
  LOOM_CUDA_CHECK(cudaHostRegister(ptr, bytes, cudaHostRegisterPortable));
}

void CudaBackend::unpin_host_memory(void* ptr) { cudaHostUnregister(ptr); }

void* CudaBackend::allocate(size_t bytes) {
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, std::max<size_t>(bytes, 256));
  if (err != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    LOOM_THROW(kCuda, "out of GPU memory on cuda:" << device_ << " allocating " << bytes << " bytes ("
                                                  << (free_b >> 20) << " MiB free of " << (total_b >> 20)
                                                  << " MiB): " << cudaGetErrorString(err));
  }
  return p;
}

void CudaBackend::deallocate(void* ptr) {
  if (ptr) cudaFree(ptr);
}

void* CudaBackend::scratch(size_t bytes) {
  Lane& l = lane();
  if (bytes > l.scratch_bytes) {
    LOOM_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the old block may still be in use by queued kernels
    if (l.scratch) LOOM_CUDA_CHECK(cudaFree(l.scratch));
    l.scratch = nullptr;
    l.scratch_bytes = 0;
    l.scratch = allocate(bytes);
    l.scratch_bytes = bytes;
  }
  return l.scratch;
}

void CudaBackend::synchronize() {
  if (!on_side()) join_all_side();
  LOOM_CUDA_CHECK(cudaStreamSynchronize(side_stream_));
  LOOM_CUDA_CHECK(cudaStreamSynchronize(main_stream_));
}

// ---- the side stream -----------------------------------------------------------------------------------

void CudaBackend::begin_side() {
  LOOM_CHECK(!on_side(), kInternal, "begin_side: side regions do not nest");
  LOOM_CUDA_CHECK(cudaEventRecord(fork_, main_stream_));
  LOOM_CUDA_CHECK(cudaStreamWaitEvent(side_stream_, fork_, 0));
  stream_ = side_stream_;
}

uint64_t CudaBackend::end_side() {
  LOOM_CHECK(on_side(), kInternal, "end_side without begin_side");
  const uint64_t ticket = side_issued_ + 1;
  stream_ = main_stream_;  // back on the compute stream even when the record fails
  LOOM_CUDA_CHECK(cudaEventRecord(side_events_[ticket % kSideEvents], side_stream_));
  side_issued_ = ticket;
  return ticket;
}

void CudaBackend::join_side(uint64_t ticket) {
  LOOM_CHECK(!on_side(), kInternal, "join_side inside a side region");
  ticket = std::min(ticket, side_issued_);
  if (ticket <= side_joined_) return;
  LOOM_CUDA_CHECK(cudaStreamWaitEvent(main_stream_, side_events_[ticket % kSideEvents], 0));
  side_joined_ = ticket;
}

cudaStream_t CudaBackend::collective_stream() {
  if (!on_side()) join_all_side();
  return stream_;
}

void CudaBackend::copy(const Tensor& dst, const Tensor& src) {
  LOOM_CHECK(dst.numel() == src.numel(), kShape,
             "copy: " << src.describe() << " into " << dst.describe() << " (element counts differ)");
  const int64_t n = dst.numel();
  if (n == 0) return;
  const bool dst_dev = dst.device() == Device::kCuda, src_dev = src.device() == Device::kCuda;
  if (dst.dtype() == src.dtype()) {
    LOOM_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), dst.nbytes(), cudaMemcpyDefault, stream_));
    return;
  }
  const bool convertible = (dst.dtype() == DType::kF32 || dst.dtype() == DType::kBF16) &&
                           (src.dtype() == DType::kF32 || src.dtype() == DType::kBF16);
  LOOM_CHECK(convertible, kShape, "copy: cannot convert " << src.describe() << " to " << dst.describe());
  if (dst_dev && src_dev) {
    launch_convert(dst.data(), dst.dtype(), src.data(), src.dtype(), n, stream_);
    return;
  }
  // A conversion across the host boundary (initialisation, loading weights): convert on the host side.
  std::vector<uint16_t> half(static_cast<size_t>(n));
  std::vector<float> full(static_cast<size_t>(n));
  if (src_dev) {  // device -> host
    void* staging = src.dtype() == DType::kF32 ? static_cast<void*>(full.data()) : static_cast<void*>(half.data());
    LOOM_CUDA_CHECK(cudaMemcpyAsync(staging, src.data(), src.nbytes(), cudaMemcpyDeviceToHost, stream_));
    LOOM_CUDA_CHECK(cudaStreamSynchronize(stream_));
  } else if (src.dtype() == DType::kF32) {
    std::memcpy(full.data(), src.data(), src.nbytes());
  } else {
    std::memcpy(half.data(), src.data(), src.nbytes());
  }
  if (src.dtype() == DType::kF32) {
    for (int64_t i = 0; i < n; ++i) half[static_cast<size_t>(i)] = f32_to_bf16(full[static_cast<size_t>(i)]).bits;
  } else {
    for (int64_t i = 0; i < n; ++i) full[static_cast<size_t>(i)] = bf16_to_f32(bf16{half[static_cast<size_t>(i)]});
  }
  const void* converted = dst.dtype() == DType::kF32 ? static_cast<const void*>(full.data()) : half.data();
  LOOM_CUDA_CHECK(cudaMemcpyAsync(dst.data(), converted, dst.nbytes(), cudaMemcpyDefault, stream_));
  LOOM_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the staging vectors die here
  (void)dst_dev;
}

void CudaBackend::fill(const Tensor& dst, float value) {
  if (dst.numel() == 0) return;
  launch_fill(device_mut_ptr(dst, "fill", "dst"), dst.dtype(), value, dst.numel(), stream_);
}

// ---- matmul through cuBLASLt ---------------------------------------------------------------------------
//
// Row-major C[M,N] = op(A) op(B) is column-major C^T[N,M] = op(B)^T op(A)^T: cuBLASLt's first operand is B and
// its second is A, each described by its stored (column-major) shape. One plan (descriptors + the heuristic's
// algorithm) is cached per shape, transposition and output dtype.

size_t CudaBackend::GemmKeyHash::operator()(const GemmKey& k) const {
  size_t h = std::hash<int64_t>()(k.m);
  h = h * 1000003u ^ std::hash<int64_t>()(k.n);
  h = h * 1000003u ^ std::hash<int64_t>()(k.k);
  return h * 31u + (k.ta ? 1 : 0) * 2 + (k.tb ? 1 : 0) + 4 * static_cast<size_t>(k.c_dtype);
}

CudaBackend::GemmPlan& CudaBackend::gemm_plan(const GemmKey& key) {
  std::lock_guard<std::mutex> lock(gemm_mutex_);
  auto it = gemm_plans_.find(key);
  if (it != gemm_plans_.end()) return *it->second;
  auto plan = std::make_unique<GemmPlan>();
  const cudaDataType_t c_type = key.c_dtype == DType::kF32 ? CUDA_R_32F : CUDA_R_16BF;
  LOOM_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t op_first = key.tb ? CUBLAS_OP_T : CUBLAS_OP_N;   // from B
  cublasOperation_t op_second = key.ta ? CUBLAS_OP_T : CUBLAS_OP_N;  // from A
  LOOM_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)));
  LOOM_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)));
  const uint64_t M = static_cast<uint64_t>(key.m), N = static_cast<uint64_t>(key.n), K = static_cast<uint64_t>(key.k);
  // Stored shapes (column-major rows x cols, leading dimension = rows).
  if (!key.tb) {
    LOOM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, N, K, static_cast<int64_t>(N)));
  } else {
    LOOM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, K, N, static_cast<int64_t>(K)));
  }
  if (!key.ta) {
    LOOM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_16BF, K, M, static_cast<int64_t>(K)));
  } else {
    LOOM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_16BF, M, K, static_cast<int64_t>(M)));
  }
  LOOM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->c, c_type, N, M, static_cast<int64_t>(N)));
  cublasLtMatmulPreference_t pref = nullptr;
  LOOM_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  LOOM_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                         &workspace_bytes_, sizeof(workspace_bytes_)));
  // Loom's tensors start on 16-byte boundaries at least (arena and parameter alignment).
  uint32_t align = 16;
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    LOOM_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, sizeof(align)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt_, plan->desc, plan->a, plan->b, plan->c, plan->c, pref, 1,
                                                     &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  LOOM_CUBLAS_CHECK(st);
  LOOM_CHECK(found > 0, kCuda,
             "cuBLASLt has no algorithm for a " << key.m << "x" << key.n << "x" << key.k << " bf16 product");
  plan->algo = result.algo;
  GemmPlan* raw = plan.release();
  gemm_plans_.emplace(key, raw);
  return *raw;
}

void CudaBackend::matmul(const Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
                         float beta) {
  check_dtype(a, DType::kBF16, "matmul", "a");
  check_dtype(b, DType::kBF16, "matmul", "b");
  check_float_dtype(c, "matmul", "c");
  LOOM_CHECK(a.ndim() == 2 && b.ndim() == 2 && c.ndim() == 2, kShape,
             "matmul: a, b and c must be 2-D, got " << a.shape().str() << ", " << b.shape().str() << ", "
                                                    << c.shape().str());
  const int64_t m = trans_a ? a.size(1) : a.size(0), k = trans_a ? a.size(0) : a.size(1);
  const int64_t kb = trans_b ? b.size(1) : b.size(0), n = trans_b ? b.size(0) : b.size(1);
  LOOM_CHECK(k == kb, kShape, "matmul: inner dimensions differ: op(a) is [" << m << ", " << k << "], op(b) is [" << kb
                                                                            << ", " << n << "]");
  check_shape(c, Shape{m, n}, "matmul", "c");
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == 0.0f) {
      fill(c, 0.0f);
    } else {
      axpy(c, c, beta, false);
    }
    return;
  }
  for (const Tensor* t : {&a, &b, &c})
    LOOM_CHECK(reinterpret_cast<uintptr_t>(t->data()) % 16 == 0, kShape,
               "matmul: operands must start on 16-byte boundaries (got " << t->data() << ")");
  GemmPlan& plan = gemm_plan(GemmKey{m, n, k, trans_a, trans_b, c.dtype()});
  void*& workspace = lane().workspace;
  if (workspace == nullptr) workspace = allocate(workspace_bytes_);  // the side stream's, on its first product
  void* pc = device_mut_ptr(c, "matmul", "c");
  LOOM_CUBLAS_CHECK(cublasLtMatmul(lt_, plan.desc, &alpha, device_ptr(b, "matmul", "b"), plan.a,
                                   device_ptr(a, "matmul", "a"), plan.b, &beta, pc, plan.c, pc, plan.c, &plan.algo,
                                   workspace, workspace_bytes_, stream_));
}

}  // namespace loom::cuda

namespace loom {
std::unique_ptr<Backend> make_cuda_backend(int device) { return std::make_unique<cuda::CudaBackend>(device); }
}  // namespace loom
