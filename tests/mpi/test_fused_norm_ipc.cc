// The fused all-reduce + residual add + RMSNorm kernels across processes (parallel/cuda/ipc_fused_norm.h): the
// ranks of this MPI job map each other's buffers over CUDA IPC, as the TP ranks of one node do. Runs on any
// number of GPUs of one host, one included (rank r uses GPU r % count; ranks sharing a GPU then take turns on
// it, which is slow but exercises the same protocol). Skips with the reason where there is no GPU.
//   - Availability: the group of the job's ranks can use CUDA IPC, and every rank gets the same answer.
//   - Both algorithms against a host reference computed on every rank from the same seeded inputs, for shapes
//     that grow the staging buffers (the collective re-mapping) and shrink again: the residual exactly, normed
//     within one bf16 rounding, rstd within 1e-5, and the outputs bit-identical on every rank.
//   - 2000 calls of changing row counts with random per-rank delays, checked every 100 calls.
//   - A rank that misses a call: the others fail within the deadline, naming it, and only after it.
//   - abort() stops a waiting rank at once.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/rng.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/fused_norm_reference.h"
#include "tests/mpi/mpi_test_util.h"

#ifdef LOOM_HAVE_CUDA
#include <cuda_runtime.h>

#include "parallel/cuda/ipc_fused_norm.h"
#endif

namespace loom {
namespace {

class FusedNormIpc : public ::testing::Test {
 protected:
  void SetUp() override {
    // The same on every rank (no GPU anywhere, or a build without CUDA), so every rank skips alike.
    const std::string reason = test::cuda_skip_reason();
    if (!reason.empty()) GTEST_SKIP() << reason;
#ifdef LOOM_HAVE_CUDA
    int n = 0;
    cudaGetDeviceCount(&n);
    cudaSetDevice(test::world_rank() % n);
    const std::string why = cuda::IpcFusedNorm::unavailable_reason(MPI_COMM_WORLD);
    if (!why.empty()) GTEST_SKIP() << "CUDA IPC unavailable here: " << why;
#endif
  }
};

#ifdef LOOM_HAVE_CUDA

using test::random_bf16;
const auto f = test::bf;

// One call's data on this rank: every rank builds every rank's partial from the seed (so each can compute the
// reference), uploads its own, and has device outputs.
struct Call {
  int64_t rows, d;
  std::vector<std::vector<uint16_t>> partials;
  std::vector<uint16_t> residual, weight;
  void *partial = nullptr, *res = nullptr, *w = nullptr, *res_out = nullptr, *normed = nullptr;
  float* rstd = nullptr;

  Call(int ranks, int rank, int64_t rows_, int64_t d_, uint64_t seed) : rows(rows_), d(d_) {
    const int64_t n = rows * d;
    for (int r = 0; r < ranks; ++r) partials.push_back(random_bf16(n, seed, 10 + static_cast<uint64_t>(r), 0.5f));
    residual = random_bf16(n, seed, 1, 1.0f);
    weight = random_bf16(d, seed, 2, 0.2f, 1.0f);
    const size_t bytes = static_cast<size_t>(n) * 2;
    cudaMalloc(&partial, bytes);
    cudaMalloc(&res, bytes);
    cudaMalloc(&res_out, bytes);
    cudaMalloc(&normed, bytes);
    cudaMalloc(&w, static_cast<size_t>(d) * 2);
    cudaMalloc(reinterpret_cast<void**>(&rstd), static_cast<size_t>(rows) * sizeof(float));
    cudaMemcpy(partial, partials[static_cast<size_t>(rank)].data(), bytes, cudaMemcpyHostToDevice);
    cudaMemcpy(res, residual.data(), bytes, cudaMemcpyHostToDevice);
    cudaMemcpy(w, weight.data(), static_cast<size_t>(d) * 2, cudaMemcpyHostToDevice);
  }
  ~Call() {
    for (void* p : {partial, res, w, res_out, normed, static_cast<void*>(rstd)}) cudaFree(p);
  }
  cuda::FusedNormArgs args(cuda::FusedAlgo algo, int blocks) const {
    cuda::FusedNormArgs a;
    a.partial = partial;
    a.residual = res;
    a.weight = w;
    a.residual_out = res_out;
    a.normed = normed;
    a.rstd = rstd;
    a.rows = rows;
    a.d = d;
    a.eps = 1e-5f;
    a.blocks = blocks;
    a.algo = algo;
    return a;
  }
  void reference(std::vector<uint16_t>* want_res, std::vector<float>* want_norm, std::vector<double>* want_rstd) const {
    test::fused_norm_reference(partials, residual, weight, rows, d, 1e-5, want_res, want_norm, want_rstd);
  }
  std::vector<uint16_t> download(const void* p) const {
    std::vector<uint16_t> out(static_cast<size_t>(rows * d));
    cudaMemcpy(out.data(), p, out.size() * 2, cudaMemcpyDeviceToHost);
    return out;
  }
  std::vector<float> download_rstd() const {
    std::vector<float> out(static_cast<size_t>(rows));
    cudaMemcpy(out.data(), rstd, out.size() * sizeof(float), cudaMemcpyDeviceToHost);
    return out;
  }
};

// Whether `bytes` are the same on every rank (compared with rank 0's).
bool same_everywhere(const void* data, size_t bytes) {
  std::vector<char> root(bytes);
  std::memcpy(root.data(), data, bytes);
  MPI_Bcast(root.data(), static_cast<int>(bytes), MPI_BYTE, 0, MPI_COMM_WORLD);
  const bool same = std::memcmp(root.data(), data, bytes) == 0;
  return test::count_ranks(!same) == 0;
}

// What synchronize() threw ("" for nothing).
std::string sync_error(const cuda::IpcFusedNorm& group) {
  try {
    group.synchronize();
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

cudaStream_t new_stream() {
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  return s;
}

TEST_F(FusedNormIpc, BothAlgorithmsMatchTheReferenceWhileTheBuffersGrowAndAreBitIdenticalOnEveryRank) {
  const int w = test::world_size(), me = test::world_rank();
  cudaStream_t stream = new_stream();
  {
    // Starts with room for one row of 1024: the first case already grows the buffers.
    cuda::IpcFusedNorm group(MPI_COMM_WORLD, stream, cuda::fused_stage_bytes(1, 1024), 20.0, "world");
    struct Case {
      int64_t rows, d;
    };
    const Case cases[] = {{1, 1024}, {37, 2048}, {300, 4096}, {3, 8192}, {4096, 8192}, {129, 4096}, {16384, 2048}};
    int64_t grown = group.stage_bytes();
    int growths = 0;
    for (const Case& c : cases) {
      Call call(w, me, c.rows, c.d, 77 + static_cast<uint64_t>(c.rows));
      std::vector<uint16_t> want_res;
      std::vector<float> want_norm;
      std::vector<double> want_rstd;
      call.reference(&want_res, &want_norm, &want_rstd);
      for (auto algo : {cuda::FusedAlgo::kTwoShot, cuda::FusedAlgo::kOneShot}) {
        SCOPED_TRACE(std::string(algo == cuda::FusedAlgo::kTwoShot ? "two-shot, " : "one-shot, ") +
                     std::to_string(c.rows) + " x " + std::to_string(c.d));
        bool threw = false;
        try {
          group.run(call.args(algo, 16));
          group.synchronize();
        } catch (const Error& e) {
          threw = true;
          ADD_FAILURE() << e.what();
        }
        if (test::count_ranks(threw) > 0) return;  // the group is unusable on every rank now
        growths += group.stage_bytes() != grown;
        grown = group.stage_bytes();
        const std::vector<uint16_t> res = call.download(call.res_out), norm = call.download(call.normed);
        const std::vector<float> rstd = call.download_rstd();
        int64_t res_wrong = 0;
        double num = 0, den = 0, rstd_err = 0;
        for (size_t i = 0; i < res.size(); ++i) {
          res_wrong += res[i] != want_res[i];
          num += std::pow(f(norm[i]) - want_norm[i], 2.0);
          den += std::pow(want_norm[i], 2.0);
        }
        for (size_t r = 0; r < rstd.size(); ++r) rstd_err = std::max(rstd_err, std::abs(rstd[r] / want_rstd[r] - 1));
        EXPECT_EQ(res_wrong, 0) << "residual elements different from the reference";
        EXPECT_LE(std::sqrt(num / den), 1e-2) << "normed rows, norm-wise relative error";
        EXPECT_LE(rstd_err, 1e-5) << "rstd, worst relative error";
        EXPECT_TRUE(same_everywhere(res.data(), res.size() * 2)) << "residual differs between ranks";
        EXPECT_TRUE(same_everywhere(norm.data(), norm.size() * 2)) << "normed differs between ranks";
        EXPECT_TRUE(same_everywhere(rstd.data(), rstd.size() * 4)) << "rstd differs between ranks";
      }
    }
    EXPECT_GE(growths, 2) << "the cases were meant to grow the staging buffers several times";
    EXPECT_EQ(group.epoch(), 2u * (sizeof cases / sizeof cases[0]));
  }
  cudaStreamDestroy(stream);
}

TEST_F(FusedNormIpc, TwoThousandCallsOfChangingShapesWithRandomDelaysStayCorrect) {
  const int w = test::world_size(), me = test::world_rank();
  cudaStream_t stream = new_stream();
  {
    const int64_t d = 1024, set_rows[4] = {16, 7, 13, 10};
    std::vector<std::unique_ptr<Call>> sets;
    std::vector<std::vector<uint16_t>> want(4);
    for (int s = 0; s < 4; ++s) {
      sets.push_back(std::make_unique<Call>(w, me, set_rows[s], d, 500 + static_cast<uint64_t>(s)));
      std::vector<float> unused_norm;
      std::vector<double> unused_rstd;
      sets.back()->reference(&want[static_cast<size_t>(s)], &unused_norm, &unused_rstd);
    }
    cuda::IpcFusedNorm group(MPI_COMM_WORLD, stream, cuda::fused_stage_bytes(16, d), 20.0, "world");
    int bad = 0;
    for (int i = 0; i < 2000 && bad == 0; ++i) {
      const Call& c = *sets[static_cast<size_t>(i % 4)];
      const double u = random_uniform(31, static_cast<uint64_t>(me), static_cast<uint64_t>(i));
      if (u < 0.1) cuda::launch_spin(static_cast<uint64_t>(u * 2e5), stream);
      try {
        group.run(c.args((i / 4) % 2 ? cuda::FusedAlgo::kOneShot : cuda::FusedAlgo::kTwoShot, 4));
        if (i % 100 == 99) {
          group.synchronize();
          if (c.download(c.res_out) != want[static_cast<size_t>(i % 4)]) {
            ADD_FAILURE() << "call " << i << ": wrong residual";
            bad = 1;
          }
        }
      } catch (const Error& e) {
        ADD_FAILURE() << "call " << i << ": " << e.what();
        bad = 1;
      }
      if (i % 100 == 99) bad = test::count_ranks(bad != 0);  // stop together
    }
    EXPECT_EQ(bad, 0);
  }
  cudaStreamDestroy(stream);
}

TEST_F(FusedNormIpc, ARankThatMissesACallIsNamedWithinTheDeadlineAndAbortStopsAWait) {
  const int w = test::world_size(), me = test::world_rank();
  cudaStream_t stream = new_stream();
  {
    Call c(w, me, 64, 1024, 9);
    cuda::IpcFusedNorm group(MPI_COMM_WORLD, stream, cuda::fused_stage_bytes(64, 1024), 1.0, "world");
    group.run(c.args(cuda::FusedAlgo::kTwoShot, 8));  // one good call
    group.synchronize();
    MPI_Barrier(MPI_COMM_WORLD);
    // The last rank does not come to the second call.
    const int missing = w - 1;
    if (me != missing) {
      const auto t0 = std::chrono::steady_clock::now();
      group.run(c.args(cuda::FusedAlgo::kTwoShot, 8));
      const std::string what = sync_error(group);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      EXPECT_NE(what.find("rank " + std::to_string(missing) + " a peer did not arrive before the deadline"),
                std::string::npos)
          << "error: '" << what << "'";
      EXPECT_GE(s, 0.9);
      EXPECT_LT(s, 5.0) << "the others must give up soon after the 1 s deadline";
      // The group stays failed: the next call refuses at once.
      EXPECT_THROW(group.run(c.args(cuda::FusedAlgo::kTwoShot, 8)), Error);
    }
    MPI_Barrier(MPI_COMM_WORLD);
  }
  {
    // abort(): rank 0 waits in a call nobody else makes (60 s deadline) and is stopped after 0.2 s.
    Call c(w, me, 64, 1024, 9);
    cuda::IpcFusedNorm group(MPI_COMM_WORLD, stream, cuda::fused_stage_bytes(64, 1024), 60.0, "world");
    if (me == 0) {
      const auto t0 = std::chrono::steady_clock::now();
      group.run(c.args(cuda::FusedAlgo::kOneShot, 8));
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      group.abort();
      const std::string what = sync_error(group);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      EXPECT_NE(what.find("aborted"), std::string::npos) << "error: '" << what << "'";
      EXPECT_LT(s, 5.0);
      EXPECT_THROW(group.run(c.args(cuda::FusedAlgo::kOneShot, 8)), Error) << "an aborted group refuses calls";
    }
    MPI_Barrier(MPI_COMM_WORLD);
  }
  cudaStreamDestroy(stream);
}

#else

TEST_F(FusedNormIpc, BothAlgorithmsMatchTheReferenceWhileTheBuffersGrowAndAreBitIdenticalOnEveryRank) {}

#endif

}  // namespace
}  // namespace loom
