// NcclCommunicator's trace records are closed from CUDA events (parallel/cuda/device_trace_timer.h): an
// all-reduce enqueued behind ~20 ms of kernels starts, in its record, when those kernels are done (the rank's
// arrival), not when the host enqueued it, and the record is closed without the host waiting for it. Each rank
// uses a group of its own (MPI_COMM_SELF: NCCL takes a one-rank communicator on any GPU) and, where every rank
// has a GPU of its own, the whole world too. Skips with the reason where there is no GPU or no NCCL.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "parallel/trace.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/mpi/mpi_test_util.h"

#if defined(LOOM_HAVE_CUDA) && defined(LOOM_HAVE_NCCL)
#include <cuda_runtime.h>

#include "core/cuda/cuda_backend.h"
#include "parallel/cuda/host_staged_communicator.h"
#include "parallel/nccl/nccl_communicator.h"
#endif

namespace loom {
namespace {

#if defined(LOOM_HAVE_CUDA) && defined(LOOM_HAVE_NCCL)

// One all-reduce behind ~20 ms of kernels on `comm`; checks its record against the host's view.
void expect_device_timed(Backend& be, Communicator& comm, void* big, size_t big_bytes) {
  const Tensor busy(big, Shape{static_cast<int64_t>(big_bytes / 4)}, DType::kF32, Device::kCuda);
  const Tensor small(big, Shape{1024}, DType::kF32, Device::kCuda);
  be.synchronize();
  const uint64_t before = comm.trace().completed();
  for (int k = 0; k < 200; ++k) be.fill(busy, static_cast<float>(k));
  const double enqueued = trace_clock_s();
  comm.all_reduce(small, ReduceOp::kSum);
  const double returned = trace_clock_s();
  be.synchronize();
  const double t1 = trace_clock_s();
  for (int i = 0; i < 500 && comm.trace().completed() == before; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_EQ(comm.trace().completed(), before + 1) << "the record was not closed";
  const std::vector<TraceRecord> recs = comm.trace().snapshot(comm.trace().launched() - 1);
  ASSERT_EQ(recs.size(), 1u);
  const TraceRecord& r = recs[0];
  EXPECT_LT(returned - enqueued, 0.5 * (t1 - enqueued)) << "the call waited for the kernels before it";
  EXPECT_GE(r.start_s, enqueued + 0.7 * (t1 - enqueued))
      << "start " << r.start_s - enqueued << " s after the enqueue; the kernels ended " << t1 - enqueued << " s after";
  EXPECT_LE(r.end_s, t1 + 1e-3);
  EXPECT_GE(r.end_s, r.start_s);
}

TEST(NcclTrace, RecordsStartWhenTheStreamReachesTheCollective) {
  const std::string reason = test::cuda_skip_reason();
  if (!reason.empty()) GTEST_SKIP() << reason;
  int n = 0;
  cudaGetDeviceCount(&n);
  std::unique_ptr<Backend> be = make_cuda_backend(test::world_rank() % n);
  auto& cb = static_cast<cuda::CudaBackend&>(*be);
  constexpr size_t kBig = size_t{256} << 20;
  void* big = nullptr;
  ASSERT_EQ(cudaMalloc(&big, kBig), cudaSuccess);
  {
    NcclCommunicator self(MPI_COMM_SELF, "self", 9, cb);
    expect_device_timed(*be, self, big, kBig);
  }
  // The world, where NCCL can serve it (a GPU per rank); the same answer on every rank.
  if (HostStagedCommunicator::nccl_unusable_reason(MPI_COMM_WORLD).empty()) {
    NcclCommunicator world(MPI_COMM_WORLD, "world", 0, cb);
    expect_device_timed(*be, world, big, kBig);
  } else if (test::world_rank() == 0) {
    std::printf("world group skipped: ranks share a GPU (NCCL refuses them)\n");
  }
  cudaFree(big);
}

#else

TEST(NcclTrace, RecordsStartWhenTheStreamReachesTheCollective) {
  const std::string reason = test::cuda_skip_reason();
  GTEST_SKIP() << (reason.empty() ? std::string("this build has no NCCL") : reason);
}

#endif

}  // namespace
}  // namespace loom
