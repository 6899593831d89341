// CudaBackend: the GPU implementation of core/backend.h. Compute dtype bf16 with f32 accumulation everywhere;
// statistics, losses, master weights and optimizer state f32; parameter gradients f32 (see docs/design.md).
//
// Every kernel is enqueued on the backend's current stream (stream(): the compute stream, or the side stream in a
// side region) and returns without waiting; only download(),
// read_scalar() and synchronize() wait. The member functions are defined across several files, one per kind of
// kernel:
//   cuda_backend.cc   device, memory, copies, fill, matmul (cuBLASLt), factory
//   elementwise.cu    add, axpy, casts, SwiGLU, RoPE, embedding
//   norm.cu           RMSNorm forward / backward
//   loss.cu           cross-entropy pieces
//   optim.cu          sum of squares, fused AdamW
//   attention.cu      flash-style causal attention forward / backward
// Kernels never allocate memory of their own except through scratch(), which grows during the first step only.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>

#include "core/backend.h"

namespace loom::cuda {

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device);
  ~CudaBackend() override;

  Device device() const override { return Device::kCuda; }
  DType compute_dtype() const override { return DType::kBF16; }
  std::string name() const override { return name_; }

  void* allocate(size_t bytes) override;
  void deallocate(void* ptr) override;
  void copy(const Tensor& dst, const Tensor& src) override;
  void fill(const Tensor& dst, float value) override;
  void synchronize() override;

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
  void pin_host_memory(void* ptr, size_t bytes) override;
  void unpin_host_memory(void* ptr) override;

  void begin_side() override;
  uint64_t end_side() override;
  void join_side(uint64_t ticket) override;
  bool on_side() const override { return stream_ == side_stream_; }

  // The current stream: the compute stream, or the side stream inside a side region.
  cudaStream_t stream() const { return stream_; }
  cudaStream_t compute_stream() const { return main_stream_; }
  // The stream a collective is enqueued on: the current one; on the compute stream after it has joined all side
  // work (so a group's collectives run in the order they were enqueued on every rank).
  cudaStream_t collective_stream();
  uint64_t side_regions() const { return side_issued_; }  // end_side() calls so far
  int device_index() const { return device_; }
  int num_sms() const { return num_sms_; }
  // Device scratch of at least `bytes` for the current stream, valid until its next scratch() call; grows (with a
  // synchronize) only when a larger request comes, so after the first step it never allocates.
  void* scratch(size_t bytes);

 private:
  struct GemmKey {
    int64_t m, n, k;
    bool ta, tb;
    DType c_dtype;
    bool operator==(const GemmKey& o) const {
      return m == o.m && n == o.n && k == o.k && ta == o.ta && tb == o.tb && c_dtype == o.c_dtype;
    }
  };
  struct GemmKeyHash {
    size_t operator()(const GemmKey& k) const;
  };
  struct GemmPlan;
  GemmPlan& gemm_plan(const GemmKey& key);

  // Per stream (compute, side): kernels of the two streams may run at once, so they never share scratch.
  struct Lane {
    void* workspace = nullptr;  // cuBLASLt's
    void* scratch = nullptr;
    size_t scratch_bytes = 0;
  };
  Lane& lane() { return lanes_[on_side() ? 1 : 0]; }

  int device_;
  int num_sms_ = 0;
  std::string name_;
  cudaStream_t stream_ = nullptr;       // the current stream: main_stream_ or side_stream_
  cudaStream_t main_stream_ = nullptr;  // the compute stream
  cudaStream_t side_stream_ = nullptr;  // high priority, inside begin_side() .. end_side()
  cudaStream_t copy_stream_ = nullptr;  // device-to-host staging, beside the compute stream
  cudaEvent_t fork_ = nullptr;          // recorded on the compute stream by begin_side()
  // Ticket t's event is side_events_[t % kSideEvents]. A slot recorded again later marks a later position of
  // the same in-order stream, so waiting on it for an older ticket is only more conservative.
  static constexpr size_t kSideEvents = 64;
  cudaEvent_t side_events_[kSideEvents] = {};
  uint64_t side_issued_ = 0;  // tickets handed out
  uint64_t side_joined_ = 0;  // the compute stream already waits for the side stream up to this ticket
  cublasLtHandle_t lt_ = nullptr;
  size_t workspace_bytes_ = 0;
  Lane lanes_[2];
  std::mutex gemm_mutex_;
  std::unordered_map<GemmKey, GemmPlan*, GemmKeyHash> gemm_plans_;
};

// Pointer helpers with checks that name the op and the argument (device residency, dtype).
const void* device_ptr(const Tensor& t, const char* op, const char* arg);
void* device_mut_ptr(const Tensor& t, const char* op, const char* arg);
void check_float_dtype(const Tensor& t, const char* op, const char* arg);  // f32 or bf16

}  // namespace loom::cuda

namespace loom {
// The CUDA backend on GPU `device` (throws a CUDA error naming the device when it cannot be used).
std::unique_ptr<Backend> make_cuda_backend(int device);
}  // namespace loom
