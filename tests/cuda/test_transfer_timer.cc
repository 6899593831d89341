// The device pieces of the link probe (parallel/cuda/transfer_timer.h): an event timer around 30 ms held on the
// stream by enqueue_delay() reads >= 30 ms, is not known while the stream is still behind (seconds() polls, never
// blocks), and reads the same afterwards; the host did not wait for the delay; a timer is reusable; a zero delay
// enqueues nothing.
#include <gtest/gtest.h>

#include <chrono>

#include "parallel/trace.h"
#include "tests/cuda/cuda_test_util.h"

#ifdef LOOM_HAVE_CUDA
#include <cuda_runtime.h>

#include "core/cuda/cuda_backend.h"
#include "parallel/cuda/transfer_timer.h"
#endif

namespace loom {
namespace {

class TransferTimerTest : public test::CudaTest {};

TEST_F(TransferTimerTest, TimesTheDelayOnTheStreamWithoutBlockingTheHost) {
#ifdef LOOM_HAVE_CUDA
  auto& cb = static_cast<cuda::CudaBackend&>(*gpu_);
  cudaStream_t stream = cb.collective_stream();
  cuda::EventTransferTimer timer([&] { return stream; });
  for (int round = 0; round < 2; ++round) {  // the second: the same timer again
    const double t0 = trace_clock_s();
    timer.start();
    cuda::enqueue_delay(stream, 0.030);
    timer.stop();
    const double enqueued = trace_clock_s() - t0;
    EXPECT_FALSE(timer.seconds().has_value()) << "known before the stream got there";
    EXPECT_LT(enqueued, 0.015) << "the host waited for the delay";
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    const std::optional<double> s = timer.seconds();
    ASSERT_TRUE(s.has_value());
    EXPECT_GE(*s, 0.030);
    EXPECT_LT(*s, 0.100);
    EXPECT_EQ(timer.seconds(), s) << "reads the same again";
  }
  // No delay: the two events back to back.
  timer.start();
  cuda::enqueue_delay(stream, 0);
  timer.stop();
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_TRUE(timer.seconds().has_value());
  EXPECT_LT(*timer.seconds(), 0.001);
#endif
}

}  // namespace
}  // namespace loom
