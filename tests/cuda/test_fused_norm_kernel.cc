// The fused all-reduce + residual add + RMSNorm kernels (parallel/cuda/fused_norm_kernel.h) on "virtual ranks":
// W ranks of one process on one GPU, each with its own stream and its own staging buffer and flag words, which
// the others address directly (the same protocol as CUDA IPC peers on NVLink, without a second GPU). Each rank's
// kernel occupies `blocks` SMs, so all W run at once.
//   - Both algorithms against a host reference for token counts 1..16384 and hidden sizes 1024..16384: the new
//     residual stream exactly (the same f32 additions in the same rank order, one rounding), the normalised rows
//     within one bf16 rounding (norm-wise 1e-2; the sum of squares is added in another order), every rank's
//     outputs bit-identical, and two-shot's outputs and rstd equal to one-shot's bit for bit.
//   - rstd (the RMSNorm backward's input) bit-identical on every rank and within 1e-5 of the f64 reference.
//   - All-reduce alone (the benchmark's variant): both algorithms give the f32 rank-order sum rounded once, bit
//     for bit on every rank; the norm's tensors are refused with it and required without it.
//   - 10^5 calls with random per-rank delays (a spin kernel before some ranks' calls) and inputs (and row
//     counts) that change every call: no error, and every 100th call checked bit for bit against the expected
//     result.
//   - A dead peer (its kernel never launched) makes the survivor fail with a deadline error naming it, within
//     the deadline; the abort word stops a waiting kernel.
//   - The backward (summed gradient, RMSNorm backward, residual-gradient add, weight gradient) against an f64
//     reference for 2..8 ranks, token counts 1..16384 and hidden sizes 1024..32768 (the widest it takes), with
//     and without accumulation: the summed gradient exactly, dx and dw within bf16/f32 rounding, both bit-identical on every
//     rank and between the two algorithms.
//   - CUDA-graph capture: each rank captures forward and backward calls of both algorithms in a graph, replayed
//     200 times between eager calls, with the epochs from the device counters: correct outputs, no error, and
//     every rank's counter at the number of calls.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/rng.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/fused_norm_reference.h"

#ifdef LOOM_HAVE_CUDA
#include <cuda_runtime.h>

#include "parallel/cuda/fused_norm_kernel.h"
#endif

namespace loom {
namespace {

class FusedNormKernel : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string reason = test::cuda_skip_reason();
    if (!reason.empty()) GTEST_SKIP() << reason;
  }
};

#ifdef LOOM_HAVE_CUDA

#define CK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr << ": " << cudaGetErrorString(cudaGetLastError())

using test::random_bf16;
const auto f = test::bf;

// W virtual ranks: staging buffers, flag words (zeroed once, at creation), error words, the abort word, streams.
struct VirtualGroup {
  int ranks;
  int64_t stage_bytes;
  std::vector<void*> stage, flags;
  std::vector<uint32_t*> error;
  uint32_t* abort_host = nullptr;
  uint32_t* abort_dev = nullptr;
  std::vector<cudaStream_t> streams;
  std::vector<uint32_t*> counters;  // device epoch counters (2 words per rank), when asked for
  uint32_t epoch = 0;

  VirtualGroup(int w, int64_t bytes, bool device_epochs = false) : ranks(w), stage_bytes(bytes) {
    for (int r = 0; r < w && device_epochs; ++r) {
      void* c = nullptr;
      cudaMalloc(&c, 2 * sizeof(uint32_t));
      cudaMemset(c, 0, 2 * sizeof(uint32_t));
      counters.push_back(static_cast<uint32_t*>(c));
    }
    for (int r = 0; r < w; ++r) {
      void *s = nullptr, *fl = nullptr, *e = nullptr;
      cudaMalloc(&s, static_cast<size_t>(bytes));
      cudaMalloc(&fl, cuda::kFusedFlagWords * sizeof(uint32_t));
      cudaMemset(fl, 0, cuda::kFusedFlagWords * sizeof(uint32_t));
      cudaMalloc(&e, sizeof(uint32_t));
      cudaMemset(e, 0, sizeof(uint32_t));
      stage.push_back(s);
      flags.push_back(fl);
      error.push_back(static_cast<uint32_t*>(e));
      cudaStream_t st;
      cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
      streams.push_back(st);
    }
    cudaHostAlloc(reinterpret_cast<void**>(&abort_host), sizeof(uint32_t), cudaHostAllocMapped);
    *abort_host = 0;
    cudaHostGetDevicePointer(reinterpret_cast<void**>(&abort_dev), abort_host, 0);
    cudaDeviceSynchronize();
  }
  ~VirtualGroup() {
    cudaDeviceSynchronize();
    for (int r = 0; r < ranks; ++r) {
      cudaFree(stage[static_cast<size_t>(r)]);
      cudaFree(flags[static_cast<size_t>(r)]);
      cudaFree(error[static_cast<size_t>(r)]);
      cudaStreamDestroy(streams[static_cast<size_t>(r)]);
    }
    for (uint32_t* c : counters) cudaFree(c);
    cudaFreeHost(abort_host);
  }
  cuda::FusedNormGroup view(int r) const {
    cuda::FusedNormGroup g;
    g.ranks = ranks;
    g.rank = r;
    for (int p = 0; p < ranks; ++p) {
      g.stage[p] = stage[static_cast<size_t>(p)];
      g.flags[p] = static_cast<uint32_t*>(flags[static_cast<size_t>(p)]);
    }
    g.stage_bytes = stage_bytes;
    g.abort = abort_dev;
    g.error = error[static_cast<size_t>(r)];
    if (!counters.empty()) g.epoch_counter = counters[static_cast<size_t>(r)];
    return g;
  }
  uint32_t counter_of(int r) const {
    uint32_t e = 0;
    cudaMemcpy(&e, counters[static_cast<size_t>(r)], sizeof e, cudaMemcpyDeviceToHost);
    return e;
  }
  uint32_t error_of(int r) const {
    uint32_t e = 0;
    cudaMemcpy(&e, error[static_cast<size_t>(r)], sizeof e, cudaMemcpyDeviceToHost);
    return e;
  }
};

// Device copies of one problem: per-rank partials, the shared residual and weight, per-rank outputs.
struct Problem {
  int64_t rows, d;
  std::vector<std::vector<uint16_t>> partial;
  std::vector<uint16_t> residual, weight;
  std::vector<void*> dev_partial, dev_res_out, dev_normed, dev_rstd;
  void *dev_residual = nullptr, *dev_weight = nullptr;

  Problem(int w, int64_t rows_, int64_t d_, uint64_t seed) : rows(rows_), d(d_) {
    const int64_t n = rows * d;
    for (int r = 0; r < w; ++r) partial.push_back(random_bf16(n, seed, 10 + static_cast<uint64_t>(r), 0.5f));
    residual = random_bf16(n, seed, 1, 1.0f);
    weight = random_bf16(d, seed, 2, 0.2f, 1.0f);
    const size_t bytes = static_cast<size_t>(n) * 2;
    for (int r = 0; r < w; ++r) {
      void *p, *a, *b, *rs;
      cudaMalloc(&p, bytes);
      cudaMalloc(&a, bytes);
      cudaMalloc(&b, bytes);
      cudaMalloc(&rs, static_cast<size_t>(rows) * sizeof(float) + 16);
      dev_rstd.push_back(rs);
      cudaMemcpy(p, partial[static_cast<size_t>(r)].data(), bytes, cudaMemcpyHostToDevice);
      dev_partial.push_back(p);
      dev_res_out.push_back(a);
      dev_normed.push_back(b);
    }
    cudaMalloc(&dev_residual, bytes);
    cudaMalloc(&dev_weight, static_cast<size_t>(d) * 2);
    cudaMemcpy(dev_residual, residual.data(), bytes, cudaMemcpyHostToDevice);
    cudaMemcpy(dev_weight, weight.data(), static_cast<size_t>(d) * 2, cudaMemcpyHostToDevice);
  }
  ~Problem() {
    for (void* p : dev_partial) cudaFree(p);
    for (void* p : dev_res_out) cudaFree(p);
    for (void* p : dev_normed) cudaFree(p);
    for (void* p : dev_rstd) cudaFree(p);
    cudaFree(dev_residual);
    cudaFree(dev_weight);
  }
  cuda::FusedNormArgs args(int r, uint32_t epoch, cuda::FusedAlgo algo, int blocks) const {
    cuda::FusedNormArgs a;
    a.partial = dev_partial[static_cast<size_t>(r)];
    a.residual = dev_residual;
    a.weight = dev_weight;
    a.residual_out = dev_res_out[static_cast<size_t>(r)];
    a.normed = dev_normed[static_cast<size_t>(r)];
    a.rstd = static_cast<float*>(dev_rstd[static_cast<size_t>(r)]);
    a.rows = rows;
    a.d = d;
    a.eps = 1e-5f;
    a.epoch = epoch;
    a.blocks = blocks;
    a.timeout_s = 20.0;
    a.algo = algo;
    return a;
  }
  void reference(std::vector<uint16_t>* res, std::vector<float>* normed, std::vector<double>* rstd = nullptr) const {
    test::fused_norm_reference(partial, residual, weight, rows, d, 1e-5, res, normed, rstd);
  }
  std::vector<uint16_t> download(const std::vector<void*>& v, int r) const {
    std::vector<uint16_t> out(static_cast<size_t>(rows * d));
    cudaMemcpy(out.data(), v[static_cast<size_t>(r)], out.size() * 2, cudaMemcpyDeviceToHost);
    return out;
  }
  std::vector<float> download_rstd(int r) const {
    std::vector<float> out(static_cast<size_t>(rows));
    cudaMemcpy(out.data(), dev_rstd[static_cast<size_t>(r)], out.size() * sizeof(float), cudaMemcpyDeviceToHost);
    return out;
  }
};

void launch_all(const VirtualGroup& g, const Problem& pb, cuda::FusedAlgo algo, int blocks, uint32_t epoch) {
  for (int r = 0; r < g.ranks; ++r)
    cuda::launch_fused_allreduce_add_rmsnorm(g.view(r), pb.args(r, epoch, algo, blocks), g.streams[static_cast<size_t>(r)]);
}

TEST_F(FusedNormKernel, BothAlgorithmsMatchTheReferenceAndAreBitIdenticalOnEveryRank) {
  struct Case {
    int ranks;
    int64_t rows, d;
  };
  const Case cases[] = {{2, 1, 1024}, {2, 3, 8192}, {4, 37, 2048}, {2, 300, 4096}, {8, 1000, 1024},
                        {2, 4096, 8192}, {4, 16384, 2048}, {2, 16384, 8192}, {3, 129, 4096},
                        {2, 64, 8192},   {3, 40, 8192},     // 512-thread blocks, 128 threads per row
                        {2, 100, 4096},  {2, 16, 16384}};   // 512-thread blocks, 64 and 256 threads per row
  for (const Case& c : cases) {
    Problem pb(c.ranks, c.rows, c.d, 7 + static_cast<uint64_t>(c.rows));
    std::vector<uint16_t> want_res;
    std::vector<float> want_norm;
    std::vector<double> want_rstd;
    pb.reference(&want_res, &want_norm, &want_rstd);
    VirtualGroup g(c.ranks, cuda::fused_stage_bytes(c.rows, c.d));
    std::vector<uint16_t> two_res, two_norm;
    std::vector<float> two_rstd;
    for (cuda::FusedAlgo algo : {cuda::FusedAlgo::kTwoShot, cuda::FusedAlgo::kOneShot}) {
      SCOPED_TRACE(std::string(algo == cuda::FusedAlgo::kTwoShot ? "two-shot" : "one-shot") + ", " +
                   std::to_string(c.ranks) + " ranks, " + std::to_string(c.rows) + " x " + std::to_string(c.d));
      ++g.epoch;
      launch_all(g, pb, algo, 16, g.epoch);
      CK(cudaDeviceSynchronize());
      std::vector<uint16_t> res0 = pb.download(pb.dev_res_out, 0), norm0 = pb.download(pb.dev_normed, 0);
      const std::vector<float> rstd0 = pb.download_rstd(0);
      for (int r = 0; r < c.ranks; ++r) {
        ASSERT_EQ(g.error_of(r), 0u) << cuda::fused_error_kind(g.error_of(r));
        EXPECT_TRUE(pb.download(pb.dev_res_out, r) == res0) << "residual differs on rank " << r;
        EXPECT_TRUE(pb.download(pb.dev_normed, r) == norm0) << "normed differs on rank " << r;
        EXPECT_TRUE(pb.download_rstd(r) == rstd0) << "rstd differs on rank " << r;
      }
      double rstd_err = 0;
      for (int64_t row = 0; row < c.rows; ++row)
        rstd_err = std::max(rstd_err, std::abs(rstd0[static_cast<size_t>(row)] / want_rstd[static_cast<size_t>(row)] - 1));
      EXPECT_LE(rstd_err, 1e-5) << "rstd, worst relative error against the f64 reference";
      int64_t res_wrong = 0;
      double num = 0, den = 0;
      for (size_t i = 0; i < want_res.size(); ++i) {
        res_wrong += res0[i] != want_res[i];
        num += std::pow(f(norm0[i]) - want_norm[i], 2.0);
        den += std::pow(want_norm[i], 2.0);
      }
      EXPECT_EQ(res_wrong, 0) << "residual elements different from the reference";
      EXPECT_LE(std::sqrt(num / den), 1e-2) << "normed rows, norm-wise relative error";
      if (algo == cuda::FusedAlgo::kTwoShot) {
        two_res = res0;
        two_norm = norm0;
        two_rstd = rstd0;
      } else {  // two-shot norms the copied-out rows locally with one-shot's arithmetic: the same bits
        EXPECT_TRUE(res0 == two_res) << "one-shot and two-shot residual differ";
        EXPECT_TRUE(norm0 == two_norm) << "one-shot and two-shot normed differ";
        EXPECT_TRUE(rstd0 == two_rstd) << "one-shot and two-shot rstd differ";
      }
    }
  }
}

TEST_F(FusedNormKernel, AllReduceAloneIsTheRankOrderSumOnEveryRank) {
  struct Case {
    int ranks;
    int64_t rows, d;
  };
  const Case cases[] = {{2, 1, 1024}, {3, 129, 4096}, {4, 4096, 2048}, {2, 16384, 8192}};
  for (const Case& c : cases) {
    Problem pb(c.ranks, c.rows, c.d, 11 + static_cast<uint64_t>(c.rows));
    std::vector<uint16_t> want(static_cast<size_t>(c.rows * c.d));
    for (size_t i = 0; i < want.size(); ++i) {
      float acc = f(pb.partial[0][i]);
      for (int r = 1; r < c.ranks; ++r) acc += f(pb.partial[static_cast<size_t>(r)][i]);
      want[i] = f32_to_bf16(acc).bits;
    }
    VirtualGroup g(c.ranks, cuda::fused_stage_bytes(c.rows, c.d));
    for (cuda::FusedAlgo algo : {cuda::FusedAlgo::kTwoShot, cuda::FusedAlgo::kOneShot}) {
      SCOPED_TRACE(std::string(algo == cuda::FusedAlgo::kTwoShot ? "two-shot" : "one-shot") + ", " +
                   std::to_string(c.ranks) + " ranks, " + std::to_string(c.rows) + " x " + std::to_string(c.d));
      ++g.epoch;
      for (int r = 0; r < c.ranks; ++r) {
        CK(cudaMemsetAsync(pb.dev_res_out[static_cast<size_t>(r)], 0xff, want.size() * 2,
                           g.streams[static_cast<size_t>(r)]));  // on the rank's stream: before its kernel
        cuda::FusedNormArgs a = pb.args(r, g.epoch, algo, 16);
        a.allreduce_only = true;
        a.residual = a.weight = nullptr;
        a.normed = nullptr;
        a.rstd = nullptr;
        cuda::launch_fused_allreduce_add_rmsnorm(g.view(r), a, g.streams[static_cast<size_t>(r)]);
      }
      CK(cudaDeviceSynchronize());
      for (int r = 0; r < c.ranks; ++r) {
        ASSERT_EQ(g.error_of(r), 0u) << cuda::fused_error_kind(g.error_of(r));
        const std::vector<uint16_t> got = pb.download(pb.dev_res_out, r);
        int64_t wrong = 0;
        for (size_t i = 0; i < want.size(); ++i) wrong += got[i] != want[i];
        EXPECT_EQ(wrong, 0) << "elements of rank " << r << " different from the rank-order sum";
      }
    }
  }
  // The norm's inputs are refused with all-reduce alone, and required without it.
  Problem pb(2, 4, 1024, 3);
  VirtualGroup g(2, cuda::fused_stage_bytes(4, 1024));
  cuda::FusedNormArgs a = pb.args(0, 1, cuda::FusedAlgo::kOneShot, 4);
  a.allreduce_only = true;
  EXPECT_THROW(cuda::launch_fused_allreduce_add_rmsnorm(g.view(0), a, g.streams[0]), Error);
  a.allreduce_only = false;
  a.weight = nullptr;
  EXPECT_THROW(cuda::launch_fused_allreduce_add_rmsnorm(g.view(0), a, g.streams[0]), Error);
}

TEST_F(FusedNormKernel, HundredThousandCallsWithRandomDelaysStayCorrect) {
  const int w = 2;
  const int64_t d = 1024;
  // Four input sets of different row counts, used in turn, so a rank that read a peer's buffer before the peer
  // refilled it would see the previous call's data, and buffers laid out by the call's shape rather than the
  // staging capacity would overlap between consecutive calls.
  const int64_t set_rows[4] = {16, 7, 13, 10};
  std::vector<std::unique_ptr<Problem>> sets;
  std::vector<std::vector<uint16_t>> want_res(4);
  for (int s = 0; s < 4; ++s) {
    sets.push_back(std::make_unique<Problem>(w, set_rows[s], d, 1000 + static_cast<uint64_t>(s)));
    std::vector<float> unused;
    sets.back()->reference(&want_res[static_cast<size_t>(s)], &unused);
  }
  VirtualGroup g(w, cuda::fused_stage_bytes(16, d));
  const int calls = 100000;
  for (int i = 0; i < calls; ++i) {
    const Problem& pb = *sets[static_cast<size_t>(i % 4)];
    const auto algo = (i / 4) % 2 ? cuda::FusedAlgo::kOneShot : cuda::FusedAlgo::kTwoShot;
    ++g.epoch;
    for (int r = 0; r < w; ++r) {
      const double u = random_uniform(99, static_cast<uint64_t>(r), static_cast<uint64_t>(i));
      if (u < 0.1) cuda::launch_spin(static_cast<uint64_t>(u * 2e5), g.streams[static_cast<size_t>(r)]);
      cuda::FusedNormArgs a = pb.args(r, g.epoch, algo, 4);
      a.timeout_s = 2.0;
      cuda::launch_fused_allreduce_add_rmsnorm(g.view(r), a, g.streams[static_cast<size_t>(r)]);
    }
    // Every 100 calls both error words are still 0 (so the host also runs at most 100 calls ahead) and the last
    // call's residual is the expected one, bit for bit.
    if (i % 100 == 99) {
      CK(cudaDeviceSynchronize());
      ASSERT_EQ(g.error_of(0) | g.error_of(1), 0u)
          << "call " << i << ": rank 0 '" << cuda::fused_error_kind(g.error_of(0)) << "' (peer "
          << (g.error_of(0) & 0xff) << "), rank 1 '" << cuda::fused_error_kind(g.error_of(1)) << "' (peer "
          << (g.error_of(1) & 0xff) << ")";
    }
    if (i % 100 == 99) {
      for (int r = 0; r < w; ++r) {
        ASSERT_EQ(g.error_of(r), 0u) << "call " << i << ": " << cuda::fused_error_kind(g.error_of(r));
        ASSERT_TRUE(pb.download(pb.dev_res_out, r) == want_res[static_cast<size_t>(i % 4)])
            << "call " << i << ", rank " << r << ": wrong residual";
      }
    }
  }
}

TEST_F(FusedNormKernel, ADeadPeerIsAnErrorWithinTheDeadlineAndAbortStopsAWait) {
  const int64_t rows = 64, d = 1024;
  Problem pb(2, rows, d, 5);
  for (auto algo : {cuda::FusedAlgo::kTwoShot, cuda::FusedAlgo::kOneShot}) {
    VirtualGroup g(2, cuda::fused_stage_bytes(rows, d));
    cuda::FusedNormArgs a = pb.args(0, 1, algo, 8);
    a.timeout_s = 0.5;
    const auto t0 = std::chrono::steady_clock::now();
    cuda::launch_fused_allreduce_add_rmsnorm(g.view(0), a, g.streams[0]);  // rank 1 never comes
    CK(cudaStreamSynchronize(g.streams[0]));
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const uint32_t e = g.error_of(0);
    EXPECT_EQ(e >> 8, cuda::kFusedDeadline) << cuda::fused_error_kind(e);
    EXPECT_EQ(e & 0xff, 1u) << "the error names the missing peer";
    EXPECT_GE(s, 0.45);
    EXPECT_LT(s, 3.0) << "the survivor must give up soon after the 0.5 s deadline";
  }
  VirtualGroup g(2, cuda::fused_stage_bytes(rows, d));
  cuda::FusedNormArgs a = pb.args(0, 1, cuda::FusedAlgo::kTwoShot, 8);
  a.timeout_s = 60.0;
  const auto t0 = std::chrono::steady_clock::now();
  cuda::launch_fused_allreduce_add_rmsnorm(g.view(0), a, g.streams[0]);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  *reinterpret_cast<volatile uint32_t*>(g.abort_host) = 1;
  CK(cudaStreamSynchronize(g.streams[0]));
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(g.error_of(0) >> 8, cuda::kFusedAborted);
  EXPECT_LT(s, 5.0);
}

// One backward problem: per-rank partial gradients of the normalised rows, the forward's residual rows x (the
// same on every rank), weight, rstd (from x, as the forward gives it), the old dx (the residual stream's
// gradient, accumulated into); per-rank device outputs dx, dw (f32) and dw scratch.
struct BackwardProblem : test::BackwardInputs {
  int64_t rows, d;
  std::vector<void*> dev_dn, dev_dx, dev_dw, dev_partials;
  void *dev_x = nullptr, *dev_w = nullptr, *dev_rstd = nullptr;

  BackwardProblem(int w, int64_t rows_, int64_t d_, uint64_t seed)
      : BackwardInputs(w, rows_, d_, seed), rows(rows_), d(d_) {
    const int64_t n = rows * d;
    const size_t bytes = static_cast<size_t>(n) * 2;
    for (int r = 0; r < w; ++r) {
      void *p, *o, *dw, *part;
      cudaMalloc(&p, bytes);
      cudaMalloc(&o, bytes);
      cudaMalloc(&dw, static_cast<size_t>(d) * sizeof(float));
      cudaMalloc(&part, static_cast<size_t>(cuda::kFusedMaxBlocks * d) * sizeof(float));
      cudaMemcpy(p, dn[static_cast<size_t>(r)].data(), bytes, cudaMemcpyHostToDevice);
      dev_dn.push_back(p);
      dev_dx.push_back(o);
      dev_dw.push_back(dw);
      dev_partials.push_back(part);
    }
    cudaMalloc(&dev_x, bytes);
    cudaMalloc(&dev_w, static_cast<size_t>(d) * 2);
    cudaMalloc(&dev_rstd, static_cast<size_t>(rows) * sizeof(float) + 16);
    cudaMemcpy(dev_x, x.data(), bytes, cudaMemcpyHostToDevice);
    cudaMemcpy(dev_w, weight.data(), static_cast<size_t>(d) * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(dev_rstd, rstd.data(), rstd.size() * sizeof(float), cudaMemcpyHostToDevice);
  }
  ~BackwardProblem() {
    for (auto* v : {&dev_dn, &dev_dx, &dev_dw, &dev_partials})
      for (void* p : *v) cudaFree(p);
    cudaFree(dev_x);
    cudaFree(dev_w);
    cudaFree(dev_rstd);
  }
  // dx = dx_old (or zeros) and dw = 0 on every rank.
  void reset(bool accumulate) const {
    for (size_t r = 0; r < dev_dx.size(); ++r) {
      if (accumulate)
        cudaMemcpy(dev_dx[r], dx_old.data(), dx_old.size() * 2, cudaMemcpyHostToDevice);
      else
        cudaMemset(dev_dx[r], 0xff, dx_old.size() * 2);  // NaNs: every element must be written
      cudaMemset(dev_dw[r], 0, static_cast<size_t>(d) * sizeof(float));
    }
  }
  cuda::FusedNormBackwardArgs args(int r, uint32_t epoch, cuda::FusedAlgo algo, int blocks, bool accumulate) const {
    cuda::FusedNormBackwardArgs a;
    a.dnormed = dev_dn[static_cast<size_t>(r)];
    a.x = dev_x;
    a.weight = dev_w;
    a.rstd = static_cast<const float*>(dev_rstd);
    a.dx = dev_dx[static_cast<size_t>(r)];
    a.accumulate = accumulate;
    a.dw = dev_dw[static_cast<size_t>(r)];
    a.dw_partials = static_cast<float*>(dev_partials[static_cast<size_t>(r)]);
    a.rows = rows;
    a.d = d;
    a.epoch = epoch;
    a.blocks = blocks;
    a.timeout_s = 20.0;
    a.algo = algo;
    return a;
  }
  std::vector<uint16_t> dx_of(int r) const {
    std::vector<uint16_t> out(static_cast<size_t>(rows * d));
    cudaMemcpy(out.data(), dev_dx[static_cast<size_t>(r)], out.size() * 2, cudaMemcpyDeviceToHost);
    return out;
  }
  std::vector<float> dw_of(int r) const {
    std::vector<float> out(static_cast<size_t>(d));
    cudaMemcpy(out.data(), dev_dw[static_cast<size_t>(r)], out.size() * sizeof(float), cudaMemcpyDeviceToHost);
    return out;
  }
};

double bf_value(uint16_t b) {
  return test::bf(b);
}
double f32_value(float v) {
  return v;
}

TEST_F(FusedNormKernel, BackwardMatchesTheReferenceBitIdenticalAcrossRanksAndAlgorithms) {
  struct Case {
    int ranks;
    int64_t rows, d;
    bool accumulate;
  };
  const Case cases[] = {{2, 1, 1024, false},  {2, 37, 2048, true},     {4, 300, 4096, true},
                        {8, 1000, 1024, false}, {3, 129, 4096, true}, {2, 4096, 8192, true},
                        {2, 16384, 2048, false}, {2, 64, 8192, true}, {2, 40, 16384, false},
                        {2, 8, 32768, true}};  // the widest: one 256-thread group per block, 128 KiB of dw sums
  for (const Case& c : cases) {
    if (c.d > cuda::fused_backward_max_d()) {  // a GPU with less shared memory than 132 KiB per block
      std::printf("[ INFO ] width %lld skipped: this GPU's backward takes %lld at most\n", static_cast<long long>(c.d),
                  static_cast<long long>(cuda::fused_backward_max_d()));
      continue;
    }
    BackwardProblem pb(c.ranks, c.rows, c.d, 31 + static_cast<uint64_t>(c.rows));
    std::vector<uint16_t> want_dn;
    std::vector<double> want_dx, want_dw;
    test::fused_norm_backward_reference(pb.dn, pb.x, pb.weight, pb.rstd, c.accumulate ? &pb.dx_old : nullptr, c.rows,
                                        c.d, &want_dn, &want_dx, &want_dw);
    VirtualGroup g(c.ranks, cuda::fused_stage_bytes(c.rows, c.d));
    std::vector<uint16_t> first_dx;
    std::vector<float> first_dw;
    for (cuda::FusedAlgo algo : {cuda::FusedAlgo::kTwoShot, cuda::FusedAlgo::kOneShot}) {
      SCOPED_TRACE(std::string(algo == cuda::FusedAlgo::kTwoShot ? "two-shot" : "one-shot") + ", " +
                   std::to_string(c.ranks) + " ranks, " + std::to_string(c.rows) + " x " + std::to_string(c.d) +
                   (c.accumulate ? ", accumulating" : ""));
      pb.reset(c.accumulate);
      CK(cudaDeviceSynchronize());
      ++g.epoch;
      for (int r = 0; r < c.ranks; ++r)
        cuda::launch_fused_rmsnorm_backward(g.view(r), pb.args(r, g.epoch, algo, 16, c.accumulate),
                                            g.streams[static_cast<size_t>(r)]);
      CK(cudaDeviceSynchronize());
      const std::vector<uint16_t> dx0 = pb.dx_of(0);
      const std::vector<float> dw0 = pb.dw_of(0);
      for (int r = 0; r < c.ranks; ++r) {
        ASSERT_EQ(g.error_of(r), 0u) << cuda::fused_error_kind(g.error_of(r));
        EXPECT_TRUE(pb.dx_of(r) == dx0) << "dx differs on rank " << r;
        EXPECT_TRUE(pb.dw_of(r) == dw0) << "dw differs on rank " << r;
      }
      EXPECT_LE(test::relative_error(dx0, want_dx, bf_value), 1e-2) << "dx, norm-wise relative error";
      EXPECT_LE(test::relative_error(dw0, want_dw, f32_value), 1e-4) << "dw, norm-wise relative error";
      if (first_dx.empty()) {
        first_dx = dx0;
        first_dw = dw0;
      } else {
        EXPECT_TRUE(dx0 == first_dx) << "one-shot and two-shot dx differ";
        EXPECT_TRUE(dw0 == first_dw) << "one-shot and two-shot dw differ";
      }
    }
  }
}

TEST_F(FusedNormKernel, GraphReplaysTakeTheirEpochsFromTheDeviceCounters) {
  const int w = 2;
  const int64_t d = 2048;
  Problem fa(w, 64, d, 41), fb(w, 5, d, 42);
  BackwardProblem bw(w, 48, d, 43);
  std::vector<uint16_t> want_a, want_b;
  std::vector<float> unused;
  fa.reference(&want_a, &unused);
  fb.reference(&want_b, &unused);
  std::vector<uint16_t> want_dn;
  std::vector<double> want_dx, want_dw;
  test::fused_norm_backward_reference(bw.dn, bw.x, bw.weight, bw.rstd, nullptr, bw.rows, d, &want_dn, &want_dx,
                                      &want_dw);
  VirtualGroup g(w, cuda::fused_stage_bytes(64, d), /*device_epochs=*/true);
  bw.reset(false);
  CK(cudaDeviceSynchronize());
  // Each rank's graph: forward two-shot (64 rows), backward one-shot, forward one-shot (5 rows), backward
  // two-shot. The epoch arguments (0) are ignored: the counters give them.
  std::vector<cudaGraphExec_t> exec(w);
  for (int r = 0; r < w; ++r) {
    cudaStream_t s = g.streams[static_cast<size_t>(r)];
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    cuda::launch_fused_allreduce_add_rmsnorm(g.view(r), fa.args(r, 0, cuda::FusedAlgo::kTwoShot, 8), s);
    cuda::launch_fused_rmsnorm_backward(g.view(r), bw.args(r, 0, cuda::FusedAlgo::kOneShot, 8, false), s);
    cuda::launch_fused_allreduce_add_rmsnorm(g.view(r), fb.args(r, 0, cuda::FusedAlgo::kOneShot, 8), s);
    cuda::launch_fused_rmsnorm_backward(g.view(r), bw.args(r, 0, cuda::FusedAlgo::kTwoShot, 8, false), s);
    cudaGraph_t graph;
    CK(cudaStreamEndCapture(s, &graph));
    CK(cudaGraphInstantiate(&exec[static_cast<size_t>(r)], graph, 0));
    CK(cudaGraphDestroy(graph));
  }
  const int replays = 200;
  uint32_t calls = 0;
  for (int i = 0; i < replays; ++i) {
    for (int r = 0; r < w; ++r) CK(cudaGraphLaunch(exec[static_cast<size_t>(r)], g.streams[static_cast<size_t>(r)]));
    calls += 4;
    if (i % 10 == 9) {  // an eager call between replays (its epoch argument ignored as well)
      for (int r = 0; r < w; ++r)
        cuda::launch_fused_allreduce_add_rmsnorm(g.view(r), fa.args(r, 0, cuda::FusedAlgo::kOneShot, 4),
                                                 g.streams[static_cast<size_t>(r)]);
      ++calls;
    }
  }
  CK(cudaDeviceSynchronize());
  for (int r = 0; r < w; ++r) {
    ASSERT_EQ(g.error_of(r), 0u) << cuda::fused_error_kind(g.error_of(r));
    EXPECT_EQ(g.counter_of(r), calls) << "rank " << r << "'s epoch counter";
    EXPECT_TRUE(fa.download(fa.dev_res_out, r) == want_a) << "rank " << r;
    EXPECT_TRUE(fb.download(fb.dev_res_out, r) == want_b) << "rank " << r;
    // dx is overwritten by every backward; dw accumulated 2 per replay.
    EXPECT_LE(test::relative_error(bw.dx_of(r), want_dx, bf_value), 1e-2);
    EXPECT_TRUE(bw.dw_of(r) == bw.dw_of(0)) << "dw differs on rank " << r;
    std::vector<double> want_total(want_dw.size());
    for (size_t j = 0; j < want_dw.size(); ++j) want_total[j] = want_dw[j] * 2 * replays;
    EXPECT_LE(test::relative_error(bw.dw_of(r), want_total, f32_value), 1e-3);
  }
  for (cudaGraphExec_t e : exec) cudaGraphExecDestroy(e);
}

#else

TEST_F(FusedNormKernel, BothAlgorithmsMatchTheReferenceAndAreBitIdenticalOnEveryRank) {}

#endif

}  // namespace
}  // namespace loom
