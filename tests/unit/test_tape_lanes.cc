// The tape's lanes and side nodes (the token-split overlap, core/tape.h): the order backward() runs a run of
// lane nodes in, gradients through two lanes with side nodes (finite differences), and concat_rows.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/backend.h"
#include "core/error.h"
#include "core/gradcheck.h"
#include "core/ops.h"
#include "parallel/fused_norm.h"
#include "tests/unit/test_helpers.h"

namespace loom {
namespace {

using test::HostTensor;

class TapeLanes : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> cpu = make_cpu_backend({1});
};

TEST_F(TapeLanes, BackwardTakesEachLaneInReverseAndSwitchesAfterSideNodes) {
  ActivationArena arena(*cpu);
  Tape tape(arena, nullptr);
  std::vector<std::string> ran;
  // Forward order as the GPT model records it: per sub-layer, half 1's compute then its communication (a side
  // node), then half 2's; shared work before and after; then a second run of lanes after a shared node (the runs
  // are scheduled separately).
  struct Recorded {
    int lane;
    const char* name;
    bool side;
  };
  const Recorded order[] = {{0, "pre", false}, {1, "c1a", false}, {1, "m1a", true},   {2, "c2a", false},
                            {2, "m2a", true},  {1, "c1b", false}, {1, "m1b", true},   {2, "c2b", false},
                            {2, "m2b", true},  {0, "post", false}, {1, "c1c", false}, {2, "c2c", false}};
  for (const Recorded& r : order) {
    tape.set_lane(r.lane);
    auto node = [&ran, name = r.name](Tape&) { ran.emplace_back(name); };
    if (r.side) {
      tape.record_side(node);
    } else {
      tape.record(node);
    }
  }
  tape.set_lane(0);
  Tensor seed_src = arena.allocate(Shape{1}, DType::kF32);
  Tensor out = tape.track(seed_src);
  cpu->fill(seed_src, 1.0f);
  tape.backward_from(out, seed_src);
  // Lane 2 recorded last, so it starts; each lane's communication is enqueued before the other lane's compute
  // of the same depth, which it then overlaps.
  const std::vector<std::string> expect = {"c2c", "c1c", "post", "m2b", "m1b", "c2b", "m2a",
                                           "c1b", "m1a", "c2a", "c1a", "pre"};
  EXPECT_EQ(ran, expect);
  EXPECT_THROW(tape.set_lane(-1), Error);
}

TEST_F(TapeLanes, TwoHalvesWithSideNodesGetTheGradientsOfTheWhole) {
  // Each half of x: a linear layer, then the fused add + norm (no group: no communication) with its backward as
  // a side node, twice, in lanes 1 and 2 as the GPT model interleaves them; then concatenated.
  auto x = HostTensor::randn({5, 6}, 31), w1 = HostTensor::randn({6, 6}, 32, 0.5f),
       w2 = HostTensor::randn({6, 6}, 33, 0.5f), g = HostTensor::randn({6}, 34, 0.3f);
  for (float& v : g.f) v += 1.0f;
  auto r = check_gradients(
      *cpu,
      [](Ctx& c, const std::vector<Tensor>& in) {
        Tensor n[2] = {in[0].rows(0, 3), in[0].rows(3, 5)};
        Tensor res[2] = {n[0], n[1]};
        for (const Tensor& w : {in[1], in[2]}) {
          for (int k = 0; k < 2; ++k) {
            if (c.tape()) c.tape()->set_lane(k + 1);
            auto out = ops::fused_allreduce_add_rmsnorm(c, ops::linear(c, n[k], w), res[k], in[3], 1e-5f, nullptr,
                                                        /*side=*/true);
            c.backend().join_side(out.ready);
            n[k] = out.normed;
            res[k] = out.residual;
          }
        }
        if (c.tape()) c.tape()->set_lane(0);
        return ops::add(c, ops::concat_rows(c, {n[0], n[1]}), ops::concat_rows(c, {res[0], res[1]}));
      },
      {x.t, w1.t, w2.t, g.t});
  EXPECT_TRUE(r.ok) << r.summary;
  EXPECT_GT(r.checked, 0);
}

TEST_F(TapeLanes, ConcatRowsStacksPartsAndSplitsTheGradient) {
  auto a = HostTensor::randn({2, 3, 4}, 41), b = HostTensor::randn({1, 3, 4}, 42), w = HostTensor::randn({4, 4}, 43);
  auto r = check_gradients(*cpu,
                           [](Ctx& c, const std::vector<Tensor>& in) {
                             return ops::linear(c, ops::concat_rows(c, {in[0], ops::scale(c, in[1], 2.0f)}), in[2]);
                           },
                           {a.t, b.t, w.t});
  EXPECT_TRUE(r.ok) << r.summary;
  // Values: the rows of a, then those of b.
  ActivationArena arena(*cpu);
  Ctx c(*cpu, arena, nullptr);
  Tensor y = ops::concat_rows(c, {a.t, b.t});
  ASSERT_EQ(y.shape(), (Shape{3, 3, 4}));
  for (int64_t i = 0; i < 24; ++i) EXPECT_EQ(y.ptr<float>()[i], a.f[static_cast<size_t>(i)]);
  for (int64_t i = 0; i < 12; ++i) EXPECT_EQ(y.ptr<float>()[24 + i], b.f[static_cast<size_t>(i)]);
  // Parts must agree beyond dimension 0.
  auto odd = HostTensor::randn({1, 4, 3}, 44);
  EXPECT_THROW(ops::concat_rows(c, {a.t, odd.t}), Error);
  EXPECT_THROW(ops::concat_rows(c, {}), Error);
}

}  // namespace
}  // namespace loom
