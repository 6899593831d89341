// Parameter arena: names, grouping and padding of the layout, initialisation that is the same full tensor for
// any tensor-parallel split, shard extraction, loading by name, and the Module API's name rules.
#include <gtest/gtest.h>

#include "core/backend.h"
#include "core/error.h"
#include "core/layers.h"
#include "core/param_arena.h"
#include "tests/unit/test_helpers.h"

namespace loom {
namespace {

class Toy : public Module {
 public:
  explicit Toy(TpSplit col = {}, TpSplit row = {})
      : norm_(register_module<RMSNorm>("norm", 6)),
        up_(register_parameter("up", Shape{8, 6}, InitSpec::normal(1.0f), {col})),
        down_(register_parameter("down", Shape{6, 8}, InitSpec::normal(1.0f), {row})),
        bias_(register_parameter("bias", Shape{8}, InitSpec::normal(0.5f), {col, 0})) {
    register_module<ModuleList>("layers").append<Linear>(6, 6);
  }
  RMSNorm& norm_;
  Parameter& up_;
  Parameter& down_;
  Parameter& bias_;
};

TEST(ParamArena, NamesGroupsAndPadding) {
  auto cpu = make_cpu_backend({1});
  Toy toy(TpSplit{0, 1, 2}, TpSplit{1, 1, 2});
  ParameterArena arena(*cpu, {DType::kF32, 3, 7});
  arena.finalize(toy);
  std::vector<std::string> names;
  for (auto& e : arena.layout()) names.push_back(e.name);
  // Sharded+decayed (up, down), sharded+no decay (bias), replicated+decayed (layers.0.weight), replicated+no decay.
  std::vector<std::string> expect = {"up", "down", "bias", "layers.0.weight", "norm.weight"};
  EXPECT_EQ(names, expect);
  EXPECT_EQ(arena.padded_numel() % (128 * 3), 0);
  for (auto& e : arena.layout()) EXPECT_EQ(e.offset % ParameterArena::kParamAlign, 0) << e.name;
  EXPECT_EQ(arena.layout()[0].local_shape, (Shape{4, 6}));
  EXPECT_EQ(arena.layout()[1].local_shape, (Shape{6, 4}));
  ASSERT_EQ(arena.groups().size(), 4u);
  EXPECT_TRUE(arena.groups()[0].weight_decay);
  EXPECT_FALSE(arena.groups()[0].tp_replicated);
  EXPECT_FALSE(arena.groups()[1].weight_decay);
  EXPECT_TRUE(arena.groups()[3].tp_replicated);
  EXPECT_EQ(arena.numel(), 4 * 6 + 6 * 4 + 4 + 36 + 6);
  EXPECT_EQ(toy.up_.name(), "up");
  EXPECT_EQ(toy.norm_.weight().name(), "norm.weight");
}

TEST(ParamArena, InitIsTheSameFullTensorForAnyTpSplit) {
  auto cpu = make_cpu_backend({1});
  Toy full;
  ParameterArena a1(*cpu, {DType::kF32, 1, 99});
  a1.finalize(full);
  const auto up_full = a1.read_master("up"), down_full = a1.read_master("down"), bias_full = a1.read_master("bias");
  for (int tp : {2, 4}) {
    std::vector<float> up(48), down(48), bias(8);
    for (int r = 0; r < tp; ++r) {
      Toy part(TpSplit{0, r, tp}, TpSplit{1, r, tp});
      ParameterArena a(*cpu, {DType::kF32, 1, 99});
      a.finalize(part);
      insert_shard(a.read_master("up").data(), Shape{8, 6}, TpSplit{0, r, tp}, up.data());
      insert_shard(a.read_master("down").data(), Shape{6, 8}, TpSplit{1, r, tp}, down.data());
      insert_shard(a.read_master("bias").data(), Shape{8}, TpSplit{0, r, tp}, bias.data());
    }
    EXPECT_EQ(up, up_full) << "tp " << tp;
    EXPECT_EQ(down, down_full) << "tp " << tp;
    EXPECT_EQ(bias, bias_full) << "tp " << tp;
  }
  // Normal init really is random with the requested scale, and norm weights start at one.
  double s2 = 0;
  for (float v : up_full) s2 += v * v;
  EXPECT_NEAR(std::sqrt(s2 / 48), 1.0, 0.35);
  for (float v : a1.read_master("norm.weight")) EXPECT_EQ(v, 1.0f);
}

TEST(ParamArena, ComputeWeightsFollowMasterAndGradsStartAtZero) {
  auto cpu = make_cpu_backend({1});
  Toy toy;
  ParameterArena a(*cpu, {DType::kF32, 1, 5});
  a.finalize(toy);
  std::vector<float> v(48), g(48);
  cpu->download(toy.up_.value(), v.data());
  EXPECT_EQ(v, a.read_master("up"));
  cpu->download(toy.up_.grad(), g.data());
  for (float x : g) EXPECT_EQ(x, 0.0f);
  EXPECT_TRUE(toy.up_.value().requires_grad());
}

TEST(ParamArena, LoadGlobalKeepsThisRanksSlice) {
  auto cpu = make_cpu_backend({1});
  Toy toy(TpSplit{0, 1, 2}, TpSplit{1, 0, 2});
  ParameterArena a(*cpu, {DType::kF32, 1, 5});
  a.finalize(toy);
  std::vector<float> full(48);
  for (size_t i = 0; i < full.size(); ++i) full[i] = static_cast<float>(i);
  a.load_global("up", full.data(), 48);
  auto up = a.read_master("up");  // rows 4..7 of [8, 6]
  ASSERT_EQ(up.size(), 24u);
  EXPECT_EQ(up[0], 24.0f);
  EXPECT_EQ(up[23], 47.0f);
  a.load_global("down", full.data(), 48);
  auto down = a.read_master("down");  // columns 0..3 of [6, 8]
  EXPECT_EQ(down[0], 0.0f);
  EXPECT_EQ(down[4], 8.0f);
  EXPECT_THROW(a.load_global("nope", full.data(), 48), Error);
  EXPECT_THROW(a.load_global("up", full.data(), 47), Error);
}

TEST(ParamArena, LayoutHashSeesShapesAndSplits) {
  auto cpu = make_cpu_backend({1});
  Toy t1, t2, t3(TpSplit{0, 0, 2}, TpSplit{1, 0, 2});
  ParameterArena a1(*cpu, {DType::kF32, 1, 1}), a2(*cpu, {DType::kF32, 1, 2}), a3(*cpu, {DType::kF32, 1, 1});
  a1.finalize(t1);
  a2.finalize(t2);
  a3.finalize(t3);
  EXPECT_EQ(a1.layout_hash(), a2.layout_hash());  // the seed is not layout
  EXPECT_NE(a1.layout_hash(), a3.layout_hash());
}

TEST(Module, NameRules) {
  class Bad : public Module {
   public:
    void dup() {
      register_parameter("w", Shape{2}, InitSpec::zeros());
      register_parameter("w", Shape{2}, InitSpec::zeros());
    }
    void dotted() { register_parameter("a.b", Shape{2}, InitSpec::zeros()); }
  };
  Bad b;
  EXPECT_THROW(b.dup(), Error);
  Bad c;
  EXPECT_THROW(c.dotted(), Error);
  EXPECT_THROW(Parameter(Shape{5, 3}, InitSpec::zeros(), {TpSplit{0, 0, 2}}), Error);  // 5 rows over 2 ranks
}

TEST(Module, UseBeforeFinalizeIsAnError) {
  Linear l(3, 4);
  EXPECT_THROW(l.weight().value(), Error);
}

}  // namespace
}  // namespace loom
