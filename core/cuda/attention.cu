// CudaBackend::attention_forward / attention_backward: argument checks at the API boundary, then the kernels of
// core/cuda/attention_kernels.cuh (tensor-core path for Dh 32, 64, 128 with 16-byte aligned tensors, a generic
// warp-per-row path otherwise). The backward's per-row delta (B*H*T floats) lives in scratch().
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "core/cuda/attention_kernels.cuh"
#include "core/cuda/cuda_backend.h"
#include "core/cuda/cuda_check.h"

namespace loom::cuda {

namespace {

struct AttentionShape {
  int batch, seq, heads, dim;
};

// q is [B, T, H, Dh] bf16, the `same` tensors have its shape and dtype, lse is f32 [B, H, T].
AttentionShape check_attention(const char* op, const Tensor& q,
                               std::initializer_list<std::pair<const Tensor*, const char*>> same, const Tensor& lse) {
  LOOM_CHECK(q.ndim() == 4, kShape, op << ": 'q' must be [B, T, H, Dh], got " << q.shape().str());
  check_dtype(q, DType::kBF16, op, "q");
  for (const auto& [t, arg] : same) {
    check_shape(*t, q.shape(), op, arg);
    check_dtype(*t, DType::kBF16, op, arg);
  }
  check_shape(lse, Shape{q.size(0), q.size(2), q.size(1)}, op, "lse");
  check_dtype(lse, DType::kF32, op, "lse");
  const int64_t batch = q.size(0), seq = q.size(1), heads = q.size(2), dim = q.size(3);
  LOOM_CHECK(
      dim >= 1 && dim <= attention::kMaxGenericDim, kShape,
      op << ": head dimension Dh of 'q' " << q.shape().str() << " must be in [1, " << attention::kMaxGenericDim << "]");
  LOOM_CHECK(batch * heads < (int64_t{1} << 31), kShape,
             op << ": B*H of 'q' " << q.shape().str() << " must be below 2^31 (one grid row per head)");
  LOOM_CHECK(seq <= int64_t{64} * 65535, kShape,
             op << ": sequence length T of 'q' " << q.shape().str() << " must be at most " << 64 * 65535);
  return AttentionShape{static_cast<int>(batch), static_cast<int>(seq), static_cast<int>(heads), static_cast<int>(dim)};
}

const attention::bf16_t* bf16_in(const Tensor& t, const char* op, const char* arg) {
  return static_cast<const attention::bf16_t*>(device_ptr(t, op, arg));
}
attention::bf16_t* bf16_out(const Tensor& t, const char* op, const char* arg) {
  return static_cast<attention::bf16_t*>(device_mut_ptr(t, op, arg));
}

}  // namespace

void CudaBackend::attention_forward(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k,
                                    const Tensor& v, float scale) {
  constexpr const char* kOp = "attention_forward";
  const AttentionShape sh = check_attention(kOp, q, {{&k, "k"}, {&v, "v"}, {&out, "out"}}, lse);
  if (q.numel() == 0) return;
  attention::ForwardParams p{};
  p.q = bf16_in(q, kOp, "q");
  p.k = bf16_in(k, kOp, "k");
  p.v = bf16_in(v, kOp, "v");
  p.out = bf16_out(out, kOp, "out");
  p.lse = static_cast<float*>(device_mut_ptr(lse, kOp, "lse"));
  p.batch = sh.batch;
  p.seq = sh.seq;
  p.heads = sh.heads;
  p.dim = sh.dim;
  p.scale = scale;
  attention::launch_forward(p, attention::Path::kAuto, stream_);
}

void CudaBackend::attention_backward(const Tensor& dq, const Tensor& dk, const Tensor& dv, bool accumulate,
                                     const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& out, const Tensor& lse, float scale) {
  constexpr const char* kOp = "attention_backward";
  const AttentionShape sh = check_attention(
      kOp, q, {{&k, "k"}, {&v, "v"}, {&out, "out"}, {&dout, "dout"}, {&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}}, lse);
  if (q.numel() == 0) return;
  attention::BackwardParams p{};
  p.dq = bf16_out(dq, kOp, "dq");
  p.dk = bf16_out(dk, kOp, "dk");
  p.dv = bf16_out(dv, kOp, "dv");
  p.dout = bf16_in(dout, kOp, "dout");
  p.q = bf16_in(q, kOp, "q");
  p.k = bf16_in(k, kOp, "k");
  p.v = bf16_in(v, kOp, "v");
  p.out = bf16_in(out, kOp, "out");
  p.lse = static_cast<const float*>(device_ptr(lse, kOp, "lse"));
  p.accumulate = accumulate;
  p.batch = sh.batch;
  p.seq = sh.seq;
  p.heads = sh.heads;
  p.dim = sh.dim;
  p.scale = scale;
  p.delta = static_cast<float*>(scratch(static_cast<size_t>(sh.batch) * sh.heads * sh.seq * sizeof(float)));
  attention::launch_backward(p, attention::Path::kAuto, stream_);
}

}  // namespace loom::cuda
