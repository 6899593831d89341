// Attention benchmark and correctness check of the CUDA backend's causal attention kernels
// (core/cuda/attention_kernels.cuh), standalone: it includes the kernels directly, so it needs neither the rest
// of the CUDA backend nor MPI.
//
// Protocol:
//   - Correctness: random bf16 inputs (q, k ~ N(0, 1.5^2), v, dout ~ N(0, 1); fixed seeds, never zeros), scale
//     1/sqrt(Dh). The reference is a naive f32 GPU implementation (one thread per row, exact softmax in two
//     passes, recomputed probabilities in the backward) on the same bf16 values. Shapes: T = 1, 37, 128, 200,
//     2048; Dh = 32, 64, 128 on the tensor-core path and on the generic path; Dh = 8, 40, 96, 256 (generic
//     only); a misaligned view (falls back to the generic path); accumulate false (outputs pre-filled with NaN,
//     so an element not written shows) and true (pre-filled with random values that must be kept and added to).
//     Also a negative and a zero scale. Error = max |x - ref| / max(max |ref|, 1e-2) per tensor (the floor
//     matters only where the exact result vanishes, e.g. dq = dk = 0 at T = 1; lse: max absolute difference); a
//     case passes when every error is below its tolerance (2e-2 for bf16 tensors, 1e-3 for lse).
//   - Forward configurations (kForwardVariants: keys per tile, blocks per SM) are each checked on five shapes
//     (including a negative scale) and timed at the timing shapes of their head size; "auto" is the default.
//   - Determinism: the backward at the first timing shape runs twice; dq, dk, dv must be bitwise identical.
//   - Timing: CUDA events around each call on one stream, 3 warm-up calls, then 20 timed calls; the figure is the
//     median. Forward = attention_forward's kernel; backward = the delta pre-pass plus the dk/dv and dq kernels.
//     FLOPs (causal, the useful half): forward 4*B*H*T^2*Dh/2, backward 2.5x forward.
//   - Output: a table on stdout; with --json PATH, the results as JSON (bench/results/attention_h100.json).
//
//   attention_bench [--json PATH] [--quick]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/cuda/attention_kernels.cuh"
#include "core/cuda/cuda_check.h"

namespace {

using loom::cuda::attention::BackwardParams;
using loom::cuda::attention::bf16_t;
using loom::cuda::attention::ForwardParams;
using loom::cuda::attention::Path;

// ---- device memory -----------------------------------------------------------------------------------------

template <class T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) {
    LOOM_CUDA_CHECK(cudaMalloc(&ptr_, std::max<size_t>(n, 1) * sizeof(T) + 64));
  }
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return ptr_; }
  size_t size() const { return n_; }

 private:
  T* ptr_ = nullptr;
  size_t n_;
};

uint16_t to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float from_bf16_bits(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

std::vector<uint16_t> random_bf16(size_t n, float sigma, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<uint16_t> v(n);
  for (auto& x : v) {
    float f = dist(gen);
    if (f == 0.0f) f = 1e-3f;
    x = to_bf16_bits(f);
  }
  return v;
}

void upload(void* dst, const std::vector<uint16_t>& src) {
  LOOM_CUDA_CHECK(cudaMemcpy(dst, src.data(), src.size() * 2, cudaMemcpyHostToDevice));
}
std::vector<float> download_bf16(const bf16_t* src, size_t n) {
  std::vector<uint16_t> h(n);
  LOOM_CUDA_CHECK(cudaMemcpy(h.data(), src, n * 2, cudaMemcpyDeviceToHost));
  std::vector<float> f(n);
  for (size_t i = 0; i < n; ++i) f[i] = from_bf16_bits(h[i]);
  return f;
}
std::vector<float> download_f32(const float* src, size_t n) {
  std::vector<float> f(n);
  LOOM_CUDA_CHECK(cudaMemcpy(f.data(), src, n * 4, cudaMemcpyDeviceToHost));
  return f;
}

// ---- naive f32 reference (one thread per row) --------------------------------------------------------------

constexpr int kRefMaxDim = 256;

struct RefShape {
  int batch, seq, heads, dim;
  float scale;
};

__device__ float ref_dot(const bf16_t* a, const bf16_t* b, int dim) {
  float s = 0.0f;
  for (int d = 0; d < dim; ++d) s += __bfloat162float(a[d]) * __bfloat162float(b[d]);
  return s;
}

// Row index i = (b*H + h)*T + t.
__device__ bool ref_row(const RefShape& s, int64_t& base, int64_t& stat, int& t) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(s.batch) * s.heads * s.seq) return false;
  const int64_t bh = i / s.seq;
  t = static_cast<int>(i % s.seq);
  base = ((bh / s.heads) * s.seq * s.heads + bh % s.heads) * s.dim;
  stat = bh * s.seq;
  return true;
}

__global__ void ref_forward(RefShape s, const bf16_t* q, const bf16_t* k, const bf16_t* v, float* out, float* lse) {
  int64_t base, stat;
  int t;
  if (!ref_row(s, base, stat, t)) return;
  const int64_t stride = static_cast<int64_t>(s.heads) * s.dim;
  float mx = -INFINITY;
  for (int u = 0; u <= t; ++u) mx = fmaxf(mx, s.scale * ref_dot(q + base + t * stride, k + base + u * stride, s.dim));
  float acc[kRefMaxDim];
  for (int d = 0; d < s.dim; ++d) acc[d] = 0.0f;
  double sum = 0.0;
  for (int u = 0; u <= t; ++u) {
    const float p = expf(s.scale * ref_dot(q + base + t * stride, k + base + u * stride, s.dim) - mx);
    sum += p;
    for (int d = 0; d < s.dim; ++d) acc[d] += p * __bfloat162float(v[base + u * stride + d]);
  }
  for (int d = 0; d < s.dim; ++d) out[base + t * stride + d] = acc[d] / static_cast<float>(sum);
  lse[stat + t] = mx + static_cast<float>(log(sum));
}

__global__ void ref_delta(RefShape s, const bf16_t* dout, const float* out, float* delta) {
  int64_t base, stat;
  int t;
  if (!ref_row(s, base, stat, t)) return;
  const int64_t off = base + t * static_cast<int64_t>(s.heads) * s.dim;
  float sum = 0.0f;
  for (int d = 0; d < s.dim; ++d) sum += __bfloat162float(dout[off + d]) * out[off + d];
  delta[stat + t] = sum;
}

__global__ void ref_backward_dq(RefShape s, const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout,
                                const float* lse, const float* delta, float* dq) {
  int64_t base, stat;
  int t;
  if (!ref_row(s, base, stat, t)) return;
  const int64_t stride = static_cast<int64_t>(s.heads) * s.dim;
  float acc[kRefMaxDim];
  for (int d = 0; d < s.dim; ++d) acc[d] = 0.0f;
  for (int u = 0; u <= t; ++u) {
    const float p = expf(s.scale * ref_dot(q + base + t * stride, k + base + u * stride, s.dim) - lse[stat + t]);
    const float dp = ref_dot(dout + base + t * stride, v + base + u * stride, s.dim);
    const float ds = p * (dp - delta[stat + t]);
    for (int d = 0; d < s.dim; ++d) acc[d] += ds * __bfloat162float(k[base + u * stride + d]);
  }
  for (int d = 0; d < s.dim; ++d) dq[base + t * stride + d] = s.scale * acc[d];
}

__global__ void ref_backward_dkdv(RefShape s, const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout,
                                  const float* lse, const float* delta, float* dk, float* dv) {
  int64_t base, stat;
  int u;
  if (!ref_row(s, base, stat, u)) return;
  const int64_t stride = static_cast<int64_t>(s.heads) * s.dim;
  float ak[kRefMaxDim], av[kRefMaxDim];
  for (int d = 0; d < s.dim; ++d) ak[d] = av[d] = 0.0f;
  for (int t = u; t < s.seq; ++t) {
    const float p = expf(s.scale * ref_dot(q + base + t * stride, k + base + u * stride, s.dim) - lse[stat + t]);
    const float dp = ref_dot(dout + base + t * stride, v + base + u * stride, s.dim);
    const float ds = p * (dp - delta[stat + t]);
    for (int d = 0; d < s.dim; ++d) {
      av[d] += p * __bfloat162float(dout[base + t * stride + d]);
      ak[d] += ds * __bfloat162float(q[base + t * stride + d]);
    }
  }
  for (int d = 0; d < s.dim; ++d) {
    dk[base + u * stride + d] = s.scale * ak[d];
    dv[base + u * stride + d] = av[d];
  }
}

// ---- comparisons -------------------------------------------------------------------------------------------

// Below this, max |ref| no longer normalises the error: where the exact result vanishes (T = 1: dq = dk = 0)
// only rounding noise is left. Gradients and outputs here are of order 1.
constexpr double kRefFloor = 1e-2;

struct ErrorStat {
  double rel = 0;  // max |x - ref| / max(max |ref|, kRefFloor)
  double abs = 0;  // max |x - ref|
  size_t worst = 0;
};

// x is compared with ref + base (base may be empty: zero).
ErrorStat compare(const std::vector<float>& x, const std::vector<float>& ref, const std::vector<float>& base = {}) {
  ErrorStat e;
  double ref_max = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = ref[i] + (base.empty() ? 0.0 : base[i]);
    ref_max = std::max(ref_max, std::fabs(want));
    const double diff = std::fabs(x[i] - want);
    if (!(diff <= e.abs)) {  // NaN counts as the worst
      e.abs = std::isnan(diff) ? INFINITY : diff;
      e.worst = i;
    }
  }
  e.rel = e.abs / std::max(ref_max, kRefFloor);
  return e;
}

// Forward kernel configurations (Dh, keys per tile, blocks per SM) compared by this benchmark; launch_forward uses
// the one core/cuda/attention_kernels.cuh names in kForwardBlockN / kForwardMinBlocks. Each is also checked for
// correctness. (The recorded results also hold narrow_mb3, the earlier 64-row forward kernel, since removed.)
struct ForwardVariant {
  const char* name;
  int dim;
  void (*launch)(const ForwardParams&, cudaStream_t);
};
const ForwardVariant kForwardVariants[] = {
    {"wide_n64_mb2", 128, &loom::cuda::attention::launch_forward_fast<128, 64, 2>},
    {"wide_n32_mb2", 128, &loom::cuda::attention::launch_forward_fast<128, 32, 2>},
    {"wide_n64_mb2", 64, &loom::cuda::attention::launch_forward_fast<64, 64, 2>},
    {"wide_n32_mb2", 64, &loom::cuda::attention::launch_forward_fast<64, 32, 2>},
    {"wide_n32_mb3", 64, &loom::cuda::attention::launch_forward_fast<64, 32, 3>},
    {"wide_n64_mb2", 32, &loom::cuda::attention::launch_forward_fast<32, 64, 2>},
    {"wide_n64_mb3", 32, &loom::cuda::attention::launch_forward_fast<32, 64, 3>},
};

struct Case {
  int batch, seq, heads, dim;
  Path path;
  bool accumulate;
  bool misaligned = false;                  // tensors start 2 bytes past a 16-byte boundary
  float scale_mul = 1.0f;                   // scale = scale_mul / sqrt(Dh)
  const ForwardVariant* forward = nullptr;  // a forward configuration instead of launch_forward's
};

std::string path_name(const Case& c) {
  std::string name = c.path == Path::kGeneric ? "generic" : "auto";
  if (c.misaligned) name += "(misaligned)";
  if (c.scale_mul != 1.0f) name += "(scale*" + std::to_string(static_cast<int>(c.scale_mul)) + ")";
  if (c.forward) name = std::string("fwd:") + c.forward->name + (c.scale_mul != 1.0f ? "(scale*-1)" : "");
  return name;
}

struct CaseResult {
  Case c;
  ErrorStat out, lse, dq, dk, dv;
  bool pass;
};

constexpr double kTolBf16 = 2e-2, kTolLse = 1e-3;

CaseResult run_case(const Case& c, uint32_t seed) {
  const size_t n = static_cast<size_t>(c.batch) * c.seq * c.heads * c.dim;
  const size_t nstat = static_cast<size_t>(c.batch) * c.heads * c.seq;
  const size_t off = c.misaligned ? 1 : 0;
  const auto hq = random_bf16(n, 1.5f, seed), hk = random_bf16(n, 1.5f, seed + 1), hv = random_bf16(n, 1.0f, seed + 2),
             hdo = random_bf16(n, 1.0f, seed + 3);
  DeviceArray<bf16_t> q(n + off), k(n + off), v(n + off), out(n + off), dout(n + off), dq(n + off), dk(n + off),
      dv(n + off);
  DeviceArray<float> lse(nstat), delta(nstat), ref_out(n), ref_lse(nstat), ref_delta_buf(nstat), ref_dq(n), ref_dk(n),
      ref_dv(n);
  bf16_t *pq = q.get() + off, *pk = k.get() + off, *pv = v.get() + off, *pout = out.get() + off,
         *pdo = dout.get() + off, *pdq = dq.get() + off, *pdk = dk.get() + off, *pdv = dv.get() + off;
  upload(pq, hq);
  upload(pk, hk);
  upload(pv, hv);
  upload(pdo, hdo);
  // Outputs start as NaN (0xffff) so that an element a kernel fails to write shows up.
  LOOM_CUDA_CHECK(cudaMemset(pout, 0xff, n * 2));
  LOOM_CUDA_CHECK(cudaMemset(lse.get(), 0xff, nstat * 4));
  std::vector<float> init_dq, init_dk, init_dv;
  if (c.accumulate) {
    const auto a = random_bf16(n, 0.5f, seed + 4), b = random_bf16(n, 0.5f, seed + 5),
               d = random_bf16(n, 0.5f, seed + 6);
    upload(pdq, a);
    upload(pdk, b);
    upload(pdv, d);
    init_dq = download_bf16(pdq, n);
    init_dk = download_bf16(pdk, n);
    init_dv = download_bf16(pdv, n);
  } else {
    LOOM_CUDA_CHECK(cudaMemset(pdq, 0xff, n * 2));
    LOOM_CUDA_CHECK(cudaMemset(pdk, 0xff, n * 2));
    LOOM_CUDA_CHECK(cudaMemset(pdv, 0xff, n * 2));
  }
  const float scale = c.scale_mul / std::sqrt(static_cast<float>(c.dim));

  ForwardParams fp{pq, pk, pv, pout, lse.get(), c.batch, c.seq, c.heads, c.dim, scale};
  if (c.forward) {
    c.forward->launch(fp, nullptr);
  } else {
    loom::cuda::attention::launch_forward(fp, c.path, nullptr);
  }
  BackwardParams bp{pdq,       pdk,         pdv,          pdo,     pq,    pk,      pv,    pout,
                    lse.get(), delta.get(), c.accumulate, c.batch, c.seq, c.heads, c.dim, scale};
  loom::cuda::attention::launch_backward(bp, c.path, nullptr);

  const RefShape rs{c.batch, c.seq, c.heads, c.dim, scale};
  const unsigned blocks = static_cast<unsigned>((nstat + 127) / 128);
  ref_forward<<<blocks, 128>>>(rs, pq, pk, pv, ref_out.get(), ref_lse.get());
  ref_delta<<<blocks, 128>>>(rs, pdo, ref_out.get(), ref_delta_buf.get());
  ref_backward_dq<<<blocks, 128>>>(rs, pq, pk, pv, pdo, ref_lse.get(), ref_delta_buf.get(), ref_dq.get());
  ref_backward_dkdv<<<blocks, 128>>>(rs, pq, pk, pv, pdo, ref_lse.get(), ref_delta_buf.get(), ref_dk.get(),
                                     ref_dv.get());
  LOOM_CUDA_CHECK_LAUNCH("reference");
  LOOM_CUDA_CHECK(cudaDeviceSynchronize());

  CaseResult r{c, {}, {}, {}, {}, {}, true};
  r.out = compare(download_bf16(pout, n), download_f32(ref_out.get(), n));
  r.lse = compare(download_f32(lse.get(), nstat), download_f32(ref_lse.get(), nstat));
  r.dq = compare(download_bf16(pdq, n), download_f32(ref_dq.get(), n), init_dq);
  r.dk = compare(download_bf16(pdk, n), download_f32(ref_dk.get(), n), init_dk);
  r.dv = compare(download_bf16(pdv, n), download_f32(ref_dv.get(), n), init_dv);
  r.pass = r.out.rel <= kTolBf16 && r.lse.abs <= kTolLse && r.dq.rel <= kTolBf16 && r.dk.rel <= kTolBf16 &&
           r.dv.rel <= kTolBf16;
  return r;
}

// ---- timing ------------------------------------------------------------------------------------------------

template <class F>
double median_ms(F&& f, int warmup, int repeat) {
  cudaEvent_t start, stop;
  LOOM_CUDA_CHECK(cudaEventCreate(&start));
  LOOM_CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < warmup; ++i) f();
  std::vector<float> ms;
  for (int i = 0; i < repeat; ++i) {
    LOOM_CUDA_CHECK(cudaEventRecord(start));
    f();
    LOOM_CUDA_CHECK(cudaEventRecord(stop));
    LOOM_CUDA_CHECK(cudaEventSynchronize(stop));
    float t = 0;
    LOOM_CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct TimingResult {
  int batch, seq, heads, dim;
  std::string variant;
  double fwd_ms, bwd_ms, fwd_tflops, bwd_tflops;
  bool deterministic;
  bool determinism_checked = false;
};

constexpr int kWarmup = 3, kRepeat = 20;

TimingResult time_shape(int batch, int seq, int heads, int dim, bool check_determinism) {
  const size_t n = static_cast<size_t>(batch) * seq * heads * dim;
  const size_t nstat = static_cast<size_t>(batch) * heads * seq;
  DeviceArray<bf16_t> q(n), k(n), v(n), out(n), dout(n), dq(n), dk(n), dv(n);
  DeviceArray<float> lse(nstat), delta(nstat);
  upload(q.get(), random_bf16(n, 1.5f, 11));
  upload(k.get(), random_bf16(n, 1.5f, 12));
  upload(v.get(), random_bf16(n, 1.0f, 13));
  upload(dout.get(), random_bf16(n, 1.0f, 14));
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  ForwardParams fp{q.get(), k.get(), v.get(), out.get(), lse.get(), batch, seq, heads, dim, scale};
  BackwardParams bp{dq.get(),  dk.get(),    dv.get(), dout.get(), q.get(), k.get(), v.get(), out.get(),
                    lse.get(), delta.get(), false,    batch,      seq,     heads,   dim,     scale};
  const double fwd_flop = 4.0 * batch * heads * static_cast<double>(seq) * seq * dim / 2;
  TimingResult r{batch, seq, heads, dim, "auto", 0, 0, 0, 0, true};
  r.fwd_ms = median_ms([&] { loom::cuda::attention::launch_forward(fp, Path::kAuto, nullptr); }, kWarmup, kRepeat);
  r.bwd_ms = median_ms([&] { loom::cuda::attention::launch_backward(bp, Path::kAuto, nullptr); }, kWarmup, kRepeat);
  r.fwd_tflops = fwd_flop / (r.fwd_ms * 1e-3) / 1e12;
  r.bwd_tflops = 2.5 * fwd_flop / (r.bwd_ms * 1e-3) / 1e12;
  if (check_determinism) {
    r.determinism_checked = true;
    loom::cuda::attention::launch_backward(bp, Path::kAuto, nullptr);
    const auto a_dq = download_bf16(dq.get(), n), a_dk = download_bf16(dk.get(), n), a_dv = download_bf16(dv.get(), n);
    LOOM_CUDA_CHECK(cudaMemset(dq.get(), 0, n * 2));
    LOOM_CUDA_CHECK(cudaMemset(dk.get(), 0, n * 2));
    LOOM_CUDA_CHECK(cudaMemset(dv.get(), 0, n * 2));
    loom::cuda::attention::launch_backward(bp, Path::kAuto, nullptr);
    const auto b_dq = download_bf16(dq.get(), n), b_dk = download_bf16(dk.get(), n), b_dv = download_bf16(dv.get(), n);
    r.deterministic = std::memcmp(a_dq.data(), b_dq.data(), n * 4) == 0 &&
                      std::memcmp(a_dk.data(), b_dk.data(), n * 4) == 0 &&
                      std::memcmp(a_dv.data(), b_dv.data(), n * 4) == 0;
  }
  return r;
}

// Forward timings of every configuration in kForwardVariants for this head size (appended as variant rows).
void time_forward_variants(int batch, int seq, int heads, int dim, std::vector<TimingResult>& rows) {
  const size_t n = static_cast<size_t>(batch) * seq * heads * dim;
  const size_t nstat = static_cast<size_t>(batch) * heads * seq;
  DeviceArray<bf16_t> q(n), k(n), v(n), out(n);
  DeviceArray<float> lse(nstat);
  upload(q.get(), random_bf16(n, 1.5f, 11));
  upload(k.get(), random_bf16(n, 1.5f, 12));
  upload(v.get(), random_bf16(n, 1.0f, 13));
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  ForwardParams fp{q.get(), k.get(), v.get(), out.get(), lse.get(), batch, seq, heads, dim, scale};
  const double fwd_flop = 4.0 * batch * heads * static_cast<double>(seq) * seq * dim / 2;
  for (const ForwardVariant& fv : kForwardVariants) {
    if (fv.dim != dim) continue;
    const double ms = median_ms([&] { fv.launch(fp, nullptr); }, kWarmup, kRepeat);
    rows.push_back(TimingResult{batch, seq, heads, dim, std::string("fwd:") + fv.name, ms, 0,
                                fwd_flop / (ms * 1e-3) / 1e12, 0, true});
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc) {
      json_path = argv[++i];
    } else if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else {
      std::fprintf(stderr, "usage: %s [--json PATH] [--quick]\n", argv[0]);
      return 2;
    }
  }
  try {
    cudaDeviceProp prop{};
    LOOM_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("device: %s, %d SMs\n\n", prop.name, prop.multiProcessorCount);

    std::vector<Case> cases;
    for (int dim : {32, 64, 128}) {
      for (Path path : {Path::kAuto, Path::kGeneric}) {
        cases.push_back({1, 1, 1, dim, path, false});
        cases.push_back({2, 37, 3, dim, path, false});
        cases.push_back({1, 128, 2, dim, path, true});
        cases.push_back({2, 200, 2, dim, path, false});
        cases.push_back({1, 2048, 2, dim, path, path == Path::kAuto});
      }
    }
    for (int dim : {8, 40, 96, 256}) {
      cases.push_back({2, 37, 3, dim, Path::kAuto, false});
      cases.push_back({1, 300, 2, dim, Path::kAuto, true});
    }
    cases.push_back({2, 150, 2, 64, Path::kAuto, false, true});
    cases.push_back({1, 150, 2, 128, Path::kAuto, true, true});
    cases.push_back({2, 150, 2, 64, Path::kAuto, false, false, -1.0f});  // negative scale
    cases.push_back({2, 150, 2, 128, Path::kAuto, false, false, 0.0f});  // zero scale: uniform weights
    cases.push_back({2, 150, 2, 64, Path::kGeneric, false, false, -1.0f});
    for (const ForwardVariant& fv : kForwardVariants) {
      cases.push_back({1, 1, 1, fv.dim, Path::kAuto, false, false, 1.0f, &fv});
      cases.push_back({2, 37, 3, fv.dim, Path::kAuto, false, false, 1.0f, &fv});
      cases.push_back({2, 200, 2, fv.dim, Path::kAuto, true, false, 1.0f, &fv});
      cases.push_back({1, 2048, 2, fv.dim, Path::kAuto, false, false, 1.0f, &fv});
      cases.push_back({2, 150, 2, fv.dim, Path::kAuto, false, false, -1.0f, &fv});
    }

    std::printf("%-6s %-5s %-3s %-4s %-26s %-4s | %-9s %-9s %-9s %-9s %-9s | %s\n", "B", "T", "H", "Dh", "path", "acc",
                "out", "lse(abs)", "dq", "dk", "dv", "ok");
    std::vector<CaseResult> results;
    bool all_pass = true;
    uint32_t seed = 1000;
    for (const Case& c : cases) {
      const CaseResult r = run_case(c, seed += 10);
      results.push_back(r);
      all_pass = all_pass && r.pass;
      std::printf("%-6d %-5d %-3d %-4d %-26s %-4s | %-9.2e %-9.2e %-9.2e %-9.2e %-9.2e | %s\n", c.batch, c.seq, c.heads,
                  c.dim, path_name(c).c_str(), c.accumulate ? "yes" : "no", r.out.rel, r.lse.abs, r.dq.rel, r.dk.rel,
                  r.dv.rel, r.pass ? "ok" : "FAIL");
    }

    std::vector<TimingResult> timings;
    struct Shape {
      int batch, seq, heads, dim;
    };
    std::vector<Shape> shapes = {
        {8, 2048, 16, 128}, {8, 2048, 8, 128}, {4, 4096, 16, 128}, {8, 2048, 32, 64}, {8, 1024, 16, 32}};
    if (quick) shapes.resize(1);
    std::printf("\n%-4s %-5s %-3s %-4s %-15s | %-9s %-9s | %-9s %-9s | %s\n", "B", "T", "H", "Dh", "variant", "fwd ms",
                "fwd TF/s", "bwd ms", "bwd TF/s", "deterministic");
    for (size_t i = 0; i < shapes.size(); ++i) {
      const Shape& s = shapes[i];
      timings.push_back(time_shape(s.batch, s.seq, s.heads, s.dim, i == 0));
      if (!quick && (i == 0 || i == 2 || i == 3 || i == 4))
        time_forward_variants(s.batch, s.seq, s.heads, s.dim, timings);
    }
    for (const TimingResult& t : timings) {
      std::printf("%-4d %-5d %-3d %-4d %-17s | %-9.3f %-9.1f | %-9.3f %-9.1f | %s\n", t.batch, t.seq, t.heads, t.dim,
                  t.variant.c_str(), t.fwd_ms, t.fwd_tflops, t.bwd_ms, t.bwd_tflops,
                  t.determinism_checked ? (t.deterministic ? "yes" : "NO") : "-");
      all_pass = all_pass && t.deterministic;
    }

    if (!json_path.empty()) {
      FILE* f = std::fopen(json_path.c_str(), "w");
      if (!f) {
        std::fprintf(stderr, "cannot write %s\n", json_path.c_str());
        return 1;
      }
      std::fprintf(f, "{\n  \"benchmark\": \"attention_bench\",\n  \"device\": \"%s\",\n  \"sms\": %d,\n", prop.name,
                   prop.multiProcessorCount);
      std::fprintf(f, "  \"warmup\": %d,\n  \"repeat\": %d,\n  \"statistic\": \"median\",\n", kWarmup, kRepeat);
      std::fprintf(f, "  \"flops\": \"forward 4*B*H*T^2*Dh/2, backward 2.5x forward\",\n  \"correctness\": [\n");
      for (size_t i = 0; i < results.size(); ++i) {
        const CaseResult& r = results[i];
        std::fprintf(f,
                     "    {\"B\": %d, \"T\": %d, \"H\": %d, \"Dh\": %d, \"path\": \"%s\", \"accumulate\": %s, "
                     "\"scale\": %.4f, \"err_out\": %.3e, \"err_lse_abs\": %.3e, \"err_dq\": %.3e, \"err_dk\": %.3e, "
                     "\"err_dv\": %.3e, \"abs_out\": %.3e, \"abs_dq\": %.3e, \"abs_dk\": %.3e, \"abs_dv\": %.3e, "
                     "\"pass\": %s}%s\n",
                     r.c.batch, r.c.seq, r.c.heads, r.c.dim, path_name(r.c).c_str(), r.c.accumulate ? "true" : "false",
                     r.c.scale_mul / std::sqrt(static_cast<float>(r.c.dim)), r.out.rel, r.lse.abs, r.dq.rel, r.dk.rel,
                     r.dv.rel, r.out.abs, r.dq.abs, r.dk.abs, r.dv.abs, r.pass ? "true" : "false",
                     i + 1 < results.size() ? "," : "");
      }
      std::fprintf(f, "  ],\n  \"timing\": [\n");
      for (size_t i = 0; i < timings.size(); ++i) {
        const TimingResult& t = timings[i];
        std::fprintf(f,
                     "    {\"B\": %d, \"T\": %d, \"H\": %d, \"Dh\": %d, \"variant\": \"%s\", \"fwd_ms\": %.4f, "
                     "\"fwd_tflops\": %.1f, \"bwd_ms\": %.4f, \"bwd_tflops\": %.1f}%s\n",
                     t.batch, t.seq, t.heads, t.dim, t.variant.c_str(), t.fwd_ms, t.fwd_tflops, t.bwd_ms, t.bwd_tflops,
                     i + 1 < timings.size() ? "," : "");
      }
      std::fprintf(f, "  ],\n  \"all_pass\": %s\n}\n", all_pass ? "true" : "false");
      std::fclose(f);
    }
    std::printf("\n%s\n", all_pass ? "ALL PASS" : "SOME CHECKS FAILED");
    return all_pass ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "attention_bench: %s\n", e.what());
    return 1;
  }
}
