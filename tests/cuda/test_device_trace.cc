// DeviceTraceTimer (parallel/cuda/device_trace_timer.h): the trace records of a device communicator are closed
// from CUDA events, so they say when the work ran, not when it was enqueued:
//   - a call enqueued behind ~20 ms of kernels starts when they finish (the rank's arrival), not at its enqueue,
//     and an empty call takes ~0 s;
//   - a call around ~20 ms of kernels spans them;
//   - 2000 calls in a row are all closed, in order, each starting no earlier than the previous one ended, with
//     the pool reused (nothing left pending);
//   - a call captured into a CUDA graph (global capture mode) is closed at once, the capture is not disturbed by
//     the watcher, and timing goes on after it.
// Times are on the trace clock, compared with the host's view of the same stream (enqueue before, synchronize
// after). Skips with the reason where there is no usable GPU.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "parallel/trace.h"
#include "tests/cuda/cuda_test_util.h"

#ifdef LOOM_HAVE_CUDA
#include <cuda_runtime.h>

#include "core/cuda/cuda_backend.h"
#include "parallel/cuda/device_trace_timer.h"
#endif

namespace loom {
namespace {

#ifdef LOOM_HAVE_CUDA

class DeviceTrace : public test::CudaTest {
 protected:
  void SetUp() override {
    test::CudaTest::SetUp();
    if (IsSkipped()) return;
    stream_ = static_cast<cuda::CudaBackend&>(*gpu_).stream();
    ASSERT_EQ(cudaMalloc(&big_, kBigBytes), cudaSuccess);
  }
  void TearDown() override {
    if (big_) cudaFree(big_);
  }
  // About 20 ms of kernels on the backend's stream (fills of 256 MiB).
  void busy() {
    const Tensor t(big_, Shape{static_cast<int64_t>(kBigBytes / 4)}, DType::kF32, Device::kCuda);
    for (int k = 0; k < 200; ++k) gpu_->fill(t, static_cast<float>(k));
  }
  static bool wait_completed(const TraceRing& ring, uint64_t n) {
    for (int i = 0; i < 500 && ring.completed() < n; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return ring.completed() >= n;
  }

  static constexpr size_t kBigBytes = size_t{256} << 20;
  cudaStream_t stream_ = nullptr;
  void* big_ = nullptr;
};

TEST_F(DeviceTrace, ACallStartsWhenTheStreamReachesItNotWhenItIsEnqueued) {
  TraceRing ring;
  cuda::DeviceTraceTimer timer(ring);
  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  const double t0 = trace_clock_s();
  busy();
  const uint64_t seq = ring.begin(CollectiveOp::kAllReduce, 1, -1, 0);
  const double enqueued = trace_clock_s();
  timer.before(stream_);
  timer.after(stream_, seq);  // nothing in between: an empty call
  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  const double t1 = trace_clock_s();
  timer.flush(2.0);  // closes it on this thread, without waiting for the watcher's next poll
  ASSERT_EQ(ring.completed(), 1u) << "flush() did not close the record";
  const TraceRecord r = ring.snapshot()[0];
  EXPECT_GT(t1 - enqueued, 5e-3) << "the kernels before the call ran too briefly for this test";
  // It arrived when the kernels were done: near t1, long after its enqueue.
  EXPECT_GE(r.start_s, enqueued + 0.7 * (t1 - enqueued)) << "start " << r.start_s - t0 << " s, t1 " << t1 - t0 << " s";
  EXPECT_LE(r.start_s, t1 + 1e-3);
  EXPECT_LT(r.end_s - r.start_s, 1e-3) << "an empty call";
  EXPECT_EQ(timer.pending(), 0u);
}

TEST_F(DeviceTrace, ACallSpansTheWorkItEnqueued) {
  TraceRing ring;
  cuda::DeviceTraceTimer timer(ring);
  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  const double t0 = trace_clock_s();
  const uint64_t seq = ring.begin(CollectiveOp::kAllReduce, 1, -1, 0);
  timer.before(stream_);
  busy();
  timer.after(stream_, seq);
  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  const double t1 = trace_clock_s();
  ASSERT_TRUE(wait_completed(ring, 1));
  const TraceRecord r = ring.snapshot()[0];
  EXPECT_GE(r.start_s, t0);
  EXPECT_LE(r.end_s, t1 + 1e-3);
  EXPECT_GE(r.end_s - r.start_s, 0.7 * (t1 - t0)) << "span " << r.end_s - r.start_s << " s of " << t1 - t0 << " s";
  EXPECT_NEAR(ring.busy_s(), r.end_s - r.start_s, 1e-9);
}

TEST_F(DeviceTrace, ManyCallsAreClosedInOrderFromAReusedPool) {
  TraceRing ring;
  cuda::DeviceTraceTimer timer(ring);
  const Tensor t(big_, Shape{1 << 16}, DType::kF32, Device::kCuda);
  constexpr uint64_t kCalls = 2000;
  for (uint64_t i = 0; i < kCalls; ++i) {
    const uint64_t seq = ring.begin(CollectiveOp::kAllReduce, 1, -1, 256);
    timer.before(stream_);
    gpu_->fill(t, 1.f);
    timer.after(stream_, seq);
  }
  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  ASSERT_TRUE(wait_completed(ring, kCalls)) << ring.completed() << " of " << kCalls << " closed";
  EXPECT_EQ(timer.pending(), 0u);
  const std::vector<TraceRecord> recs = ring.snapshot(kCalls - 1000);
  ASSERT_EQ(recs.size(), 1000u);
  int64_t out_of_order = 0;
  for (size_t i = 0; i < recs.size(); ++i) {
    EXPECT_GT(recs[i].end_s, 0);
    if (i > 0) out_of_order += recs[i].start_s < recs[i - 1].end_s - 1e-6;
  }
  EXPECT_EQ(out_of_order, 0) << "calls of one stream overlap in the trace";
}

// A call captured into a CUDA graph does not run then: its record closes at once (timed at its enqueue), the
// graph replays, and calls after the capture are device-timed again.
TEST_F(DeviceTrace, ACapturedCallIsClosedAtOnceAndTimingGoesOnAfterIt) {
  TraceRing ring;
  cuda::DeviceTraceTimer timer(ring);
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  // A call still running on the backend's stream, so the watcher queries its event during the capture.
  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  const uint64_t running = ring.begin(CollectiveOp::kAllReduce, 1, -1, 0);
  timer.before(stream_);
  busy();
  timer.after(stream_, running);
  ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal), cudaSuccess);
  const uint64_t captured = ring.begin(CollectiveOp::kAllReduce, 1, -1, 0);
  timer.before(s);
  ASSERT_EQ(cudaMemsetAsync(big_, 0, 1 << 18, s), cudaSuccess);
  timer.after(s, captured);
  EXPECT_EQ(timer.pending(), 1u) << "only the running call is pending";
  std::this_thread::sleep_for(std::chrono::milliseconds(30));  // the watcher polls during the global capture
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamEndCapture(s, &graph), cudaSuccess) << "the capture was invalidated";
  EXPECT_FALSE(timer.failed()) << "the watcher's queries failed during the capture";
  EXPECT_GT(ring.snapshot(captured)[0].end_s, 0) << "the captured call was closed at once";
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, s), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(s);
  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  const double t0 = trace_clock_s();
  busy();
  const uint64_t after = ring.begin(CollectiveOp::kAllReduce, 1, -1, 0);
  timer.before(stream_);
  timer.after(stream_, after);
  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  const double t1 = trace_clock_s();
  ASSERT_TRUE(wait_completed(ring, 3));
  const TraceRecord r = ring.snapshot(after)[0];
  EXPECT_GE(r.start_s, t0 + 0.7 * (t1 - t0)) << "device-timed again after the capture";
}

#else

TEST(DeviceTrace, SkipsWithoutCuda) { GTEST_SKIP() << test::cuda_skip_reason(); }

#endif

}  // namespace
}  // namespace loom
