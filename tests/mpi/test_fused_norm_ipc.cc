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
//   - The backward through the group (both algorithms, accumulating into dx): against the f64 reference, and
//     dx and dw bit-identical on every rank and between the algorithms.
//   - The op (ops::fused_allreduce_add_rmsnorm, forward and backward through the tape on the CUDA backend) with
//     the kernels equals the op composed of an all-reduce and the backend's norm kernels, within bf16 rounding,
//     and is bit-identical on every rank (HostStagedCommunicator offers the kernels as NcclCommunicator does;
//     NCCL itself refuses two ranks on one GPU).
//   - A CUDA graph of forward and backward calls on the group's stream, replayed 100 times between eager calls:
//     correct results, no error.
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

#include "core/arena.h"
#include "core/context.h"
#include "core/cuda/cuda_backend.h"
#include "parallel/communicator.h"
#include "parallel/cuda/fused_path.h"
#include "parallel/cuda/host_staged_communicator.h"
#include "parallel/cuda/ipc_fused_norm.h"
#include "parallel/fused_norm.h"
#include "parallel/fused_tuning.h"
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
    EXPECT_EQ(group.calls(), 2u * (sizeof cases / sizeof cases[0]));
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

// One backward call's data on this rank (every rank builds every rank's inputs from the seed).
struct BackwardCall : test::BackwardInputs {
  int64_t rows, d;
  void *dn_dev = nullptr, *x_dev = nullptr, *w_dev = nullptr, *dx_dev = nullptr;
  float *rstd_dev = nullptr, *dw_dev = nullptr;

  BackwardCall(int ranks, int rank, int64_t rows_, int64_t d_, uint64_t seed)
      : BackwardInputs(ranks, rows_, d_, seed), rows(rows_), d(d_) {
    const size_t bytes = static_cast<size_t>(rows * d) * 2;
    cudaMalloc(&dn_dev, bytes);
    cudaMalloc(&x_dev, bytes);
    cudaMalloc(&dx_dev, bytes);
    cudaMalloc(&w_dev, static_cast<size_t>(d) * 2);
    cudaMalloc(reinterpret_cast<void**>(&rstd_dev), static_cast<size_t>(rows) * sizeof(float));
    cudaMalloc(reinterpret_cast<void**>(&dw_dev), static_cast<size_t>(d) * sizeof(float));
    cudaMemcpy(dn_dev, dn[static_cast<size_t>(rank)].data(), bytes, cudaMemcpyHostToDevice);
    cudaMemcpy(x_dev, x.data(), bytes, cudaMemcpyHostToDevice);
    cudaMemcpy(w_dev, weight.data(), static_cast<size_t>(d) * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(rstd_dev, rstd.data(), rstd.size() * sizeof(float), cudaMemcpyHostToDevice);
  }
  ~BackwardCall() {
    for (void* p : {dn_dev, x_dev, w_dev, dx_dev, static_cast<void*>(rstd_dev), static_cast<void*>(dw_dev)})
      cudaFree(p);
  }
  void reset() const {  // dx = dx_old, dw = 0
    cudaMemcpy(dx_dev, dx_old.data(), dx_old.size() * 2, cudaMemcpyHostToDevice);
    cudaMemset(dw_dev, 0, static_cast<size_t>(d) * sizeof(float));
  }
  cuda::FusedNormBackwardArgs args(cuda::FusedAlgo algo, bool accumulate) const {
    cuda::FusedNormBackwardArgs a;
    a.dnormed = dn_dev;
    a.x = x_dev;
    a.weight = w_dev;
    a.rstd = rstd_dev;
    a.dx = dx_dev;
    a.accumulate = accumulate;
    a.dw = dw_dev;
    a.rows = rows;
    a.d = d;
    a.blocks = 16;
    a.algo = algo;
    return a;
  }
  std::vector<uint16_t> dx() const {
    std::vector<uint16_t> out(static_cast<size_t>(rows * d));
    cudaMemcpy(out.data(), dx_dev, out.size() * 2, cudaMemcpyDeviceToHost);
    return out;
  }
  std::vector<float> dw() const {
    std::vector<float> out(static_cast<size_t>(d));
    cudaMemcpy(out.data(), dw_dev, out.size() * sizeof(float), cudaMemcpyDeviceToHost);
    return out;
  }
};

double bf_value(uint16_t b) {
  return test::bf(b);
}
double f32_value(float v) {
  return v;
}

TEST_F(FusedNormIpc, TheBackwardMatchesTheReferenceAndGraphReplaysWork) {
  const int w = test::world_size(), me = test::world_rank();
  cudaStream_t stream = new_stream();
  {
    cuda::IpcFusedNorm group(MPI_COMM_WORLD, stream, cuda::fused_stage_bytes(1, 1024), 20.0, "world");
    for (int64_t rows : {int64_t{5}, int64_t{700}}) {
      const int64_t d = 4096;
      BackwardCall call(w, me, rows, d, 300 + static_cast<uint64_t>(rows));
      std::vector<uint16_t> want_dn;
      std::vector<double> want_dx, want_dw;
      test::fused_norm_backward_reference(call.dn, call.x, call.weight, call.rstd, &call.dx_old, rows, d, &want_dn,
                                          &want_dx, &want_dw);
      std::vector<uint16_t> first_dx;
      std::vector<float> first_dw;
      for (auto algo : {cuda::FusedAlgo::kTwoShot, cuda::FusedAlgo::kOneShot}) {
        SCOPED_TRACE(std::string(algo == cuda::FusedAlgo::kTwoShot ? "two-shot, " : "one-shot, ") +
                     std::to_string(rows) + " x " + std::to_string(d));
        call.reset();
        bool threw = false;
        try {
          group.run_backward(call.args(algo, true));
          group.synchronize();
        } catch (const Error& e) {
          threw = true;
          ADD_FAILURE() << e.what();
        }
        if (test::count_ranks(threw) > 0) return;
        const std::vector<uint16_t> dx = call.dx();
        const std::vector<float> dw = call.dw();
        EXPECT_LE(test::relative_error(dx, want_dx, bf_value), 1e-2) << "dx, norm-wise relative error";
        EXPECT_LE(test::relative_error(dw, want_dw, f32_value), 1e-4) << "dw, norm-wise relative error";
        EXPECT_TRUE(same_everywhere(dx.data(), dx.size() * 2)) << "dx differs between ranks";
        EXPECT_TRUE(same_everywhere(dw.data(), dw.size() * 4)) << "dw differs between ranks";
        if (first_dx.empty()) {
          first_dx = dx;
          first_dw = dw;
        } else {
          EXPECT_TRUE(dx == first_dx && dw == first_dw) << "one-shot and two-shot differ";
        }
      }
    }

    // A graph of a forward and a backward call, replayed between eager forward calls.
    Call fwd(w, me, 48, 2048, 91);
    BackwardCall bwd(w, me, 48, 2048, 92);
    std::vector<uint16_t> want_res;
    std::vector<float> unused_norm;
    std::vector<double> unused_rstd, want_dw, want_dx;
    std::vector<uint16_t> unused_dn;
    fwd.reference(&want_res, &unused_norm, &unused_rstd);
    test::fused_norm_backward_reference(bwd.dn, bwd.x, bwd.weight, bwd.rstd, nullptr, 48, 2048, &unused_dn, &want_dx,
                                        &want_dw);
    bwd.reset();
    group.reserve(48, 2048);
    // Capturing a call that would need larger buffers is refused with a clear error (and nothing is lost).
    Call big(w, me, 4096, 8192, 93);
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    EXPECT_THROW(group.run(big.args(cuda::FusedAlgo::kTwoShot, 16)), Error);
    cudaGraph_t graph;
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    cudaGraphDestroy(graph);
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    group.run(fwd.args(cuda::FusedAlgo::kTwoShot, 8));
    group.run_backward(bwd.args(cuda::FusedAlgo::kOneShot, false));
    ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    cudaGraphExec_t exec;
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    cudaGraphDestroy(graph);
    const int replays = 100;
    std::string failure;
    try {
      for (int i = 0; i < replays; ++i) {
        ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
        if (i % 10 == 9) group.run(fwd.args(cuda::FusedAlgo::kOneShot, 4));
      }
      group.synchronize();
    } catch (const Error& e) {
      failure = e.what();
    }
    cudaGraphExecDestroy(exec);
    EXPECT_EQ(failure, "");
    EXPECT_TRUE(fwd.download(fwd.res_out) == want_res) << "residual after the replays";
    EXPECT_LE(test::relative_error(bwd.dx(), want_dx, bf_value), 1e-2);
    std::vector<double> want_total(want_dw.size());
    for (size_t j = 0; j < want_dw.size(); ++j) want_total[j] = want_dw[j] * replays;
    const std::vector<float> dw = bwd.dw();
    EXPECT_LE(test::relative_error(dw, want_total, f32_value), 1e-3);
    EXPECT_TRUE(same_everywhere(dw.data(), dw.size() * 4)) << "dw differs between ranks";
  }
  cudaStreamDestroy(stream);
}

// The op's communicator for this test: HostStagedCommunicator, which sums through host memory over MPI (the op's
// reference path) and, with fused_kernel, offers the one-kernel path exactly as NcclCommunicator does (which
// cannot run here: NCCL refuses two ranks on one GPU). The table forces the algorithm.
std::unique_ptr<HostStagedCommunicator> op_communicator(Backend& be, bool fused, cuda::FusedAlgo algo) {
  FusedTuning tuning;
  tuning.set(test::world_size(), algo == cuda::FusedAlgo::kOneShot ? (int64_t{1} << 40) : 0);
  return std::make_unique<HostStagedCommunicator>(MPI_COMM_WORLD, "tp", 1, static_cast<cuda::CudaBackend&>(be), fused,
                                                  tuning);
}

struct OpResult {
  std::vector<float> normed, residual, d_partial, d_residual, d_weight;
};

// The op's forward and backward on the tape: this rank's partial, the shared residual and weight, seeds for
// the gradients of normed (this rank's partial) and of the new residual; everything read back as f32. side: the
// op on the backend's side stream (forward and backward), as the token-split overlap runs it.
OpResult run_op(Backend& be, Communicator& tp, int64_t tokens, int64_t hidden, uint64_t salt, bool side = false) {
  const int me = test::world_rank();
  ActivationArena act(be);
  Tape tape(act, nullptr);
  Ctx c(be, act, &tape);
  auto upload = [&](const std::vector<uint16_t>& v, const Shape& s) {
    std::vector<float> f32(v.size());
    for (size_t i = 0; i < v.size(); ++i) f32[i] = f(v[i]);
    Tensor t = act.allocate(s, DType::kBF16);
    be.copy(t, Tensor(f32.data(), s, DType::kF32, Device::kCpu));
    be.synchronize();
    return t;
  };
  auto download = [&](const Tensor& t) {
    std::vector<float> v(static_cast<size_t>(t.numel()));
    be.copy(Tensor(v.data(), t.shape(), DType::kF32, Device::kCpu), t);
    be.synchronize();
    return v;
  };
  const Shape td{tokens, hidden};
  Tensor P = tape.track(upload(random_bf16(tokens * hidden, salt, 10 + static_cast<uint64_t>(me), 0.5f), td));
  Tensor R = tape.track(upload(random_bf16(tokens * hidden, salt, 1, 1.0f), td));
  Tensor W = tape.track(upload(random_bf16(hidden, salt, 2, 0.2f, 1.0f), Shape{hidden}));
  ops::NormedResidual out = ops::fused_allreduce_add_rmsnorm(c, P, R, W, 1e-5f, &tp, side);
  EXPECT_EQ(out.ready > 0, side);
  be.join_side(out.ready);
  Tensor L = tape.track(act.allocate(Shape{1}, DType::kF32));
  const Tensor dn = upload(random_bf16(tokens * hidden, salt, 20 + static_cast<uint64_t>(me), 0.3f), td);
  const Tensor dres = upload(random_bf16(tokens * hidden, salt, 3, 0.1f), td);
  tape.record([&, n = out.normed, res = out.residual](Tape& t) {
    be.copy(t.target(n)->grad, dn);
    be.copy(t.target(res)->grad, dres);
  });
  tape.backward(L);
  return OpResult{download(out.normed), download(out.residual), download(*tape.grad(P)), download(*tape.grad(R)),
                  download(*tape.grad(W))};
}

double relative_error_f(const std::vector<float>& got, const std::vector<float>& want) {
  return test::relative_error(got, std::vector<double>(want.begin(), want.end()), f32_value);
}

TEST_F(FusedNormIpc, TheOpWithTheKernelsEqualsTheOpWithout) {
  const int me = test::world_rank();
  int n = 0;
  cudaGetDeviceCount(&n);
  std::unique_ptr<Backend> be = make_cuda_backend(me % n);
  struct Case {
    int64_t tokens, hidden;
    cuda::FusedAlgo algo;
  };
  // Each size with the algorithm the default table would not pick (asserted through the path's counts).
  for (const Case& k : {Case{16, 1024, cuda::FusedAlgo::kTwoShot}, Case{300, 2048, cuda::FusedAlgo::kOneShot}}) {
    SCOPED_TRACE(std::to_string(k.tokens) + " x " + std::to_string(k.hidden));
    OpResult ref, fused, on_side;
    uint64_t fused_calls = 0, side_calls = 0, one_shot_calls = 0;
    {
      auto tp = op_communicator(*be, false, k.algo);
      ASSERT_EQ(tp->fused_path(), nullptr);
      ref = run_op(*be, *tp, k.tokens, k.hidden, 600 + static_cast<uint64_t>(k.tokens));
    }
    {
      auto tp = op_communicator(*be, true, k.algo);
      ASSERT_NE(tp->fused_path(), nullptr);
      fused = run_op(*be, *tp, k.tokens, k.hidden, 600 + static_cast<uint64_t>(k.tokens));
      fused_calls = tp->fused_path()->calls();
      on_side = run_op(*be, *tp, k.tokens, k.hidden, 600 + static_cast<uint64_t>(k.tokens), true);
      side_calls = tp->fused_path()->calls() - fused_calls;
      one_shot_calls = tp->fused_path()->one_shot_calls();
    }
    EXPECT_EQ(fused_calls, 2u) << "the forward and the backward each took the kernel path";
    EXPECT_EQ(side_calls, 2u) << "on the side stream too";
    EXPECT_EQ(one_shot_calls, k.algo == cuda::FusedAlgo::kOneShot ? 4u : 0u) << "the table's algorithm was used";
    const std::pair<const char*, double> tol[] = {{"normed", 1e-2},   {"residual", 1e-2}, {"d_partial", 2e-2},
                                                  {"d_residual", 2e-2}, {"d_weight", 1e-2}};
    const std::vector<float>* got[] = {&fused.normed, &fused.residual, &fused.d_partial, &fused.d_residual,
                                       &fused.d_weight};
    const std::vector<float>* want[] = {&ref.normed, &ref.residual, &ref.d_partial, &ref.d_residual, &ref.d_weight};
    for (int i = 0; i < 5; ++i) {
      EXPECT_LE(relative_error_f(*got[i], *want[i]), tol[i].second) << tol[i].first << ", fused against unfused";
      EXPECT_TRUE(same_everywhere(got[i]->data(), got[i]->size() * 4)) << tol[i].first << " differs between ranks";
    }
    // The same kernels on the same data: the side stream changes where they run, not a bit of what they compute.
    const std::vector<float>* side[] = {&on_side.normed, &on_side.residual, &on_side.d_partial, &on_side.d_residual,
                                        &on_side.d_weight};
    for (int i = 0; i < 5; ++i) EXPECT_TRUE(*side[i] == *got[i]) << tol[i].first << ": side stream against compute stream";
  }
}

#else

TEST_F(FusedNormIpc, BothAlgorithmsMatchTheReferenceWhileTheBuffersGrowAndAreBitIdenticalOnEveryRank) {}

#endif

}  // namespace
}  // namespace loom
