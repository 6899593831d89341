// Backend: the kernels of one device. The CPU backend (core/cpu/) is f32 and the reference; the CUDA backend
// (core/cuda/) computes in bf16 with f32 accumulation. Both implement exactly the semantics written here and are
// tested op by op against each other (tests/unit/test_cpu_kernels.cc, tests/cuda/).
//
// Conventions for every kernel:
// - Tensors are contiguous row-major and already allocated by the caller; kernels never allocate.
// - "Activations" are in compute_dtype(); statistics (rstd, lse, softmax stats, losses) are f32.
// - A gradient output has an `accumulate` flag: false writes dst = result, true writes dst += result.
//   Parameter-gradient outputs (dw of RMSNorm, the embedding table gradient) always accumulate and may be f32
//   or compute_dtype().
// - On CUDA every kernel is enqueued on the backend's current stream (the compute stream, or the side stream
//   between begin_side() and end_side()) and returns without waiting; on the CPU it runs to completion on the
//   backend's thread pool.
// - Shapes are checked by the ops layer (core/ops.cc) before a kernel is called; kernels may assume them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/tensor.h"

namespace loom {

struct AdamWArgs {
  float lr = 0;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0;  // decoupled: master -= lr * weight_decay * master
  float grad_scale = 1;    // multiplies the gradient buffer before use (e.g. 1 / data-parallel size)
  float max_norm = 0;      // global-norm clipping threshold; 0 disables clipping
  int64_t step = 1;        // 1-based, for bias correction
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual DType compute_dtype() const = 0;
  virtual std::string name() const = 0;  // "cpu (4 threads, OpenBLAS)"

  // ---- memory --------------------------------------------------------------------------------------
  // Device memory (host memory on the CPU backend), at least 256-byte aligned. Throws an error naming the
  // size on failure.
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* ptr) = 0;
  // dst = src elementwise; same numel. Converts between f32 and bf16. Either side may be a host tensor
  // (Device::kCpu) on a CUDA backend: that is the upload/download path.
  virtual void copy(const Tensor& dst, const Tensor& src) = 0;
  virtual void fill(const Tensor& dst, float value) = 0;
  // Waits for all enqueued work (no-op on the CPU).
  virtual void synchronize() = 0;

  // ---- elementwise ---------------------------------------------------------------------------------
  // out = a + b (same shape and dtype; out may alias a or b).
  virtual void add(const Tensor& out, const Tensor& a, const Tensor& b) = 0;
  // dst = (accumulate ? dst : 0) + alpha * src (same numel; dst may be f32 while src is compute dtype).
  virtual void axpy(const Tensor& dst, const Tensor& src, float alpha, bool accumulate) = 0;

  // ---- matrix product ------------------------------------------------------------------------------
  // C[M,N] = alpha * op(A) op(B) + beta * C, row-major, op(X) = X or X^T. A and B are 2-D in compute dtype;
  // C is 2-D in compute dtype or f32; accumulation is f32. With beta == 0, C is not read (may hold NaN).
  virtual void matmul(const Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
                      float beta) = 0;

  // ---- embedding (vocab-parallel aware) ------------------------------------------------------------
  // out[n,:] = table[tokens[n] - vocab_start, :] when vocab_start <= tokens[n] < vocab_start + V_local,
  // else 0.  out [N, D], table [V_local, D], tokens i32 [N].
  virtual void embedding_forward(const Tensor& out, const Tensor& table, const Tensor& tokens, int64_t vocab_start) = 0;
  // dtable[tokens[n] - vocab_start, :] += dout[n, :] for in-range tokens. Always accumulates.
  virtual void embedding_backward(const Tensor& dtable, const Tensor& dout, const Tensor& tokens,
                                  int64_t vocab_start) = 0;

  // ---- RMSNorm over the last dimension -------------------------------------------------------------
  // rstd[n] = 1 / sqrt(mean_d x[n,d]^2 + eps); y[n,d] = x[n,d] * rstd[n] * w[d].
  // x, y [N, D]; w [D]; rstd f32 [N].
  virtual void rmsnorm_forward(const Tensor& y, const Tensor& rstd, const Tensor& x, const Tensor& w, float eps) = 0;
  // dx (+)= rstd * (w*dy - xhat * mean_d(w*dy*xhat)), xhat = x*rstd;  dw += sum_n dy*xhat (always accumulates).
  virtual void rmsnorm_backward(const Tensor& dx, bool accumulate_dx, const Tensor& dw, const Tensor& dy,
                                const Tensor& x, const Tensor& w, const Tensor& rstd) = 0;

  // ---- rotary position embedding (rotate-half convention) ------------------------------------------
  // x, out [B, T, H, Dh], Dh even, position of row t is t. For i < Dh/2, with a = t * base^(-2i/Dh):
  //   out[i]        = x[i] cos a - x[i + Dh/2] sin a
  //   out[i + Dh/2] = x[i + Dh/2] cos a + x[i] sin a
  virtual void rope_forward(const Tensor& out, const Tensor& x, float base) = 0;
  // dx (+)= the inverse rotation of dy.
  virtual void rope_backward(const Tensor& dx, bool accumulate, const Tensor& dy, float base) = 0;

  // ---- causal self-attention -----------------------------------------------------------------------
  // q, k, v, out [B, T, H, Dh]; lse f32 [B, H, T].
  // s[t,u] = scale * <q[t], k[u]> for u <= t; p = softmax_u(s); out[t] = sum_u p[t,u] v[u];
  // lse[t] = log sum_u exp(s[t,u]). No T x T matrix needs to be kept.
  virtual void attention_forward(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k,
                                 const Tensor& v, float scale) = 0;
  // Gradients of the above; dq, dk, dv all follow the same accumulate flag.
  virtual void attention_backward(const Tensor& dq, const Tensor& dk, const Tensor& dv, bool accumulate,
                                  const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse, float scale) = 0;

  // ---- SwiGLU --------------------------------------------------------------------------------------
  // out = silu(gate) * up, silu(g) = g / (1 + exp(-g)). All the same shape.
  virtual void swiglu_forward(const Tensor& out, const Tensor& gate, const Tensor& up) = 0;
  virtual void swiglu_backward(const Tensor& dgate, const Tensor& dup, bool accumulate, const Tensor& dout,
                               const Tensor& gate, const Tensor& up) = 0;

  // ---- cross-entropy over (possibly vocab-sharded) logits ------------------------------------------
  // logits [N, V_local] hold columns vocab_start .. vocab_start+V_local-1 of the full vocabulary; targets i32
  // [N] are full-vocabulary ids. With tensor parallelism the caller all-reduces between the steps.
  // row_max f32 [N] = max_v logits[n, v].
  virtual void ce_row_max(const Tensor& row_max, const Tensor& logits) = 0;
  // sumexp[n] = sum_v exp(logits[n,v] - row_max[n]);
  // target_logit[n] = logits[n, targets[n] - vocab_start] if that column is local, else 0.
  virtual void ce_sumexp_target(const Tensor& sumexp, const Tensor& target_logit, const Tensor& logits,
                                const Tensor& row_max, const Tensor& targets, int64_t vocab_start) = 0;
  // loss_mean f32 [1] = mean_n (log(sumexp[n]) + row_max[n] - target_logit[n]).
  virtual void ce_loss_mean(const Tensor& loss_mean, const Tensor& row_max, const Tensor& sumexp,
                            const Tensor& target_logit) = 0;
  // dlogits[n,v] (+)= dloss[0] * scale * (exp(logits[n,v] - row_max[n]) / sumexp[n] - [v == target - start]).
  // dloss is f32 [1] (the gradient of the mean loss); scale is normally 1/N.
  virtual void ce_backward(const Tensor& dlogits, bool accumulate, const Tensor& logits, const Tensor& row_max,
                           const Tensor& sumexp, const Tensor& targets, int64_t vocab_start, const Tensor& dloss,
                           float scale) = 0;

  // ---- reductions and the optimizer ----------------------------------------------------------------
  // out f32 [1] (+)= sum x^2.
  virtual void sum_squares(const Tensor& out, const Tensor& x, bool accumulate) = 0;
  // One fused AdamW pass over a range of the parameter arena. master, m, v f32 [n]; grad [n] (f32 or
  // compute dtype); compute_out [n] in compute dtype receives the updated weights (may alias master when
  // compute dtype is f32... it never does in Loom's arena, but kernels must allow it).
  // g = grad * grad_scale * clip, clip = min(1, max_norm / (sqrt(norm_sq[0]) * grad_scale + 1e-6)) when
  // max_norm > 0 and norm_sq is given, else 1; norm_sq f32 [1] is the squared norm of the unscaled gradients.
  // m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; mhat = m/(1-b1^step); vhat = v/(1-b2^step);
  // master -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * master); compute_out = master.
  virtual void adamw(const Tensor& master, const Tensor& m, const Tensor& v, const Tensor& grad,
                     const Tensor& compute_out, const Tensor& norm_sq, const AdamWArgs& args) = 0;

  // ---- asynchronous copies to host memory (snapshot staging) ---------------------------------------
  // A copy of device data into host memory that runs beside the training work. On CUDA it runs on a side stream
  // after everything enqueued so far on the compute stream; on the CPU, on a helper thread.
  class HostCopy {
   public:
    virtual ~HostCopy() = default;
    // Blocks the calling thread until the bytes are in host memory.
    virtual void wait() = 0;
    // Makes work enqueued from now on wait for the copy (CUDA: the compute stream waits on an event, the host
    // does not block; CPU: same as wait()). Call before overwriting the source.
    virtual void fence() = 0;
  };
  virtual std::unique_ptr<HostCopy> copy_to_host_async(void* host_dst, const Tensor& src) = 0;
  // Page-locks host memory that copies will target many times (no-op on the CPU).
  virtual void pin_host_memory(void* ptr, size_t bytes) {}
  virtual void unpin_host_memory(void* ptr) {}

  // ---- the side stream (token-split overlap, docs/fused_norm.md) ----------------------------------------
  // Work enqueued between begin_side() and end_side() runs on a second, high-priority stream that first waits
  // for everything enqueued before begin_side(); the compute stream does not wait for it until join_side().
  // end_side() returns a ticket, the side stream's position: join_side(ticket) makes work enqueued from now on
  // wait for the side work up to that ticket (tickets grow; 0 is nothing), join_all_side() for all of it.
  // Regions do not nest. The CPU backend runs everything in order on its thread: these do nothing there and
  // tickets are 0. A communicator on a device enqueues on the current stream, and joins all side work before
  // a collective on the compute stream, so the collectives of a group keep one order on every rank.
  virtual void begin_side() {}
  virtual uint64_t end_side() { return 0; }
  virtual void join_side(uint64_t /*ticket*/) {}
  void join_all_side() { join_side(~uint64_t{0}); }
  virtual bool on_side() const { return false; }

  // ---- helpers built on the above -----------------------------------------------------------------
  // Copies to / from host memory; blocks until done.
  void download(const Tensor& src, void* host);
  void upload(const Tensor& dst, const void* host);
  // Reads a one-element f32 tensor (synchronizes).
  float read_scalar(const Tensor& t);
};

// A side region for a scope: begin_side() when made (if `active`), end_side() by close() — which returns the
// ticket — or, when an exception leaves the scope first, by the destructor (which swallows a second error: the
// first one is on its way).
class SideScope {
 public:
  explicit SideScope(Backend& backend, bool active = true) : backend_(backend), open_(active) {
    if (open_) backend_.begin_side();
  }
  ~SideScope() {
    if (!open_) return;
    try {
      backend_.end_side();
    } catch (...) {
    }
  }
  SideScope(const SideScope&) = delete;
  SideScope& operator=(const SideScope&) = delete;
  uint64_t close() {
    if (!open_) return 0;
    open_ = false;
    return backend_.end_side();
  }

 private:
  Backend& backend_;
  bool open_;
};

struct CpuBackendOptions {
  int threads = 0;  // 0: hardware threads / ranks on this node (decided by the caller), at least 1
};
std::unique_ptr<Backend> make_cpu_backend(const CpuBackendOptions& options);

// Whether this build has the CUDA backend and a usable GPU is present (no CUDA context is created when the
// build has no CUDA). `reason` says why not.
bool cuda_available(std::string* reason);

}  // namespace loom
