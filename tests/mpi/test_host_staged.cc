// HostStagedCommunicator (parallel/cuda/host_staged_communicator.h): every collective on device tensors gives
// exactly what MpiCommunicator gives on host copies of the same values, on every rank:
//   - all_reduce (sum, max) of f32 and i32; reduce_scatter, out of place and in place; all_gather, out of place
//     and in place; broadcast from every root; send/recv around a ring; barrier;
//   - bf16 reductions through f32: each element the bf16 rounding of the f32 ring's sum (the host reference
//     runs the same ring on f32 copies), bit-identical on every rank;
//   - ordering: a value written by a kernel still in flight on the backend's stream when the call is made is
//     the one that is reduced, and a kernel enqueued after it sees the result; the same inside a side region,
//     and for side work not yet joined; three calls in a row with nothing read in between;
//   - bf16 moves (all_gather, broadcast) bit-exact; empty tensors; a group of one rank (device copies only);
//   - one trace record per call, as every communicator;
//   - nccl_unusable_reason names the shared GPU when ranks share one, and is empty otherwise;
//   - bad arguments are refused before any communication, as on every communicator.
// Runs on any number of GPUs of one host (rank r on GPU r % count). Skips with the reason where there is no GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/mpi/mpi_test_util.h"

#ifdef LOOM_HAVE_CUDA
#include <cuda_runtime.h>

#include "core/cuda/cuda_backend.h"
#include "parallel/cuda/host_staged_communicator.h"
#include "parallel/mpi_communicator.h"
#endif

namespace loom {
namespace {

class HostStaged : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string reason = test::cuda_skip_reason();  // the same on every rank: all skip alike
    if (!reason.empty()) GTEST_SKIP() << reason;
#ifdef LOOM_HAVE_CUDA
    int n = 0;
    cudaGetDeviceCount(&n);
    gpus_ = n;
    be_ = make_cuda_backend(test::world_rank() % n);
    staged_ = std::make_unique<HostStagedCommunicator>(MPI_COMM_WORLD, "tp", 1,
                                                       static_cast<cuda::CudaBackend&>(*be_));
    host_ = std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, "tp", 1);
#endif
  }
#ifdef LOOM_HAVE_CUDA
  void TearDown() override {
    staged_.reset();
    host_.reset();
    be_.reset();
  }

  // A device tensor of `values` (already of dtype dt's element size), and its read-back.
  struct Buf {
    void* dev = nullptr;
    ~Buf() {
      if (dev) cudaFree(dev);
    }
  };
  Tensor upload(Buf& b, const void* bytes, int64_t n, DType dt) {
    const size_t nb = static_cast<size_t>(n) * dtype_size(dt);
    EXPECT_EQ(cudaMalloc(&b.dev, std::max<size_t>(nb, 4)), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(b.dev, bytes, nb, cudaMemcpyHostToDevice), cudaSuccess);
    // A copy from pageable memory may return before its DMA lands, and on the legacy stream, which the backend's
    // streams do not wait for: the tensor is ready only after this.
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    return Tensor(b.dev, Shape{n}, dt, Device::kCuda);
  }
  template <class T>
  std::vector<T> download(const Tensor& t) {
    be_->synchronize();
    std::vector<T> v(static_cast<size_t>(t.numel()));
    EXPECT_EQ(cudaMemcpy(v.data(), t.data(), t.nbytes(), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
  // Values that differ by rank and element, and whose f32 sums round (so the order of the sum matters).
  static std::vector<float> values(int64_t n, int rank, uint32_t salt) {
    std::vector<float> v(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t h = (static_cast<uint32_t>(i) * 2654435761u) ^ (static_cast<uint32_t>(rank + 1) * 40503u) ^ salt;
      v[static_cast<size_t>(i)] = static_cast<float>(h % 20011) / 1013.0f - 9.7f + static_cast<float>(rank) * 1e-3f;
    }
    return v;
  }
  static bool same_everywhere(const void* data, size_t bytes) {
    std::vector<char> root(static_cast<const char*>(data), static_cast<const char*>(data) + bytes);
    MPI_Bcast(root.data(), static_cast<int>(bytes), MPI_CHAR, 0, MPI_COMM_WORLD);
    return test::count_ranks(std::memcmp(root.data(), data, bytes) == 0) == test::world_size();
  }

  int gpus_ = 0;
  std::unique_ptr<Backend> be_;
  std::unique_ptr<HostStagedCommunicator> staged_;
  std::unique_ptr<MpiCommunicator> host_;
#endif
};

#ifdef LOOM_HAVE_CUDA

TEST_F(HostStaged, AllReduceEqualsTheHostRingBitForBit) {
  const int me = test::world_rank();
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{4096}, int64_t{100003}}) {
    SCOPED_TRACE("n = " + std::to_string(n));
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax}) {
      std::vector<float> want = values(n, me, 1);
      Buf b;
      Tensor t = upload(b, want.data(), n, DType::kF32);
      staged_->all_reduce(t, op);
      host_->all_reduce(Tensor(want.data(), Shape{n}, DType::kF32, Device::kCpu), op);
      EXPECT_TRUE(download<float>(t) == want) << reduce_op_name(op);
    }
    std::vector<int32_t> ints(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) ints[static_cast<size_t>(i)] = static_cast<int32_t>(i * 7 + me * 1000003);
    Buf b;
    Tensor t = upload(b, ints.data(), n, DType::kI32);
    staged_->all_reduce(t, ReduceOp::kSum);
    host_->all_reduce(Tensor(ints.data(), Shape{n}, DType::kI32, Device::kCpu), ReduceOp::kSum);
    EXPECT_TRUE(download<int32_t>(t) == ints) << "i32";
  }
}

TEST_F(HostStaged, Bf16ReductionsRoundTheF32RingOnceAndAgreeEverywhere) {
  const int me = test::world_rank(), p = test::world_size();
  const int64_t n = 30001;
  std::vector<float> mine = values(n, me, 2);
  std::vector<uint16_t> bits(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    bits[static_cast<size_t>(i)] = f32_to_bf16(mine[static_cast<size_t>(i)]).bits;
    mine[static_cast<size_t>(i)] = bf16_to_f32(bf16{bits[static_cast<size_t>(i)]});  // the values the device has
  }
  // The reference: the host ring on the f32 values, rounded to bf16 once.
  std::vector<float> sum = mine;
  host_->all_reduce(Tensor(sum.data(), Shape{n}, DType::kF32, Device::kCpu), ReduceOp::kSum);
  Buf b;
  Tensor t = upload(b, bits.data(), n, DType::kBF16);
  staged_->all_reduce(t, ReduceOp::kSum);
  const std::vector<uint16_t> got = download<uint16_t>(t);
  int64_t wrong = 0;
  for (int64_t i = 0; i < n; ++i) wrong += got[static_cast<size_t>(i)] != f32_to_bf16(sum[static_cast<size_t>(i)]).bits;
  EXPECT_EQ(wrong, 0) << "elements that are not the rounded f32 sum";
  EXPECT_TRUE(same_everywhere(got.data(), got.size() * 2));

  // reduce_scatter of bf16: block `me` of the same rounded sums.
  const int64_t block = 1000;
  std::vector<uint16_t> in_bits(bits.begin(), bits.begin() + block * p);
  Buf bi, bo;
  Tensor in = upload(bi, in_bits.data(), block * p, DType::kBF16);
  Tensor out = upload(bo, in_bits.data(), block, DType::kBF16);
  staged_->reduce_scatter(out, in, ReduceOp::kSum);
  std::vector<float> wide(mine.begin(), mine.begin() + block * p), want(static_cast<size_t>(block));
  host_->reduce_scatter(Tensor(want.data(), Shape{block}, DType::kF32, Device::kCpu),
                        Tensor(wide.data(), Shape{block * p}, DType::kF32, Device::kCpu), ReduceOp::kSum);
  const std::vector<uint16_t> got_rs = download<uint16_t>(out);
  for (int64_t i = 0; i < block; ++i)
    ASSERT_EQ(got_rs[static_cast<size_t>(i)], f32_to_bf16(want[static_cast<size_t>(i)]).bits) << "element " << i;
}

TEST_F(HostStaged, ReduceScatterAndAllGatherInAndOutOfPlace) {
  const int me = test::world_rank(), p = test::world_size();
  const int64_t block = 777;
  std::vector<float> in = values(block * p, me, 3);
  std::vector<float> want(static_cast<size_t>(block));
  std::vector<float> in_copy = in;
  host_->reduce_scatter(Tensor(want.data(), Shape{block}, DType::kF32, Device::kCpu),
                        Tensor(in_copy.data(), Shape{block * p}, DType::kF32, Device::kCpu), ReduceOp::kSum);
  {  // out of place
    Buf bi, bo;
    Tensor tin = upload(bi, in.data(), block * p, DType::kF32);
    Tensor tout = upload(bo, in.data(), block, DType::kF32);
    staged_->reduce_scatter(tout, tin, ReduceOp::kSum);
    EXPECT_TRUE(download<float>(tout) == want) << "out of place";
    EXPECT_TRUE(download<float>(tin) == in) << "the input is not written";
  }
  {  // in place: out is block `me` of in
    Buf bi;
    Tensor tin = upload(bi, in.data(), block * p, DType::kF32);
    Tensor tout = tin.flat_range(me * block, (me + 1) * block);
    staged_->reduce_scatter(tout, tin, ReduceOp::kSum);
    EXPECT_TRUE(download<float>(tout) == want) << "in place";
  }
  // all_gather: rank r contributes values(block, r); everyone gets all of them in rank order.
  std::vector<float> gathered;
  for (int r = 0; r < p; ++r) {
    const std::vector<float> v = values(block, r, 4);
    gathered.insert(gathered.end(), v.begin(), v.end());
  }
  const std::vector<float> own = values(block, me, 4);
  {
    Buf bi, bo;
    Tensor tin = upload(bi, own.data(), block, DType::kF32);
    std::vector<float> zeros(static_cast<size_t>(block * p), 0.f);
    Tensor tout = upload(bo, zeros.data(), block * p, DType::kF32);
    staged_->all_gather(tout, tin);
    EXPECT_TRUE(download<float>(tout) == gathered) << "out of place";
  }
  {
    std::vector<float> start(static_cast<size_t>(block * p), -1.f);
    std::copy(own.begin(), own.end(), start.begin() + me * block);
    Buf bo;
    Tensor tout = upload(bo, start.data(), block * p, DType::kF32);
    staged_->all_gather(tout, tout.flat_range(me * block, (me + 1) * block));
    EXPECT_TRUE(download<float>(tout) == gathered) << "in place";
  }
}

TEST_F(HostStaged, BroadcastFromEveryRootAndSendRecvAroundARing) {
  const int me = test::world_rank(), p = test::world_size();
  for (int root = 0; root < p; ++root) {
    std::vector<uint16_t> v(5000);
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<uint16_t>(i * 31 + static_cast<size_t>(me) * 7);
    Buf b;
    Tensor t = upload(b, v.data(), static_cast<int64_t>(v.size()), DType::kU16);
    staged_->broadcast(t, root);
    std::vector<uint16_t> want(v.size());
    for (size_t i = 0; i < v.size(); ++i) want[i] = static_cast<uint16_t>(i * 31 + static_cast<size_t>(root) * 7);
    EXPECT_TRUE(download<uint16_t>(t) == want) << "root " << root;
  }
  if (p < 2) GTEST_SKIP() << "a ring needs at least 2 ranks";
  const std::vector<float> mine = values(3000, me, 5), left = values(3000, (me + p - 1) % p, 5);
  Buf bs, br;
  Tensor send = upload(bs, mine.data(), 3000, DType::kF32);
  std::vector<float> zeros(3000, 0.f);
  Tensor recv = upload(br, zeros.data(), 3000, DType::kF32);
  // Even ranks send first, odd ranks receive first: no cycle of blocking sends.
  if (me % 2 == 0) {
    staged_->send(send, (me + 1) % p);
    staged_->recv(recv, (me + p - 1) % p);
  } else {
    staged_->recv(recv, (me + p - 1) % p);
    staged_->send(send, (me + 1) % p);
  }
  EXPECT_TRUE(download<float>(recv) == left);
  staged_->barrier();
}

TEST_F(HostStaged, WaitsForTheKernelsBeforeItAndIsSeenByTheKernelsAfterIt) {
  const int me = test::world_rank(), p = test::world_size();
  const int64_t n = 1 << 20;
  for (bool side : {false, true}) {
    SCOPED_TRACE(side ? "side stream" : "compute stream");
    Buf a, c;
    std::vector<float> zeros(static_cast<size_t>(n), 0.f);
    Tensor t = upload(a, zeros.data(), n, DType::kF32);
    Tensor copy = upload(c, zeros.data(), n, DType::kF32);
    if (side) be_->begin_side();
    be_->fill(t, static_cast<float>(me + 1));  // enqueued, not waited for
    staged_->all_reduce(t, ReduceOp::kSum);
    be_->copy(copy, t);  // enqueued after the call
    if (side) be_->join_side(be_->end_side());
    const std::vector<float> got = download<float>(copy);
    const float want = static_cast<float>(p * (p + 1) / 2);
    int64_t wrong = 0;
    for (float x : got) wrong += x != want;
    EXPECT_EQ(wrong, 0) << "elements that missed the fill or the result";
  }
  // Side work left un-joined: a call on the compute stream must still see it (collective_stream joins it).
  {
    Buf a;
    std::vector<float> zeros(static_cast<size_t>(n), 0.f);
    Tensor t = upload(a, zeros.data(), n, DType::kF32);
    be_->begin_side();
    be_->fill(t, static_cast<float>(me + 1));
    be_->end_side();  // no join_side
    staged_->all_reduce(t, ReduceOp::kSum);
    const std::vector<float> got = download<float>(t);
    int64_t wrong = 0;
    for (float x : got) wrong += x != static_cast<float>(p * (p + 1) / 2);
    EXPECT_EQ(wrong, 0) << "elements that missed the un-joined side fill";
  }
  // Back to back, nothing read in between: each call's result is the next one's input, through the same
  // pinned buffer.
  {
    Buf a, b;
    std::vector<float> zeros(static_cast<size_t>(n), 0.f);
    Tensor t = upload(a, zeros.data(), n, DType::kF32);
    Tensor u = upload(b, zeros.data(), n, DType::kF32);
    be_->fill(t, static_cast<float>(me + 1));
    staged_->all_reduce(t, ReduceOp::kSum);
    be_->copy(u, t);
    staged_->all_reduce(u, ReduceOp::kSum);
    staged_->all_reduce(t, ReduceOp::kMax);
    const std::vector<float> got_u = download<float>(u), got_t = download<float>(t);
    const float s = static_cast<float>(p * (p + 1) / 2);
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; ++i)
      wrong += got_u[static_cast<size_t>(i)] != p * s || got_t[static_cast<size_t>(i)] != s;
    EXPECT_EQ(wrong, 0) << "elements wrong after three calls in a row";
  }
}

TEST_F(HostStaged, Bf16MovesEmptyTensorsAndGroupsOfOneRank) {
  const int me = test::world_rank(), p = test::world_size();
  // bf16 moves as raw 16-bit elements: all_gather and broadcast give the exact bits.
  const int64_t block = 513;
  std::vector<uint16_t> mine(static_cast<size_t>(block)), want;
  for (int r = 0; r < p; ++r)
    for (int64_t i = 0; i < block; ++i) {
      const auto v = f32_to_bf16(static_cast<float>(i) * 0.37f - static_cast<float>(r) * 3.1f).bits;
      want.push_back(v);
      if (r == me) mine[static_cast<size_t>(i)] = v;
    }
  Buf bi, bo;
  Tensor in = upload(bi, mine.data(), block, DType::kBF16);
  std::vector<uint16_t> zeros(static_cast<size_t>(block * p), 0);
  Tensor out = upload(bo, zeros.data(), block * p, DType::kBF16);
  staged_->all_gather(out, in);
  EXPECT_TRUE(download<uint16_t>(out) == want) << "bf16 all_gather";
  staged_->broadcast(in, p - 1);
  EXPECT_TRUE(download<uint16_t>(in) == std::vector<uint16_t>(want.end() - block, want.end())) << "bf16 broadcast";
  // Empty tensors: every call is a no-op that still keeps the ranks in step.
  Tensor empty(nullptr, Shape{0}, DType::kF32, Device::kCuda);
  staged_->all_reduce(empty, ReduceOp::kSum);
  staged_->broadcast(empty, 0);
  staged_->barrier();
  // A group of one rank (MPI_COMM_SELF): all_reduce leaves the tensor alone, the out-of-place forms copy.
  HostStagedCommunicator self(MPI_COMM_SELF, "dp", 2, static_cast<cuda::CudaBackend&>(*be_));
  std::vector<float> v = values(100, me, 6);
  Buf bs, bt;
  Tensor t = upload(bs, v.data(), 100, DType::kF32);
  std::vector<float> fz(100, 0.f);
  Tensor o = upload(bt, fz.data(), 100, DType::kF32);
  self.all_reduce(t, ReduceOp::kSum);
  self.reduce_scatter(o, t, ReduceOp::kSum);
  EXPECT_TRUE(download<float>(t) == v) << "all_reduce over one rank";
  EXPECT_TRUE(download<float>(o) == v) << "reduce_scatter over one rank";
  std::vector<float> fz2(100, 0.f);
  Buf bg;
  Tensor g = upload(bg, fz2.data(), 100, DType::kF32);
  self.all_gather(g, t);
  EXPECT_TRUE(download<float>(g) == v) << "all_gather over one rank";
}

TEST_F(HostStaged, OneTraceRecordPerCallAndArgumentErrorsBeforeCommunicating) {
  const uint64_t before = staged_->trace().launched();
  Buf b;
  std::vector<float> v(64, 1.f);
  Tensor t = upload(b, v.data(), 64, DType::kF32);
  staged_->all_reduce(t, ReduceOp::kSum);
  staged_->broadcast(t, 0);
  staged_->barrier();
  EXPECT_EQ(staged_->trace().launched() - before, 3u);
  EXPECT_EQ(staged_->device(), Device::kCuda);
  // A host tensor on a device communicator, and a u16 reduction: refused on every rank, nothing sent.
  std::vector<float> host(64, 1.f);
  EXPECT_THROW(staged_->all_reduce(Tensor(host.data(), Shape{64}, DType::kF32, Device::kCpu), ReduceOp::kSum), Error);
  Buf bu;
  std::vector<uint16_t> u(64, 1);
  EXPECT_THROW(staged_->all_reduce(upload(bu, u.data(), 64, DType::kU16), ReduceOp::kSum), Error);
  staged_->barrier();  // still in step with every rank
}

TEST_F(HostStaged, NcclUnusableReasonNamesTheSharedGpu) {
  const std::string why = HostStagedCommunicator::nccl_unusable_reason(MPI_COMM_WORLD);
  char buf[256] = {};
  std::strncpy(buf, why.c_str(), sizeof buf - 1);
  EXPECT_TRUE(same_everywhere(buf, sizeof buf)) << why;
  if (test::world_size() > gpus_) {
    EXPECT_NE(why.find("ranks 0 and " + std::to_string(gpus_) + " of the group share GPU"), std::string::npos) << why;
  } else {
    EXPECT_EQ(why, "") << "every rank has a GPU of its own";
  }
}

#else

TEST_F(HostStaged, SkipsWithoutCuda) {}

#endif

}  // namespace
}  // namespace loom
