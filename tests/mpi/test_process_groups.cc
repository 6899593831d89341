// ProcessGroups: the DP x TP layout (TP contiguous), emulated and real nodes, the group communicators (who is
// in each, and that their all-reduces sum exactly those ranks), and bad layouts failing with the same kConfig
// error on every rank instead of hanging one of them.
// The layouts are written for 4 ranks: mpirun --oversubscribe -np 4 ./test_process_groups.
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "parallel/process_groups.h"
#include "tests/mpi/mpi_test_util.h"

namespace loom {
namespace {

using test::count_ranks;
using test::world_rank;
using test::world_size;

constexpr uint64_t kSeed = 777;

// The world ranks of a group's members, in group-rank order (through the group's own all_gather).
std::vector<int32_t> members(Communicator& group, int world_rank) {
  std::vector<int32_t> mine = {world_rank};
  std::vector<int32_t> all(static_cast<size_t>(group.size()));
  group.all_gather(Tensor(all.data(), Shape{group.size()}, DType::kI32, Device::kCpu),
                   Tensor(mine.data(), Shape{1}, DType::kI32, Device::kCpu));
  return all;
}

std::vector<int32_t> range(int32_t first, int32_t count, int32_t step) {
  std::vector<int32_t> v;
  for (int32_t i = 0; i < count; ++i) v.push_back(first + i * step);
  return v;
}

std::string str(const std::vector<int32_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// Random multiples of 1/64 (exact sums), a pure function of the world rank.
std::vector<float> input_of(int world_rank, int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    v[static_cast<size_t>(i)] =
        static_cast<float>(
            static_cast<int>(random_uniform(kSeed, static_cast<uint64_t>(world_rank), static_cast<uint64_t>(i)) *
                             1024.0) -
            512) /
        64.0f;
  return v;
}

// Sums input_of(r) over the group by all_reduce and checks it against the local sum over expected_members.
void expect_group_sum(Communicator& group, int world_rank, const std::vector<int32_t>& expected_members) {
  const int64_t n = 129;
  std::vector<float> t = input_of(world_rank, n);
  group.all_reduce(Tensor(t.data(), Shape{n}, DType::kF32, Device::kCpu), ReduceOp::kSum);
  std::vector<float> want(static_cast<size_t>(n), 0.0f);
  for (int32_t r : expected_members) {
    std::vector<float> x = input_of(r, n);
    for (size_t i = 0; i < want.size(); ++i) want[i] += x[i];
  }
  int64_t mismatches = 0;
  std::string first;
  for (size_t i = 0; i < want.size(); ++i) {
    if (t[i] == want[i]) continue;
    if (mismatches++ < 5)
      first += "\n  [" + std::to_string(i) + "] got " + std::to_string(t[i]) + ", expected " + std::to_string(want[i]);
  }
  EXPECT_EQ(mismatches, 0) << "all_reduce over '" << group.name() << "' is not the sum over world ranks "
                           << str(expected_members) << "; first mismatches:" << first;
}

class ProcessGroupsOf4 : public testing::Test {
 protected:
  void SetUp() override {
    if (world_size() != 4)
      GTEST_SKIP() << "the layouts of this test are written for 4 ranks, this run has " << world_size();
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  }
  int rank_ = 0;
};

TEST_F(ProcessGroupsOf4, TensorParallelLayouts) {
  for (int tp : {1, 2, 4}) {
    auto g = ProcessGroups::create(MPI_COMM_WORLD, ParallelConfig{tp, 4});
    const int dp = 4 / tp;
    EXPECT_EQ(g->rank(), rank_);
    EXPECT_EQ(g->world_size(), 4);
    EXPECT_EQ(g->tp_size(), tp) << "tp " << tp;
    EXPECT_EQ(g->dp_size(), dp) << "tp " << tp;
    EXPECT_EQ(g->tp_rank(), rank_ % tp) << "tp " << tp;
    EXPECT_EQ(g->dp_rank(), rank_ / tp) << "tp " << tp;
    // TP groups are runs of consecutive ranks; DP groups take one rank of each TP group.
    EXPECT_EQ(members(g->tp(), rank_), range(rank_ / tp * tp, tp, 1)) << "tp " << tp;
    EXPECT_EQ(members(g->dp(), rank_), range(rank_ % tp, dp, tp)) << "tp " << tp;
    EXPECT_EQ(members(g->world(), rank_), range(0, 4, 1)) << "tp " << tp;
    EXPECT_EQ(g->describe(),
              "world 4 = dp " + std::to_string(dp) + " x tp " + std::to_string(tp) + ", 1 node (emulated, 4 ranks)");
  }
}

TEST_F(ProcessGroupsOf4, AllReduceOverTpAndDpSumsTheirRanks) {
  auto g = ProcessGroups::create(MPI_COMM_WORLD, ParallelConfig{2, 2});
  expect_group_sum(g->tp(), rank_, range(rank_ / 2 * 2, 2, 1));
  expect_group_sum(g->dp(), rank_, range(rank_ % 2, 2, 2));
  expect_group_sum(g->node(), rank_, range(rank_ / 2 * 2, 2, 1));
  expect_group_sum(g->world(), rank_, range(0, 4, 1));
}

TEST_F(ProcessGroupsOf4, EmulatedNodesOfTwo) {
  for (int tp : {1, 2}) {
    auto g = ProcessGroups::create(MPI_COMM_WORLD, ParallelConfig{tp, 2});
    EXPECT_TRUE(g->emulated_nodes());
    EXPECT_EQ(g->num_nodes(), 2);
    EXPECT_EQ(g->node_id(), rank_ / 2);
    EXPECT_EQ(g->local_rank(), rank_ % 2);
    EXPECT_EQ(g->local_size(), 2);
    EXPECT_EQ(members(g->node(), rank_), range(rank_ / 2 * 2, 2, 1)) << "tp " << tp;
    EXPECT_EQ(g->describe(), "world 4 = dp " + std::to_string(4 / tp) + " x tp " + std::to_string(tp) +
                                 ", 2 nodes (emulated, 2 ranks each)");
  }
  auto single = ProcessGroups::create(MPI_COMM_WORLD, ParallelConfig{1, 1});
  EXPECT_EQ(single->num_nodes(), 4);
  EXPECT_EQ(single->node_id(), rank_);
  EXPECT_EQ(single->local_rank(), 0);
  EXPECT_EQ(single->local_size(), 1);
}

TEST_F(ProcessGroupsOf4, GroupNamesAndTraceIds) {
  auto g = ProcessGroups::create(MPI_COMM_WORLD, ParallelConfig{2, 2});
  struct Want {
    Communicator* comm;
    const char* name;
    uint32_t id;
  };
  for (const Want& w : {Want{&g->world(), "world", kWorldGroupId}, Want{&g->tp(), "tp", kTpGroupId},
                        Want{&g->dp(), "dp", kDpGroupId}, Want{&g->node(), "node", kNodeGroupId}}) {
    EXPECT_EQ(w.comm->name(), w.name);
    EXPECT_EQ(w.comm->group_id(), w.id) << w.name;
    uint64_t before = w.comm->trace().launched();
    w.comm->barrier();
    std::vector<TraceRecord> records = w.comm->trace().snapshot(before);
    ASSERT_EQ(records.size(), 1u) << w.name;
    EXPECT_EQ(records[0].group_id, w.id) << w.name;
    EXPECT_EQ(records[0].op, CollectiveOp::kBarrier) << w.name;
  }
  EXPECT_EQ(kWorldGroupId, 0u);
  EXPECT_EQ(kTpGroupId, 1u);
  EXPECT_EQ(kDpGroupId, 2u);
  EXPECT_EQ(kNodeGroupId, 3u);
}

// Creating the groups with cfg must throw a kConfig error holding `message` — on every rank.
void expect_config_error_everywhere(const ParallelConfig& cfg, const std::string& message) {
  bool got = false;
  std::string what = "no error";
  try {
    ProcessGroups::create(MPI_COMM_WORLD, cfg);
  } catch (const Error& e) {
    what = e.what();
    got = e.kind() == ErrorKind::kConfig && what.find(message) != std::string::npos;
  }
  EXPECT_TRUE(got) << "tp " << cfg.tp << ", ranks_per_node " << cfg.ranks_per_node << ": expected a config error '"
                   << message << "', got: " << what;
  EXPECT_EQ(count_ranks(got), world_size())
      << "tp " << cfg.tp << ", ranks_per_node " << cfg.ranks_per_node << ": not every rank got the error";
}

TEST_F(ProcessGroupsOf4, InvalidLayoutsFailOnEveryRank) {
  expect_config_error_everywhere({3, 0}, "--tp 3 does not divide the world size 4");
  expect_config_error_everywhere({4, 2}, "tensor-parallel size 4 does not fit in emulated nodes of 2 ranks");
  expect_config_error_everywhere({1, 3}, "--ranks-per-node 3 does not divide the world size 4");
  expect_config_error_everywhere({0, 0}, "(--tp) must be at least 1, got 0");
  expect_config_error_everywhere({1, -1}, "--ranks-per-node must be 0 (real nodes) or positive");
  // Still usable afterwards: nothing was left half-created or waiting.
  auto g = ProcessGroups::create(MPI_COMM_WORLD, ParallelConfig{2, 2});
  expect_group_sum(g->tp(), rank_, range(rank_ / 2 * 2, 2, 1));
}

TEST_F(ProcessGroupsOf4, RanksThatDisagreeAllFail) {
  expect_config_error_everywhere({rank_ == 0 ? 2 : 1, 0},
                                 "ranks disagree on the tensor-parallel size (--tp): from 1 to 2");
  expect_config_error_everywhere({1, rank_ == 3 ? 4 : 2}, "ranks disagree on --ranks-per-node: from 2 to 4");
}

// Real nodes: whatever machines this runs on, the layout must be consistent (equal nodes of consecutive ranks,
// numbered by their lowest rank) and agree with what the launcher says.
TEST(ProcessGroups, RealNodesAreConsistent) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  auto g = ProcessGroups::create(MPI_COMM_WORLD, ParallelConfig{1, 0});
  EXPECT_FALSE(g->emulated_nodes());
  EXPECT_EQ(g->num_nodes() * g->local_size(), world_size());
  std::vector<int32_t> node = members(g->node(), rank);
  EXPECT_EQ(node, range(node[0], g->local_size(), 1)) << "the ranks of a node must be consecutive";
  EXPECT_EQ(g->local_rank(), rank - node[0]);
  EXPECT_EQ(g->node_id(), node[0] / g->local_size());
  std::string want = "world " + std::to_string(world_size()) + " = dp " + std::to_string(world_size()) + " x tp 1, ";
  EXPECT_EQ(g->describe().rfind(want, 0), 0u) << g->describe();
  EXPECT_EQ(g->describe().find("emulated"), std::string::npos) << g->describe();
}

TEST(ProcessGroups, DetectLocalRankMatchesTheRealNodeLayout) {
  auto g = ProcessGroups::create(MPI_COMM_WORLD, ParallelConfig{1, 0});
  int detected = detect_local_rank();
  bool known = count_ranks(detected >= 0) == world_size();
  if (!known) GTEST_SKIP() << "the launcher sets none of the local-rank variables detect_local_rank() reads";
  EXPECT_EQ(detected, g->local_rank());
}

}  // namespace
}  // namespace loom
