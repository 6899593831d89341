// Time split of one training step of the reference model on one GPU, per op class: the issue-4 question "where
// does the step go, and how far is each part from its limit". Nsight Systems is not on the GPU machine, so the
// split is measured from inside: a Backend that forwards every call to the CUDA backend and records a CUDA event
// pair around it on the backend's stream (the stream is serial, so an event pair brackets exactly that op's
// kernels). The step is the one gpt-train runs (loom/trainer.cc, TP=1, DP=1): zero the gradients, upload a batch,
// forward and backward through the tape, AdamW with global-norm clipping, read the loss.
//
// Protocol:
//   - model: gpt::Gpt at the ref-0.95b preset (dim 2048, 16 layers, 16 heads, SwiGLU 5632, vocab 32000, seq 2048,
//     micro-batch 8) unless flags say otherwise; random tokens (never zeros), a new batch per step;
//   - --warmup steps untimed (cuBLASLt plans, arena and scratch growth), then --repeat plain steps timed on the
//     host between two synchronizations (as gpt-train's step_time_s), then --repeat instrumented steps;
//   - reported per class: the median over the instrumented steps of the summed event times (ms per step), the op
//     count, and the class's share of the plain step; the plain step's median; "unattributed" = plain step minus
//     the sum over classes (launch gaps, host work between kernels, the event overhead itself);
//   - a floor per class from the two ceilings measured on this machine class (METHOD.md): GEMM FLOPs at the
//     measured bf16 matmul rate (--gemm-tflops, default 798 on an H100 SXM) and the optimizer's bytes at the copy
//     rate (--copy-tbps, default 3.0 TB/s on an H100 SXM, read + written counted).
// Communication is zero at TP=1 (no collective is issued); the class exists for TP runs only.
//
//   op_split [--layers 16] [--dim 2048] [--heads 16] [--ffn 5632] [--vocab 32000] [--seq 2048] [--batch 8]
//            [--warmup 3] [--repeat 10] [--json FILE]
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/arena.h"
#include "core/context.h"
#include "core/cuda/cuda_backend.h"
#include "core/optimizer.h"
#include "core/param_arena.h"
#include "core/tape.h"
#include "examples/gpt/model.h"

namespace {

using namespace loom;

#define OS_CUDA(call)                                                                                                 \
  do {                                                                                                                \
    cudaError_t err_ = (call);                                                                                        \
    if (err_ != cudaSuccess) {                                                                                        \
      std::fprintf(stderr, "op_split: %s failed: %s (%s:%d)\n", #call, cudaGetErrorString(err_), __FILE__, __LINE__); \
      std::exit(1);                                                                                                   \
    }                                                                                                                 \
  } while (0)

enum OpClass { kGemmBlocks, kGemmHead, kAttention, kNorm, kElementwise, kLoss, kOptimizer, kCopyFill, kClasses };
const char* kClassNames[kClasses] = {"gemm (blocks)",
                                     "gemm (lm head)",
                                     "attention",
                                     "rmsnorm",
                                     "elementwise (rope, swiglu, add, embedding)",
                                     "cross-entropy",
                                     "optimizer (norm + adamw)",
                                     "copy / fill (zero grads, casts, upload)"};
const char* kClassKeys[kClasses] = {"gemm_blocks", "gemm_head",     "attention", "rmsnorm",
                                    "elementwise", "cross_entropy", "optimizer", "copy_fill"};

// Forwards every op to `inner` and, while enabled, brackets it with a pair of events on `stream`.
class TimingBackend final : public Backend {
 public:
  TimingBackend(Backend& inner, cudaStream_t stream, int64_t vocab) : inner_(inner), stream_(stream), vocab_(vocab) {
    events_.resize(2 * kMaxOps);
    for (auto& e : events_) OS_CUDA(cudaEventCreate(&e));
  }
  ~TimingBackend() override {
    for (auto& e : events_) cudaEventDestroy(e);
  }
  void set_enabled(bool on) { enabled_ = on; }
  // Per-class milliseconds and counts of the ops recorded since the last collect(); synchronizes.
  void collect(std::array<double, kClasses>* ms, std::array<int, kClasses>* count) {
    OS_CUDA(cudaStreamSynchronize(stream_));
    ms->fill(0);
    count->fill(0);
    for (size_t i = 0; i < classes_.size(); ++i) {
      float t = 0;
      OS_CUDA(cudaEventElapsedTime(&t, events_[2 * i], events_[2 * i + 1]));
      (*ms)[classes_[i]] += t;
      (*count)[classes_[i]] += 1;
    }
    classes_.clear();
  }

  Device device() const override { return inner_.device(); }
  DType compute_dtype() const override { return inner_.compute_dtype(); }
  std::string name() const override { return inner_.name(); }
  void* allocate(size_t bytes) override { return inner_.allocate(bytes); }
  void deallocate(void* ptr) override { inner_.deallocate(ptr); }
  void synchronize() override { inner_.synchronize(); }
  void copy(const Tensor& dst, const Tensor& src) override {
    timed(kCopyFill, [&] { inner_.copy(dst, src); });
  }
  void fill(const Tensor& dst, float value) override {
    timed(kCopyFill, [&] { inner_.fill(dst, value); });
  }
  void add(const Tensor& out, const Tensor& a, const Tensor& b) override {
    timed(kElementwise, [&] { inner_.add(out, a, b); });
  }
  void axpy(const Tensor& dst, const Tensor& src, float alpha, bool accumulate) override {
    timed(kElementwise, [&] { inner_.axpy(dst, src, alpha, accumulate); });
  }
  void matmul(const Tensor& c, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, float alpha,
              float beta) override {
    const bool head =
        c.shape()[0] == vocab_ || c.shape()[1] == vocab_ || a.shape()[0] == vocab_ || a.shape()[1] == vocab_;
    timed(head ? kGemmHead : kGemmBlocks, [&] { inner_.matmul(c, a, trans_a, b, trans_b, alpha, beta); });
  }
  void embedding_forward(const Tensor& out, const Tensor& table, const Tensor& tokens, int64_t vocab_start) override {
    timed(kElementwise, [&] { inner_.embedding_forward(out, table, tokens, vocab_start); });
  }
  void embedding_backward(const Tensor& dtable, const Tensor& dout, const Tensor& tokens,
                          int64_t vocab_start) override {
    timed(kElementwise, [&] { inner_.embedding_backward(dtable, dout, tokens, vocab_start); });
  }
  void rmsnorm_forward(const Tensor& y, const Tensor& rstd, const Tensor& x, const Tensor& w, float eps) override {
    timed(kNorm, [&] { inner_.rmsnorm_forward(y, rstd, x, w, eps); });
  }
  void rmsnorm_backward(const Tensor& dx, bool accumulate_dx, const Tensor& dw, const Tensor& dy, const Tensor& x,
                        const Tensor& w, const Tensor& rstd) override {
    timed(kNorm, [&] { inner_.rmsnorm_backward(dx, accumulate_dx, dw, dy, x, w, rstd); });
  }
  void rope_forward(const Tensor& out, const Tensor& x, float base) override {
    timed(kElementwise, [&] { inner_.rope_forward(out, x, base); });
  }
  void rope_backward(const Tensor& dx, bool accumulate, const Tensor& dy, float base) override {
    timed(kElementwise, [&] { inner_.rope_backward(dx, accumulate, dy, base); });
  }
  void attention_forward(const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                         float scale) override {
    timed(kAttention, [&] { inner_.attention_forward(out, lse, q, k, v, scale); });
  }
  void attention_backward(const Tensor& dq, const Tensor& dk, const Tensor& dv, bool accumulate, const Tensor& dout,
                          const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                          float scale) override {
    timed(kAttention, [&] { inner_.attention_backward(dq, dk, dv, accumulate, dout, q, k, v, out, lse, scale); });
  }
  void swiglu_forward(const Tensor& out, const Tensor& gate, const Tensor& up) override {
    timed(kElementwise, [&] { inner_.swiglu_forward(out, gate, up); });
  }
  void swiglu_backward(const Tensor& dgate, const Tensor& dup, bool accumulate, const Tensor& dout, const Tensor& gate,
                       const Tensor& up) override {
    timed(kElementwise, [&] { inner_.swiglu_backward(dgate, dup, accumulate, dout, gate, up); });
  }
  void ce_row_max(const Tensor& row_max, const Tensor& logits) override {
    timed(kLoss, [&] { inner_.ce_row_max(row_max, logits); });
  }
  void ce_sumexp_target(const Tensor& sumexp, const Tensor& target_logit, const Tensor& logits, const Tensor& row_max,
                        const Tensor& targets, int64_t vocab_start) override {
    timed(kLoss, [&] { inner_.ce_sumexp_target(sumexp, target_logit, logits, row_max, targets, vocab_start); });
  }
  void ce_loss_mean(const Tensor& loss_mean, const Tensor& row_max, const Tensor& sumexp,
                    const Tensor& target_logit) override {
    timed(kLoss, [&] { inner_.ce_loss_mean(loss_mean, row_max, sumexp, target_logit); });
  }
  void ce_backward(const Tensor& dlogits, bool accumulate, const Tensor& logits, const Tensor& row_max,
                   const Tensor& sumexp, const Tensor& targets, int64_t vocab_start, const Tensor& dloss,
                   float scale) override {
    timed(kLoss, [&] {
      inner_.ce_backward(dlogits, accumulate, logits, row_max, sumexp, targets, vocab_start, dloss, scale);
    });
  }
  void sum_squares(const Tensor& out, const Tensor& x, bool accumulate) override {
    timed(kOptimizer, [&] { inner_.sum_squares(out, x, accumulate); });
  }
  void adamw(const Tensor& master, const Tensor& m, const Tensor& v, const Tensor& grad, const Tensor& compute_out,
             const Tensor& norm_sq, const AdamWArgs& args) override {
    timed(kOptimizer, [&] { inner_.adamw(master, m, v, grad, compute_out, norm_sq, args); });
  }
  std::unique_ptr<HostCopy> copy_to_host_async(void* host_dst, const Tensor& src) override {
    return inner_.copy_to_host_async(host_dst, src);
  }
  void pin_host_memory(void* ptr, size_t bytes) override { inner_.pin_host_memory(ptr, bytes); }
  void unpin_host_memory(void* ptr) override { inner_.unpin_host_memory(ptr); }

 private:
  static constexpr size_t kMaxOps = 16384;
  template <class F>
  void timed(OpClass cls, F&& f) {
    if (!enabled_ || classes_.size() >= kMaxOps) {
      f();
      return;
    }
    const size_t i = classes_.size();
    OS_CUDA(cudaEventRecord(events_[2 * i], stream_));
    f();
    OS_CUDA(cudaEventRecord(events_[2 * i + 1], stream_));
    classes_.push_back(cls);
  }
  Backend& inner_;
  cudaStream_t stream_;
  int64_t vocab_;
  bool enabled_ = false;
  std::vector<cudaEvent_t> events_;
  std::vector<OpClass> classes_;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

}  // namespace

int main(int argc, char** argv) {
  gpt::GptConfig cfg;
  cfg.vocab_size = 32000;
  cfg.dim = 2048;
  cfg.n_layers = 16;
  cfg.n_heads = 16;
  cfg.ffn_hidden = 5632;
  cfg.seq_len = 2048;
  int64_t batch = 8, warmup = 3, repeat = 10;
  double gemm_tflops = 798, copy_tbps = 3.0;
  std::string json;
  const std::pair<const char*, int64_t*> int_flags[] = {
      {"--layers", &cfg.n_layers}, {"--dim", &cfg.dim},          {"--heads", &cfg.n_heads},
      {"--ffn", &cfg.ffn_hidden},  {"--vocab", &cfg.vocab_size}, {"--seq", &cfg.seq_len},
      {"--batch", &batch},         {"--warmup", &warmup},        {"--repeat", &repeat}};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "op_split: %s needs a value (see the header of bench/op_split.cc)\n", a.c_str());
      return 2;
    }
    const std::string value = argv[++i];
    bool known = false;
    for (const auto& [flag, dst] : int_flags)
      if (a == flag) *dst = std::stoll(value), known = true;
    if (a == "--gemm-tflops") gemm_tflops = std::stod(value), known = true;
    if (a == "--copy-tbps") copy_tbps = std::stod(value), known = true;
    if (a == "--json") json = value, known = true;
    if (!known) {
      std::fprintf(stderr, "op_split: unknown argument '%s' (see the header of bench/op_split.cc)\n", a.c_str());
      return 2;
    }
  }
  cfg.validate(1);

  std::unique_ptr<Backend> gpu = make_cuda_backend(0);
  auto& cuda_be = static_cast<cuda::CudaBackend&>(*gpu);
  TimingBackend be(*gpu, cuda_be.stream(), cfg.vocab_size);

  gpt::Gpt model(cfg, TpGroup::none());
  ParameterArena params(be, ParamArenaOptions{DType::kF32, 1, 1234});
  params.finalize(model);
  AdamW opt(params, AdamWConfig{0.9, 0.95, 1e-8, 0.1, 1.0});
  ActivationArena act(be);
  const int64_t T = cfg.seq_len;
  std::mt19937 rng(42);
  std::uniform_int_distribution<int32_t> tok_dist(0, static_cast<int32_t>(cfg.vocab_size - 1));
  std::vector<int32_t> in(static_cast<size_t>(batch * T)), tgt(in.size());

  auto step = [&]() -> float {
    for (auto& x : in) x = tok_dist(rng);
    for (auto& x : tgt) x = tok_dist(rng);
    params.zero_grads();
    act.reset();
    Tensor tok = act.allocate(Shape{batch, T}, DType::kI32), tg = act.allocate(Shape{batch, T}, DType::kI32);
    be.upload(tok, in.data());
    be.upload(tg, tgt.data());
    Tape tape(act, &params);
    Ctx c(be, act, &tape);
    Tensor loss = model.loss(c, tok, tg);
    tape.backward(loss);
    opt.step(3e-4, 1.0, nullptr);
    return be.read_scalar(loss);
  };
  float loss = 0;
  auto timed_step = [&]() -> double {  // seconds between two synchronizations, as gpt-train's step_time_s
    be.synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    loss = step();
    be.synchronize();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };

  std::printf("op_split: %s; model %lld params, batch %lld x %lld tokens\n", be.name().c_str(),
              static_cast<long long>(cfg.num_parameters()), static_cast<long long>(batch), static_cast<long long>(T));
  for (int64_t i = 0; i < warmup; ++i) loss = step();
  std::vector<double> plain;
  for (int64_t i = 0; i < repeat; ++i) plain.push_back(timed_step());
  std::vector<std::vector<double>> per_class(kClasses);
  std::vector<double> instrumented;
  std::array<int, kClasses> counts{};
  be.set_enabled(true);
  for (int64_t i = 0; i < repeat; ++i) {
    instrumented.push_back(timed_step());
    std::array<double, kClasses> ms{};
    be.collect(&ms, &counts);
    for (int k = 0; k < kClasses; ++k) per_class[static_cast<size_t>(k)].push_back(ms[static_cast<size_t>(k)]);
  }
  be.set_enabled(false);
  if (!std::isfinite(loss)) {
    std::fprintf(stderr, "op_split: the loss is %f\n", loss);
    return 1;
  }

  // Floors: every GEMM FLOP at the measured matmul rate; AdamW reads grad, master, m, v (4 x 4 B) and writes
  // master, m, v (4 B each) and the bf16 weights (2 B) per parameter, the norm reads the f32 gradient once more.
  const double N = static_cast<double>(batch * T), D = static_cast<double>(cfg.dim),
               L = static_cast<double>(cfg.n_layers);
  const double F = static_cast<double>(cfg.ffn_hidden), V = static_cast<double>(cfg.vocab_size);
  const double gemm_blocks_flops = 6.0 * N * L * (4 * D * D + 3 * D * F), gemm_head_flops = 6.0 * N * V * D;
  const double attn_flops = 6.0 * L * N * static_cast<double>(T) * D;  // causal, fwd + bwd (2.5x fwd) as in MFU
  const double P = static_cast<double>(params.padded_numel());
  const double opt_bytes = P * (4 * 4 + 3 * 4 + 2) + P * 4;
  std::array<double, kClasses> floor_ms{};
  floor_ms[kGemmBlocks] = gemm_blocks_flops / (gemm_tflops * 1e12) * 1e3;
  floor_ms[kGemmHead] = gemm_head_flops / (gemm_tflops * 1e12) * 1e3;
  floor_ms[kOptimizer] = opt_bytes / (copy_tbps * 1e12) * 1e3;

  const double step_ms = median(plain) * 1e3;
  double sum_ms = 0;
  std::printf("\nplain step: median %.2f ms over %lld steps; instrumented step %.2f ms\n", step_ms,
              static_cast<long long>(repeat), median(instrumented) * 1e3);
  std::printf("| class | ops/step | ms/step | share of step | floor ms (ceiling) |\n|---|---|---|---|---|\n");
  std::string rows;
  for (int k = 0; k < kClasses; ++k) {
    const double ms = median(per_class[static_cast<size_t>(k)]);
    sum_ms += ms;
    char fl[64] = "-";
    if (floor_ms[static_cast<size_t>(k)] > 0) std::snprintf(fl, sizeof fl, "%.2f", floor_ms[static_cast<size_t>(k)]);
    std::printf("| %s | %d | %.2f | %.1f %% | %s |\n", kClassNames[k], counts[static_cast<size_t>(k)], ms,
                100 * ms / step_ms, fl);
    char row[320];
    std::snprintf(row, sizeof row,
                  "%s\n    {\"class\": \"%s\", \"ops_per_step\": %d, \"ms_per_step\": %.3f, \"share_of_step\": %.4f, "
                  "\"floor_ms\": %s}",
                  k ? "," : "", kClassKeys[k], counts[static_cast<size_t>(k)], ms, ms / step_ms,
                  floor_ms[static_cast<size_t>(k)] > 0 ? fl : "null");
    rows += row;
  }
  std::printf("| communication | 0 | 0 | 0 %% (TP=1) | - |\n");
  std::printf("| unattributed (gaps, host) | - | %.2f | %.1f %% | - |\n", step_ms - sum_ms,
              100 * (step_ms - sum_ms) / step_ms);
  const double attn_ms = median(per_class[kAttention]);
  std::printf("\nGEMM %.0f TFLOP/s (blocks), %.0f TFLOP/s (head); attention %.0f TFLOP/s; model %.1f %% MFU of 989\n",
              gemm_blocks_flops / (median(per_class[kGemmBlocks]) * 1e-3) / 1e12,
              gemm_head_flops / (median(per_class[kGemmHead]) * 1e-3) / 1e12, attn_flops / (attn_ms * 1e-3) / 1e12,
              100 * cfg.flops_per_token() * N / (step_ms * 1e-3) / 989e12);
  if (!json.empty()) {
    std::ofstream f(json);
    char head[1024];
    std::snprintf(
        head, sizeof head,
        "{\n  \"benchmark\": \"op_split\",\n  \"backend\": \"%s\",\n  \"model\": \"dim %lld, %lld layers, %lld "
        "heads, ffn %lld, vocab %lld, seq %lld, batch %lld\",\n  \"warmup\": %lld,\n  \"repeat\": %lld,\n"
        "  \"statistic\": \"median\",\n  \"plain_step_ms\": %.3f,\n  \"instrumented_step_ms\": %.3f,\n"
        "  \"sum_of_classes_ms\": %.3f,\n  \"unattributed_ms\": %.3f,\n  \"communication_ms\": 0,\n"
        "  \"gemm_tflops_ceiling\": %.0f,\n  \"copy_tbps_ceiling\": %.2f,\n"
        "  \"gemm_blocks_tflops\": %.1f,\n  \"gemm_head_tflops\": %.1f,\n  \"attention_tflops\": %.1f,\n"
        "  \"classes\": [",
        be.name().c_str(), static_cast<long long>(cfg.dim), static_cast<long long>(cfg.n_layers),
        static_cast<long long>(cfg.n_heads), static_cast<long long>(cfg.ffn_hidden),
        static_cast<long long>(cfg.vocab_size), static_cast<long long>(cfg.seq_len), static_cast<long long>(batch),
        static_cast<long long>(warmup), static_cast<long long>(repeat), step_ms, median(instrumented) * 1e3, sum_ms,
        step_ms - sum_ms, gemm_tflops, copy_tbps, gemm_blocks_flops / (median(per_class[kGemmBlocks]) * 1e-3) / 1e12,
        gemm_head_flops / (median(per_class[kGemmHead]) * 1e-3) / 1e12, attn_flops / (attn_ms * 1e-3) / 1e12);
    f << head << rows << "\n  ]\n}\n";
  }
  return 0;
}
