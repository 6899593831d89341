// MpiCommunicator over MPI_COMM_WORLD: every collective against the result computed locally from the known
// inputs of all ranks (each rank can generate any rank's input: it is a pure function of seed, rank, index),
// the chunked paths (> INT_MAX elements, forced with a small chunk), argument errors, and the trace ring.
// Run with any number of ranks, e.g. mpirun --oversubscribe -np 4.
//
// f32 inputs are random multiples of 1/64 in [-8, 8): sums of a few of them are exact, so results compare
// exactly whatever order MPI reduces in.
#include <gtest/gtest.h>

#include <cmath>
#include <ctime>
#include <cstdint>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "parallel/mpi_check.h"
#include "parallel/mpi_communicator.h"
#include "tests/mpi/mpi_test_util.h"

namespace loom {
namespace {

using test::count_ranks;
using test::world_rank;
using test::world_size;

constexpr uint64_t kSeed = 20240611;

std::vector<float> random_f32(int rank, int64_t n, uint64_t salt) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    double u = random_uniform(kSeed + salt, 100 + static_cast<uint64_t>(rank), static_cast<uint64_t>(i));
    v[static_cast<size_t>(i)] = static_cast<float>(std::floor(u * 1024.0) - 512.0) / 64.0f;
  }
  return v;
}

std::vector<int32_t> random_i32(int rank, int64_t n, uint64_t salt) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    double u = random_uniform(kSeed + salt, 200 + static_cast<uint64_t>(rank), static_cast<uint64_t>(i));
    v[static_cast<size_t>(i)] = static_cast<int32_t>(std::floor(u * 2001.0)) - 1000;
  }
  return v;
}

// bf16 bit patterns of random normals.
std::vector<uint16_t> random_bf16(int rank, int64_t n, uint64_t salt) {
  std::vector<uint16_t> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    v[static_cast<size_t>(i)] =
        f32_to_bf16(random_normal(kSeed + salt, 300 + static_cast<uint64_t>(rank), static_cast<uint64_t>(i))).bits;
  return v;
}

template <class T>
DType dtype_of();
template <>
DType dtype_of<float>() {
  return DType::kF32;
}
template <>
DType dtype_of<int32_t>() {
  return DType::kI32;
}
template <>
DType dtype_of<uint16_t>() {
  return DType::kBF16;
}

template <class T>
Tensor host(std::vector<T>& v) {
  return Tensor(v.data(), Shape{static_cast<int64_t>(v.size())}, dtype_of<T>(), Device::kCpu);
}

template <class T>
T combine(T a, T b, ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return a + b;
    case ReduceOp::kMax: return a > b ? a : b;
    case ReduceOp::kMin: return a < b ? a : b;
  }
  return a;
}

// op over ranks of input(rank), computed locally.
template <class T>
std::vector<T> reduce_locally(int size, const std::function<std::vector<T>(int)>& input, ReduceOp op) {
  std::vector<T> acc = input(0);
  for (int r = 1; r < size; ++r) {
    std::vector<T> x = input(r);
    for (size_t i = 0; i < acc.size(); ++i) acc[i] = combine(acc[i], x[i], op);
  }
  return acc;
}

// Equal element by element; on failure, the max difference and the first mismatches.
template <class T>
testing::AssertionResult same_values(const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size())
    return testing::AssertionFailure() << "got " << got.size() << " elements, expected " << want.size();
  double max_diff = 0;
  int64_t mismatches = 0;
  std::ostringstream first;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] == want[i]) continue;
    double d = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    max_diff = std::max(max_diff, d);
    if (mismatches++ < 5) first << "\n  [" << i << "] got " << +got[i] << ", expected " << +want[i];
  }
  if (mismatches == 0) return testing::AssertionSuccess();
  return testing::AssertionFailure() << mismatches << " of " << got.size() << " elements differ, max difference "
                                     << max_diff << "; first mismatches:" << first.str();
}

template <class T>
std::vector<T> slice(const std::vector<T>& v, int64_t begin, int64_t n) {
  return std::vector<T>(v.begin() + begin, v.begin() + begin + n);
}

// ---- checks shared by the plain and the chunked tests ----

template <class T>
void check_all_reduce(Communicator& comm, int64_t n, ReduceOp op,
                      std::function<std::vector<T>(int, int64_t, uint64_t)> gen, uint64_t salt) {
  std::vector<T> t = gen(comm.rank(), n, salt);
  comm.all_reduce(host(t), op);
  auto want = reduce_locally<T>(
      comm.size(), [&](int r) { return gen(r, n, salt); }, op);
  EXPECT_TRUE(same_values(t, want)) << "all_reduce " << reduce_op_name(op) << " of " << n << " elements";
}

template <class T>
void check_reduce_scatter(Communicator& comm, int64_t block, ReduceOp op, bool in_place,
                          std::function<std::vector<T>(int, int64_t, uint64_t)> gen, uint64_t salt) {
  const int64_t n = block * comm.size();
  std::vector<T> in = gen(comm.rank(), n, salt);
  const std::vector<T> in_before = in;
  std::vector<T> out_storage(static_cast<size_t>(block));
  Tensor out = in_place ? host(in).flat_range(comm.rank() * block, (comm.rank() + 1) * block) : host(out_storage);
  comm.reduce_scatter(out, host(in), op);

  auto full = reduce_locally<T>(
      comm.size(), [&](int r) { return gen(r, n, salt); }, op);
  std::vector<T> got(out.ptr<T>(), out.ptr<T>() + block);
  EXPECT_TRUE(same_values(got, slice(full, comm.rank() * block, block)))
      << "reduce_scatter " << reduce_op_name(op) << ", block " << block << (in_place ? ", in place" : "");
  // The other blocks of in are inputs only: they must come back untouched.
  for (int r = 0; r < comm.size(); ++r) {
    if (in_place && r == comm.rank()) continue;
    EXPECT_TRUE(same_values(slice(in, r * block, block), slice(in_before, r * block, block)))
        << "reduce_scatter changed block " << r << " of its input";
  }
}

template <class T>
void check_all_gather(Communicator& comm, int64_t block, bool in_place,
                      std::function<std::vector<T>(int, int64_t, uint64_t)> gen, uint64_t salt) {
  std::vector<T> in = gen(comm.rank(), block, salt);
  std::vector<T> out = gen(comm.rank(), block * comm.size(), salt + 1);  // stale contents to overwrite
  Tensor in_t = host(in);
  if (in_place) {
    std::copy(in.begin(), in.end(), out.begin() + comm.rank() * block);
    in_t = host(out).flat_range(comm.rank() * block, (comm.rank() + 1) * block);
  }
  comm.all_gather(host(out), in_t);
  std::vector<T> want;
  for (int r = 0; r < comm.size(); ++r) {
    std::vector<T> x = gen(r, block, salt);
    want.insert(want.end(), x.begin(), x.end());
  }
  EXPECT_TRUE(same_values(out, want)) << "all_gather, block " << block << (in_place ? ", in place" : "");
}

template <class T>
void check_broadcast_from_every_root(Communicator& comm, int64_t n,
                                     std::function<std::vector<T>(int, int64_t, uint64_t)> gen, uint64_t salt) {
  for (int root = 0; root < comm.size(); ++root) {
    std::vector<T> t = gen(comm.rank(), n, salt + static_cast<uint64_t>(root));
    comm.broadcast(host(t), root);
    EXPECT_TRUE(same_values(t, gen(root, n, salt + static_cast<uint64_t>(root)))) << "broadcast from root " << root;
  }
}

// Each rank sends to the next and receives from the previous. Even ranks send first, odd ranks receive first,
// so blocking sends never wait on each other in a cycle.
void check_send_recv_ring(Communicator& comm, int64_t n, uint64_t salt) {
  const int next = (comm.rank() + 1) % comm.size();
  const int prev = (comm.rank() + comm.size() - 1) % comm.size();
  std::vector<float> out = random_f32(comm.rank(), n, salt);
  std::vector<float> in(static_cast<size_t>(n), 0.0f);
  if (comm.rank() % 2 == 0) {
    comm.send(host(out), next);
    comm.recv(host(in), prev);
  } else {
    comm.recv(host(in), prev);
    comm.send(host(out), next);
  }
  EXPECT_TRUE(same_values(in, random_f32(prev, n, salt))) << "recv from rank " << prev;
}

// ---- tests ----

TEST(MpiCommunicator, RankAndSizeMatchTheWorld) {
  MpiCommunicator comm(MPI_COMM_WORLD, "world", 0);
  EXPECT_EQ(comm.rank(), world_rank());
  EXPECT_EQ(comm.size(), world_size());
  EXPECT_EQ(comm.name(), "world");
  EXPECT_EQ(comm.group_id(), 0u);
  EXPECT_EQ(comm.device(), Device::kCpu);
  EXPECT_STREQ(comm.backend_name(), "MPI");
  int cmp = MPI_UNEQUAL;
  MPI_Comm_compare(comm.comm(), MPI_COMM_WORLD, &cmp);
  EXPECT_EQ(cmp, MPI_CONGRUENT) << "the communicator must work on its own duplicate of the world";
}

TEST(MpiCommunicator, AllReduceF32) {
  MpiCommunicator comm(MPI_COMM_WORLD, "world", 0);
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin}) {
    check_all_reduce<float>(comm, 1001, op, random_f32, 1);
    check_all_reduce<float>(comm, 1, op, random_f32, 2);
  }
}

TEST(MpiCommunicator, AllReduceF32LargeMessage) {
  // 4 MiB: past the eager limit, so the shared-memory transport takes its large-message path.
  MpiCommunicator comm(MPI_COMM_WORLD, "world", 0);
  check_all_reduce<float>(comm, int64_t{1} << 20, ReduceOp::kSum, random_f32, 3);
}

TEST(MpiCommunicator, AllReduceI32) {
  MpiCommunicator comm(MPI_COMM_WORLD, "world", 0);
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kMin})
    check_all_reduce<int32_t>(comm, 777, op, random_i32, 4);
}

TEST(MpiCommunicator, ReduceScatter) {
  MpiCommunicator comm(MPI_COMM_WORLD, "world", 0);
  check_reduce_scatter<float>(comm, 513, ReduceOp::kSum, false, random_f32, 5);
  check_reduce_scatter<float>(comm, 64, ReduceOp::kMin, false, random_f32, 6);
  check_reduce_scatter<int32_t>(comm, 100, ReduceOp::kMax, false, random_i32, 7);
  check_reduce_scatter<int32_t>(comm, 100, ReduceOp::kSum, false, random_i32, 8);
}

TEST(MpiCommunicator, ReduceScatterInPlace) {
  MpiCommunicator comm(MPI_COMM_WORLD, "world", 0);
  check_reduce_scatter<float>(comm, 300, ReduceOp::kSum, true, random_f32, 9);
  check_reduce_scatter<int32_t>(comm, 300, ReduceOp::kMin, true, random_i32, 10);
}

TEST(MpiCommunicator, AllGather) {
  MpiCommunicator comm(MPI_COMM_WORLD, "world", 0);
  check_all_gather<float>(comm, 257, false, random_f32, 11);
  check_all_gather<int32_t>(comm, 33, false, random_i32, 13);
  check_all_gather<uint16_t>(comm, 1000, false, random_bf16, 15);
  check_all_gather<float>(comm, 257, true, random_f32, 17);
}

TEST(MpiCommunicator, BroadcastFromEveryRoot) {
  MpiCommunicator comm(MPI_COMM_WORLD, "world", 0);
  check_broadcast_from_every_root<float>(comm, 999, random_f32, 20);
  check_broadcast_from_every_root<int32_t>(comm, 10, random_i32, 40);
  check_broadcast_from_every_root<uint16_t>(comm, 500, random_bf16, 60);
}

TEST(MpiCommunicator, SendRecvRing) {
  MpiCommunicator comm(MPI_COMM_WORLD, "world", 0);
  if (comm.size() < 2) GTEST_SKIP() << "a ring needs at least 2 ranks, this run has 1";
  check_send_recv_ring(comm, 17, 80);
  check_send_recv_ring(comm, 200000, 81);  // 800 KB: past the eager limit, so sends wait for their recv
}

TEST(MpiCommunicator, RecvOfTheWrongSizeThrows) {
  MpiCommunicator comm(MPI_COMM_WORLD, "world", 0);
  if (comm.size() < 2) GTEST_SKIP() << "needs at least 2 ranks, this run has 1";
  std::vector<float> sent = random_f32(0, 10, 90);
  std::vector<float> received(12, 0.0f);
  bool threw = false;
  if (comm.rank() == 0) comm.send(host(sent), 1);
  if (comm.rank() == 1) {
    try {
      comm.recv(host(received), 0);
    } catch (const Error& e) {
      threw = e.kind() == ErrorKind::kComm && std::string(e.what()).find("received 10 elements") != std::string::npos;
      EXPECT_TRUE(threw) << e.what();
    }
  }
  EXPECT_EQ(threw, comm.rank() == 1);
}

TEST(MpiCommunicator, Barrier) {
  MpiCommunicator comm(MPI_COMM_WORLD, "world", 0);
  for (int i = 0; i < 3; ++i) comm.barrier();
  EXPECT_EQ(comm.trace().completed(), 3u);
}

TEST(MpiCommunicator, CommReducerAllReducesOverTheGroup) {
  MpiCommunicator comm(MPI_COMM_WORLD, "world", 0);
  CommReducer reducer(comm);
  GroupReducer& g = reducer;
  std::vector<float> sum = random_f32(comm.rank(), 50, 100);
  std::vector<float> max = random_f32(comm.rank(), 50, 101);
  g.all_reduce_sum(host(sum));
  g.all_reduce_max(host(max));
  auto want_sum = reduce_locally<float>(
      comm.size(), [](int r) { return random_f32(r, 50, 100); }, ReduceOp::kSum);
  auto want_max = reduce_locally<float>(
      comm.size(), [](int r) { return random_f32(r, 50, 101); }, ReduceOp::kMax);
  EXPECT_TRUE(same_values(sum, want_sum));
  EXPECT_TRUE(same_values(max, want_max));
}

// Lowers the chunk size for one test and restores it, on every rank alike.
class ChunkSizeForTest {
 public:
  explicit ChunkSizeForTest(int64_t n) { MpiCommunicator::set_max_chunk_elements_for_testing(n); }
  ~ChunkSizeForTest() { MpiCommunicator::set_max_chunk_elements_for_testing(0); }
};

TEST(MpiCommunicator, ChunkedPathsMatchWithASmallChunk) {
  MpiCommunicator comm(MPI_COMM_WORLD, "world", 0);
  ChunkSizeForTest chunk(7);
  ASSERT_EQ(MpiCommunicator::max_chunk_elements(), 7);
  // Sizes that are not multiples of the chunk, and one smaller than it.
  check_all_reduce<float>(comm, 50, ReduceOp::kSum, random_f32, 200);
  check_all_reduce<int32_t>(comm, 3, ReduceOp::kMax, random_i32, 201);
  check_reduce_scatter<float>(comm, 23, ReduceOp::kSum, false, random_f32, 202);
  check_reduce_scatter<int32_t>(comm, 23, ReduceOp::kMin, true, random_i32, 203);
  check_reduce_scatter<float>(comm, 2, ReduceOp::kMax, false, random_f32, 204);  // total over the chunk
  check_all_gather<float>(comm, 19, false, random_f32, 205);
  check_all_gather<uint16_t>(comm, 19, true, random_bf16, 207);
  check_broadcast_from_every_root<float>(comm, 30, random_f32, 210);
  if (comm.size() >= 2) check_send_recv_ring(comm, 45, 230);
}

TEST(MpiCommunicator, ChunkSizeSetterRestoresTheDefault) {
  { ChunkSizeForTest chunk(5); }
  EXPECT_EQ(MpiCommunicator::max_chunk_elements(), int64_t{INT32_MAX});
}

// Runs f, which must throw a loom::Error of this kind whose message holds every one of the substrings.
void expect_error(const std::function<void()>& f, ErrorKind kind, std::initializer_list<const char*> substrings,
                  const char* what) {
  try {
    f();
    ADD_FAILURE() << what << ": no error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << what << ": " << e.what();
    for (const char* s : substrings)
      EXPECT_NE(std::string(e.what()).find(s), std::string::npos) << what << ": '" << s << "' not in: " << e.what();
  }
}

TEST(MpiCommunicator, ArgumentErrorsThrowOnEveryRankWithoutCommunicating) {
  MpiCommunicator comm(MPI_COMM_WORLD, "world", 0);
  const int64_t p = comm.size();
  std::vector<float> big(static_cast<size_t>(4 * p + 1)), small(4);
  std::vector<int32_t> ints(static_cast<size_t>(4 * p));
  std::vector<uint16_t> halves(8);
  Tensor in = host(big).flat_range(0, 4 * p);

  expect_error([&] { comm.reduce_scatter(host(small).flat_range(0, 3), in, ReduceOp::kSum); }, ErrorKind::kShape,
               {"reduce_scatter", "'out'", "3 elements"}, "reduce_scatter with a short out");
  if (p > 1) {
    expect_error([&] { comm.reduce_scatter(host(small), host(big), ReduceOp::kSum); }, ErrorKind::kShape,
                 {"reduce_scatter", "'in'", "do not split evenly"}, "reduce_scatter of an uneven in");
  }
  expect_error([&] { comm.reduce_scatter(host(small), host(ints), ReduceOp::kSum); }, ErrorKind::kShape,
               {"reduce_scatter", "'out'", "dtype"}, "reduce_scatter with mixed dtypes");
  expect_error([&] { comm.all_gather(host(big), host(small)); }, ErrorKind::kShape, {"all_gather", "'out'"},
               "all_gather with a long out");
  if (p > 1) {
    // in overlapping out, but not at this rank's block
    Tensor wrong_block = in.flat_range(((comm.rank() + 1) % p) * 4, ((comm.rank() + 1) % p) * 4 + 4);
    expect_error([&] { comm.all_gather(in, wrong_block); }, ErrorKind::kComm, {"all_gather", "overlap"},
                 "all_gather with in at another rank's block");
  }
  expect_error([&] { comm.broadcast(host(small), comm.size()); }, ErrorKind::kComm, {"broadcast", "root"},
               "broadcast from a root past the group");
  expect_error([&] { comm.broadcast(host(small), -1); }, ErrorKind::kComm, {"broadcast", "root -1"},
               "broadcast from a negative root");
  expect_error([&] { comm.send(host(small), comm.rank()); }, ErrorKind::kComm, {"send", "this rank"}, "send to itself");
  expect_error([&] { comm.recv(host(small), comm.size()); }, ErrorKind::kComm, {"recv", "peer"},
               "recv from a peer past the group");
  expect_error([&] { comm.all_reduce(host(halves), ReduceOp::kSum); }, ErrorKind::kComm,
               {"all_reduce", "bf16", "not supported on the MPI communicator"}, "all_reduce of bf16");
  expect_error(
      [&] { comm.reduce_scatter(host(halves).flat_range(0, 0), host(halves).flat_range(0, 0), ReduceOp::kMax); },
      ErrorKind::kComm, {"reduce_scatter", "not supported on the MPI communicator"}, "reduce_scatter of bf16");
  float device_word = 0;
  Tensor on_gpu(&device_word, Shape{1}, DType::kF32, Device::kCuda);
  expect_error([&] { comm.all_reduce(on_gpu, ReduceOp::kSum); }, ErrorKind::kComm, {"all_reduce", "cuda memory"},
               "all_reduce of a tensor on the GPU");
  Tensor null_tensor(nullptr, Shape{4}, DType::kF32, Device::kCpu);
  expect_error([&] { comm.broadcast(null_tensor, 0); }, ErrorKind::kShape, {"broadcast", "null tensor"},
               "broadcast of a null tensor");

  EXPECT_EQ(comm.trace().launched(), 0u) << "a call that fails its argument checks must not start";
  EXPECT_EQ(count_ranks(!HasFailure()), comm.size()) << "every rank must have thrown the same errors";
}

TEST(MpiCommunicator, MpiErrorsBecomeExceptions) {
  // The communicator's duplicate returns errors (MPI_ERRORS_RETURN) instead of aborting, and LOOM_MPI_CHECK
  // turns them into kComm errors that name the call. An invalid root is caught by MPI's argument checks on
  // every rank before any message moves.
  MpiCommunicator comm(MPI_COMM_WORLD, "world", 0);
  int word = 0;
  expect_error([&] { LOOM_MPI_CHECK(MPI_Bcast(&word, 1, MPI_INT, comm.size(), comm.comm())); }, ErrorKind::kComm,
               {"MPI_Bcast", "failed", "code"}, "MPI_Bcast with an invalid root");
}

TEST(MpiCommunicator, TraceRecordsEveryCall) {
  MpiCommunicator comm(MPI_COMM_WORLD, "world", 5);
  const int64_t p = comm.size();
  std::vector<float> a = random_f32(comm.rank(), 10, 300), in = random_f32(comm.rank(), 2 * p, 301), out(2);
  std::vector<float> gathered(static_cast<size_t>(3 * p)), part = random_f32(comm.rank(), 3, 302);
  comm.all_reduce(host(a), ReduceOp::kSum);
  comm.reduce_scatter(host(out), host(in), ReduceOp::kSum);
  comm.all_gather(host(gathered), host(part));
  comm.broadcast(host(a), 0);
  struct Want {
    CollectiveOp op;
    int32_t peer;
    uint64_t bytes;
  };
  std::vector<Want> want = {{CollectiveOp::kAllReduce, -1, 40},
                            {CollectiveOp::kReduceScatter, -1, static_cast<uint64_t>(8 * p)},
                            {CollectiveOp::kAllGather, -1, static_cast<uint64_t>(12 * p)},
                            {CollectiveOp::kBroadcast, -1, 40}};
  if (p >= 2) {
    const int next = static_cast<int>((comm.rank() + 1) % p), prev = static_cast<int>((comm.rank() + p - 1) % p);
    std::vector<float> msg = random_f32(comm.rank(), 5, 303), got(5);
    if (comm.rank() % 2 == 0) {
      comm.send(host(msg), next);
      comm.recv(host(got), prev);
      want.push_back({CollectiveOp::kSend, next, 20});
      want.push_back({CollectiveOp::kRecv, prev, 20});
    } else {
      comm.recv(host(got), prev);
      comm.send(host(msg), next);
      want.push_back({CollectiveOp::kRecv, prev, 20});
      want.push_back({CollectiveOp::kSend, next, 20});
    }
  }
  comm.barrier();
  want.push_back({CollectiveOp::kBarrier, -1, 0});

  const TraceRing& trace = comm.trace();
  EXPECT_EQ(trace.launched(), want.size());
  EXPECT_EQ(trace.completed(), want.size());
  std::vector<TraceRecord> records = trace.snapshot();
  ASSERT_EQ(records.size(), want.size());
  for (size_t i = 0; i < records.size(); ++i) {
    const TraceRecord& r = records[i];
    EXPECT_EQ(r.seq, i);
    EXPECT_EQ(r.op, want[i].op) << "record " << i << " is " << collective_op_name(r.op) << ", expected "
                                << collective_op_name(want[i].op);
    EXPECT_EQ(r.group_id, 5u) << "record " << i;
    EXPECT_EQ(r.peer, want[i].peer) << "record " << i;
    EXPECT_EQ(r.bytes, want[i].bytes) << "record " << i << " (" << collective_op_name(r.op) << ")";
    EXPECT_GT(r.end_s, 0.0) << "record " << i << " still in flight";
    EXPECT_LE(r.start_s, r.end_s) << "record " << i;
    if (i > 0) {
      EXPECT_LE(records[i - 1].end_s, r.start_s) << "records " << i - 1 << " and " << i << " overlap";
    }
  }
  std::vector<TraceRecord> tail = trace.snapshot(want.size() - 2);
  ASSERT_EQ(tail.size(), 2u);
  EXPECT_EQ(tail[0].seq, want.size() - 2);
  EXPECT_TRUE(trace.snapshot(want.size()).empty());
}

TEST(TraceRing, KeepsTheNewestRecordsAndCountsAll) {
  TraceRing ring(8);
  EXPECT_EQ(ring.capacity(), 8u);
  for (uint64_t i = 0; i < 20; ++i) {
    uint64_t seq = ring.begin(CollectiveOp::kAllReduce, 1, -1, 100 + i);
    EXPECT_EQ(seq, i);
    ring.end(seq);
  }
  uint64_t open = ring.begin(CollectiveOp::kSend, 2, 3, 7);  // stays in flight
  EXPECT_EQ(ring.launched(), 21u);
  EXPECT_EQ(ring.completed(), 20u);

  std::vector<TraceRecord> all = ring.snapshot(0);
  ASSERT_EQ(all.size(), 8u);
  for (size_t i = 0; i < all.size(); ++i) {
    EXPECT_EQ(all[i].seq, 13 + i);
    if (all[i].seq < 20) {
      EXPECT_EQ(all[i].bytes, 100 + all[i].seq);
      EXPECT_GE(all[i].end_s, all[i].start_s);
      EXPECT_GT(all[i].end_s, 0.0);
    }
  }
  EXPECT_EQ(all.back().seq, open);
  EXPECT_EQ(all.back().op, CollectiveOp::kSend);
  EXPECT_EQ(all.back().peer, 3);
  EXPECT_EQ(all.back().end_s, 0.0) << "an in-flight record has no end time";

  std::vector<TraceRecord> since = ring.snapshot(18);
  ASSERT_EQ(since.size(), 3u);
  EXPECT_EQ(since.front().seq, 18u);
  EXPECT_TRUE(ring.snapshot(21).empty());

  ring.end(open, 0.0);  // an end time before the start is clamped to the start
  EXPECT_EQ(ring.snapshot(open)[0].end_s, ring.snapshot(open)[0].start_s);
  EXPECT_EQ(ring.completed(), 21u);
}

// Device-timed records: ended by another thread with the device's start and end. The start moves forward to the
// device's (never back before the enqueue), busy_s counts the device span, and the thread that begins the
// records is the ring's writer, with nothing inside (it never waits in these calls).
TEST(TraceRing, DeviceTimedRecordsTakeTheDeviceTimesAndTheBeginningThreadAsWriter) {
  TraceRing ring(8);
  ring.set_device_timed(true);
  const uint64_t a = ring.begin(CollectiveOp::kAllReduce, 1, -1, 64);
  const double enqueued = ring.snapshot(a)[0].start_s;
  const uint64_t b = ring.begin(CollectiveOp::kAllReduce, 1, -1, 64);
  std::thread side([&] {
    ring.end(a, enqueued + 0.5, enqueued + 0.75);
    ring.end(b, enqueued - 1.0, enqueued + 1.0);  // a device start before the enqueue: the enqueue stands
  });
  side.join();
  const std::vector<TraceRecord> r = ring.snapshot();
  ASSERT_EQ(r.size(), 2u);
  EXPECT_DOUBLE_EQ(r[0].start_s, enqueued + 0.5);
  EXPECT_DOUBLE_EQ(r[0].end_s, enqueued + 0.75);
  EXPECT_EQ(r[1].start_s, ring.snapshot(b)[0].start_s);
  EXPECT_GE(r[1].start_s, enqueued);
  EXPECT_NEAR(ring.busy_s(), 0.25 + (enqueued + 1.0 - r[1].start_s), 1e-9);
  EXPECT_EQ(ring.writer_tid(), static_cast<int>(::syscall(SYS_gettid))) << "the beginning thread";
  EXPECT_EQ(ring.run_delay_inside_s(), 0.0);
  std::thread other([&] { ring.begin(CollectiveOp::kBarrier, 1, -1, 0); });
  other.join();
  EXPECT_EQ(ring.writer_tid(), -1) << "records begun by two threads: no writer";
}

TEST(TraceRing, RejectsMisuse) {
  expect_error([] { TraceRing ring(0); }, ErrorKind::kConfig, {"capacity"}, "a ring of no records");
  TraceRing ring(4);
  expect_error([&] { ring.end(0); }, ErrorKind::kInternal, {"end()"}, "ending a record that never began");
  uint64_t seq = ring.begin(CollectiveOp::kBarrier, 0, -1, 0);
  ring.end(seq);
  expect_error([&] { ring.end(seq); }, ErrorKind::kInternal, {"ended twice"}, "ending a record twice");
}

TEST(TraceRing, CountsTheWritersRunQueueDelayInsideHostTimedCalls) {
  const double before = thread_run_delay_s();
  if (before < 0) GTEST_SKIP() << "this kernel does not report run-queue delay (/proc/thread-self/schedstat)";
  const int tid = static_cast<int>(::syscall(SYS_gettid));
  EXPECT_GE(thread_run_delay_s(tid), before) << "the same thread's counter read by its id";
  EXPECT_LE(thread_run_delay_s(tid), thread_run_delay_s() + 1e-9);
  EXPECT_LT(thread_run_delay_s(-5), 0) << "no such thread";
  TraceRing ring(4);
  // Off by default (only the monitor client turns it on): no reads, but the writer is known.
  ASSERT_FALSE(run_delay_accounting());
  TraceRing quiet(4);
  std::atomic<bool> stop{false};
  std::vector<std::thread> spinners;
  auto spin = [&] {
    for (unsigned i = 0; i < 2 * std::max(1u, std::thread::hardware_concurrency()); ++i)
      spinners.emplace_back([&] {
        while (!stop.load(std::memory_order_relaxed)) {
        }
      });
  };
  auto unspin = [&] {
    stop = true;
    for (auto& t : spinners) t.join();
    spinners.clear();
    stop = false;
  };
  spin();
  int quiet_writer = 0;
  std::thread([&] {
    quiet_writer = static_cast<int>(::syscall(SYS_gettid));
    const uint64_t seq = quiet.begin(CollectiveOp::kAllReduce, 1, -1, 4);
    const auto t0 = std::chrono::steady_clock::now();
    while (std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(100)) {
    }
    quiet.end(seq);
  }).join();
  unspin();
  EXPECT_EQ(quiet.writer_tid(), quiet_writer);
  EXPECT_EQ(quiet.run_delay_inside_s(), 0.0) << "a call begun with accounting off is not read";
  set_run_delay_accounting(true);
  struct Off {
    ~Off() { set_run_delay_accounting(false); }
  } off;
  // On its own thread (whose schedstat is not the process's): a call open for 300 ms of spinning while more
  // spinning threads than cores run. The thread never sleeps, so its run-queue delay inside the call is the
  // call's wall time minus its CPU time.
  spin();
  double wall = 0, cpu = 0;
  int writer = 0;
  std::thread([&] {
    writer = static_cast<int>(::syscall(SYS_gettid));
    auto cpu_s = [] {
      timespec ts{};
      ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
      return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
    };
    const double c0 = cpu_s();
    const auto t0 = std::chrono::steady_clock::now();
    const uint64_t seq = ring.begin(CollectiveOp::kAllReduce, 1, -1, 4);
    while (std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(300)) {
    }
    ring.end(seq);
    wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    cpu = cpu_s() - c0;
  }).join();
  // The switch is read at begin(): a call begun with the reads on and ended after they were switched off is
  // counted; one begun with them off and ended after they were switched on is not.
  TraceRing toggled(4);
  double after_on_off = 0, after_off_on = 0;
  std::thread([&] {
    auto spin_call = [&](bool on_at_end) {
      const uint64_t seq = toggled.begin(CollectiveOp::kAllReduce, 1, -1, 4);
      set_run_delay_accounting(on_at_end);
      const auto t0 = std::chrono::steady_clock::now();
      while (std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(150)) {
      }
      toggled.end(seq);
    };
    spin_call(false);  // begun on (set above), ended off
    after_on_off = toggled.run_delay_inside_s();
    spin_call(true);  // begun off, ended on
    after_off_on = toggled.run_delay_inside_s();
  }).join();
  unspin();
  EXPECT_GT(after_on_off, 0.01) << "a call begun with the reads on is counted";
  EXPECT_EQ(after_off_on, after_on_off) << "a call begun with the reads off is not";
  EXPECT_GT(toggled.writer_tid(), 0);
  EXPECT_EQ(ring.writer_tid(), writer);
  EXPECT_GT(ring.run_delay_inside_s(), 0.02) << "the call waited for a CPU while the spinners ran";
  EXPECT_NEAR(ring.run_delay_inside_s(), wall - cpu, 0.03) << "wall " << wall << " s, CPU " << cpu << " s";
  // A call ended on another thread than the one that began it: the ring has no single writer any more.
  const uint64_t seq = ring.begin(CollectiveOp::kAllReduce, 1, -1, 4);
  std::thread([&] { ring.end(seq); }).join();
  EXPECT_EQ(ring.writer_tid(), -1);
  // Calls closed with an explicit time (GPU events read by another thread) are not host-timed.
  TraceRing gpu(4);
  gpu.end(gpu.begin(CollectiveOp::kAllReduce, 1, -1, 4), 1.0);
  EXPECT_EQ(gpu.writer_tid(), 0);
  EXPECT_EQ(gpu.run_delay_inside_s(), 0.0);
}

TEST(Names, OfOpsAreTheCallNames) {
  EXPECT_STREQ(collective_op_name(CollectiveOp::kAllReduce), "all_reduce");
  EXPECT_STREQ(collective_op_name(CollectiveOp::kReduceScatter), "reduce_scatter");
  EXPECT_STREQ(collective_op_name(CollectiveOp::kAllGather), "all_gather");
  EXPECT_STREQ(collective_op_name(CollectiveOp::kBroadcast), "broadcast");
  EXPECT_STREQ(collective_op_name(CollectiveOp::kSend), "send");
  EXPECT_STREQ(collective_op_name(CollectiveOp::kRecv), "recv");
  EXPECT_STREQ(collective_op_name(CollectiveOp::kBarrier), "barrier");
  EXPECT_STREQ(reduce_op_name(ReduceOp::kSum), "sum");
  EXPECT_STREQ(reduce_op_name(ReduceOp::kMax), "max");
  EXPECT_STREQ(reduce_op_name(ReduceOp::kMin), "min");
}

}  // namespace
}  // namespace loom
