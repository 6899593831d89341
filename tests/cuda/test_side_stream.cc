// The CUDA backend's side stream (Backend::begin_side .. end_side, join_side) and the tape's side nodes, which
// the token-split overlap runs on: work on the side stream is slow on purpose (hundreds of passes over a large
// buffer before the value that matters is written), so a compute-stream reader that did not wait for it would
// read the old value. Skips with the reason where there is no usable GPU.
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/arena.h"
#include "core/backend.h"
#include "core/context.h"
#include "core/error.h"
#include "core/tape.h"
#include "tests/cuda/cuda_test_util.h"

namespace loom {
namespace {

constexpr int64_t kBusyElements = int64_t{32} << 20;  // 128 MiB of f32
constexpr int kBusyPasses = 200;                      // about 10 ms of memory traffic on an H100

class SideStream : public test::CudaTest {
 protected:
  void SetUp() override {
    test::CudaTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    arena_ = std::make_unique<ActivationArena>(*gpu_);
    busy_ = arena_->allocate(Shape{kBusyElements}, DType::kF32);
  }
  // Enqueues a long run of work on the current stream.
  void keep_busy() {
    for (int i = 0; i < kBusyPasses; ++i) gpu_->fill(busy_, static_cast<float>(i));
  }
  float read(const Tensor& t) {
    float v = 0;
    gpu_->download(t, &v);
    return v;
  }
  std::unique_ptr<ActivationArena> arena_;
  Tensor busy_;
};

TEST_F(SideStream, JoinMakesTheComputeStreamWaitForTheSideWork) {
  Tensor value = arena_->allocate(Shape{1}, DType::kF32), seen = arena_->allocate(Shape{1}, DType::kF32);
  gpu_->fill(value, 1.0f);
  EXPECT_FALSE(gpu_->on_side());
  gpu_->begin_side();
  EXPECT_TRUE(gpu_->on_side());
  EXPECT_THROW(gpu_->begin_side(), Error);  // regions do not nest
  EXPECT_THROW(gpu_->join_side(1), Error);  // nor is there a join inside one
  keep_busy();
  gpu_->fill(value, 7.0f);  // on the side stream, after the busy work
  const uint64_t ticket = gpu_->end_side();
  EXPECT_FALSE(gpu_->on_side());
  EXPECT_GT(ticket, 0u);
  gpu_->join_side(ticket);
  gpu_->copy(seen, value);  // on the compute stream
  EXPECT_EQ(read(seen), 7.0f) << "the compute stream read the value before the side stream wrote it";

  // The side stream starts after the compute stream's earlier work: a long compute run, then a side read.
  gpu_->fill(value, 1.0f);
  keep_busy();
  gpu_->fill(value, 9.0f);
  {
    SideScope side(*gpu_);
    gpu_->copy(seen, value);
    const uint64_t later = side.close();
    EXPECT_GT(later, ticket);
    gpu_->join_side(later);
  }
  EXPECT_EQ(read(seen), 9.0f) << "the side stream did not wait for the compute stream's earlier work";
  EXPECT_THROW(gpu_->end_side(), Error);  // not in a region
}

TEST_F(SideStream, TapeJoinsWhatASideNodeWroteBeforeTheNextReaderOnTheComputeStream) {
  Tape tape(*arena_, nullptr);
  Tensor x = tape.track(arena_->allocate(Shape{4}, DType::kF32));
  Tensor y = tape.track(arena_->allocate(Shape{4}, DType::kF32));
  Tensor copied = arena_->allocate(Shape{4}, DType::kF32);
  Backend* be = gpu_.get();
  // Recorded first, so it runs last: a compute-stream node that reads x's gradient. Recorded second (runs
  // first): a side node that writes x's gradient = 3 * y's gradient after a long busy run.
  tape.record([&, be](Tape& t) {
    auto gx = t.grad(x);
    ASSERT_TRUE(gx.has_value());
    be->copy(copied, *gx);
  });
  tape.record_side([&, be](Tape& t) {
    EXPECT_TRUE(be->on_side());
    keep_busy();
    auto gy = t.grad(y);
    ASSERT_TRUE(gy.has_value());
    auto tx = t.target(x);
    ASSERT_TRUE(tx.has_value());
    be->axpy(tx->grad, *gy, 3.0f, tx->accumulate);
  });
  Tensor seed = arena_->allocate(Shape{4}, DType::kF32);
  gpu_->fill(seed, 2.0f);
  tape.backward_from(y, seed);
  std::vector<float> got(4);
  gpu_->download(copied, got.data());
  for (float v : got) EXPECT_EQ(v, 6.0f) << "the compute-stream node read x's gradient before the side node wrote it";
}

}  // namespace
}  // namespace loom
