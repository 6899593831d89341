// ops::fused_allreduce_add_rmsnorm (parallel/fused_norm.h) on the CPU path against the unfused ops it replaces,
// reduce_from_tp + add + rmsnorm + copy_to_tp, on MPI communicators of 2 and 4 ranks: the normed output, the new
// residual stream and the gradients of partial, residual and weight must be equal bit for bit, for random token
// counts and hidden sizes, and bit-identical on every rank of the group. Bad shapes fail on every rank alike.
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <vector>

#include "core/arena.h"
#include "core/backend.h"
#include "core/context.h"
#include "core/error.h"
#include "core/rng.h"
#include "parallel/fused_norm.h"
#include "parallel/mpi_communicator.h"
#include "parallel/tp_ops.h"
#include "tests/mpi/mpi_test_util.h"

namespace loom {
namespace {

constexpr uint64_t kSeed = 424242;

// Values in (-2, 2); `stream` makes rank-specific (partials) or group-wide (residual, weight) data.
std::vector<float> randn(int64_t n, uint64_t stream, uint64_t salt) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    v[static_cast<size_t>(i)] = random_normal(kSeed + salt, stream, static_cast<uint64_t>(i)) * 0.7f;
  return v;
}

struct Result {
  std::vector<float> normed, residual, d_partial, d_residual, d_weight;
};

std::vector<float> read(const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  std::memcpy(v.data(), t.data(), v.size() * sizeof(float));
  return v;
}

// Runs `forward` (returning normed and the new residual from leaves P, R, W) on a tape, seeds d(normed) with
// this rank's partial gradient dn and d(residual_out) with dres, and reads everything back.
Result run(Backend& cpu, int64_t tokens, int64_t hidden, int rank, uint64_t salt,
           const std::function<ops::NormedResidual(Ctx&, const Tensor&, const Tensor&, const Tensor&)>& forward) {
  ActivationArena act(cpu);
  Tape tape(act, nullptr);
  Ctx c(cpu, act, &tape);
  const Shape td{tokens, hidden};
  auto leaf = [&](std::vector<float> v, const Shape& s) {
    Tensor t = act.allocate(s, DType::kF32);
    std::memcpy(t.data(), v.data(), v.size() * sizeof(float));
    return tape.track(t);
  };
  const uint64_t r = 100 + static_cast<uint64_t>(rank);
  Tensor P = leaf(randn(tokens * hidden, r, salt), td);
  Tensor R = leaf(randn(tokens * hidden, 1, salt), td);
  std::vector<float> w = randn(hidden, 2, salt);
  for (float& x : w) x += 1.0f;
  Tensor W = leaf(w, Shape{hidden});
  ops::NormedResidual out = forward(c, P, R, W);
  // The loss node: its backward seeds the two outputs (recorded last, so it runs first).
  Tensor L = tape.track(act.allocate(Shape{1}, DType::kF32));
  const std::vector<float> dn = randn(tokens * hidden, 200 + static_cast<uint64_t>(rank), salt);
  const std::vector<float> dres = randn(tokens * hidden, 3, salt);
  tape.record([&, n = out.normed, res = out.residual](Tape& t) {
    auto a = t.target(n);
    std::memcpy(a->grad.data(), dn.data(), dn.size() * sizeof(float));
    auto b = t.target(res);
    std::memcpy(b->grad.data(), dres.data(), dres.size() * sizeof(float));
  });
  tape.backward(L);
  return Result{read(out.normed), read(out.residual), read(*tape.grad(P)), read(*tape.grad(R)), read(*tape.grad(W))};
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Bit-identical on every rank of comm: the minimum and maximum of a hash of the bytes agree.
bool same_on_every_rank(const std::vector<float>& v, MPI_Comm comm) {
  uint64_t h = 1469598103934665603ull;
  const auto* p = reinterpret_cast<const unsigned char*>(v.data());
  for (size_t i = 0; i < v.size() * sizeof(float); ++i) h = (h ^ p[i]) * 1099511628211ull;
  uint64_t lo = 0, hi = 0;
  MPI_Allreduce(&h, &lo, 1, MPI_UINT64_T, MPI_MIN, comm);
  MPI_Allreduce(&h, &hi, 1, MPI_UINT64_T, MPI_MAX, comm);
  return lo == hi;
}

class FusedNorm : public ::testing::TestWithParam<int> {};  // the TP group size

TEST_P(FusedNorm, EqualsTheUnfusedOpsBitForBitAndOnEveryRank) {
  const int tp = GetParam();
  ASSERT_EQ(test::world_size() % tp, 0);
  MPI_Comm group;
  MPI_Comm_split(MPI_COMM_WORLD, test::world_rank() / tp, test::world_rank(), &group);
  MpiCommunicator comm(group, "tp", 1);
  auto cpu = make_cpu_backend({1});
  const float eps = 1e-5f;
  // Token counts from 1 to 300, hidden sizes 64 (the test models) and 1024..8192 (real ones); the same draw on
  // every rank.
  const int64_t hiddens[] = {64, 1024, 2048, 4096, 8192};
  for (int trial = 0; trial < 10; ++trial) {
    const uint64_t salt = static_cast<uint64_t>(trial) * 7919 + static_cast<uint64_t>(tp);
    const int64_t tokens = 1 + static_cast<int64_t>(random_uniform(kSeed, 9, salt) * 300);
    const int64_t hidden = hiddens[trial % 5];
    Result fused = run(*cpu, tokens, hidden, comm.rank(), salt, [&](Ctx& c, const Tensor& P, const Tensor& R,
                                                                     const Tensor& W) {
      return ops::fused_allreduce_add_rmsnorm(c, P, R, W, eps, &comm);
    });
    Result plain = run(*cpu, tokens, hidden, comm.rank(), salt, [&](Ctx& c, const Tensor& P, const Tensor& R,
                                                                     const Tensor& W) {
      Tensor res = ops::add(c, R, ops::reduce_from_tp(c, P, &comm));
      return ops::NormedResidual{ops::copy_to_tp(c, ops::rmsnorm(c, res, W, eps), &comm), res};
    });
    SCOPED_TRACE("tp " + std::to_string(tp) + ", tokens " + std::to_string(tokens) + ", hidden " +
                 std::to_string(hidden));
    EXPECT_TRUE(bitwise_equal(fused.normed, plain.normed)) << "normed";
    EXPECT_TRUE(bitwise_equal(fused.residual, plain.residual)) << "residual";
    EXPECT_TRUE(bitwise_equal(fused.d_partial, plain.d_partial)) << "d partial";
    EXPECT_TRUE(bitwise_equal(fused.d_residual, plain.d_residual)) << "d residual";
    EXPECT_TRUE(bitwise_equal(fused.d_weight, plain.d_weight)) << "d weight";
    for (const auto* v : {&fused.normed, &fused.residual, &fused.d_partial, &fused.d_weight})
      EXPECT_TRUE(same_on_every_rank(*v, group)) << "differs between the ranks of the group";
    // And the result is not trivially equal: the all-reduce changed the residual stream.
    EXPECT_FALSE(bitwise_equal(fused.residual, randn(tokens * hidden, 1, salt)));
  }
  MPI_Comm_free(&group);
}

TEST_P(FusedNorm, BadShapesFailOnEveryRankBeforeCommunicating) {
  const int tp = GetParam();
  MPI_Comm group;
  MPI_Comm_split(MPI_COMM_WORLD, test::world_rank() / tp, test::world_rank(), &group);
  MpiCommunicator comm(group, "tp", 1);
  auto cpu = make_cpu_backend({1});
  ActivationArena act(*cpu);
  Ctx c(*cpu, act, nullptr);
  Tensor p = act.allocate(Shape{4, 8}, DType::kF32), r = act.allocate(Shape{4, 6}, DType::kF32);
  Tensor w = act.allocate(Shape{8}, DType::kF32), w_bad = act.allocate(Shape{6}, DType::kF32);
  cpu->fill(p, 1.0f);
  cpu->fill(w, 1.0f);
  cpu->fill(w_bad, 1.0f);
  auto code_of = [&](const std::function<void()>& f) {
    try {
      f();
    } catch (const Error& e) {
      return e.kind();
    }
    return ErrorKind::kInternal;
  };
  EXPECT_EQ(code_of([&] { ops::fused_allreduce_add_rmsnorm(c, p, r, w, 1e-5f, &comm); }), ErrorKind::kShape);
  EXPECT_EQ(code_of([&] { ops::fused_allreduce_add_rmsnorm(c, p, p, w_bad, 1e-5f, &comm); }), ErrorKind::kShape);
  EXPECT_EQ(code_of([&] { ops::fused_allreduce_add_rmsnorm(c, p, p, w, 0.0f, &comm); }), ErrorKind::kConfig);
  // The group still works: nobody was left inside a collective. (partial's storage receives the sum, so the
  // residual is a tensor of its own.)
  Tensor r_ok = act.allocate(Shape{4, 8}, DType::kF32);
  cpu->fill(r_ok, 1.0f);
  auto ok = ops::fused_allreduce_add_rmsnorm(c, p, r_ok, w, 1e-5f, &comm);
  EXPECT_FLOAT_EQ(static_cast<const float*>(ok.residual.data())[0], 1.0f + static_cast<float>(tp));
  MPI_Comm_free(&group);
}

INSTANTIATE_TEST_SUITE_P(Groups, FusedNorm, ::testing::Values(2, 4),
                         [](const ::testing::TestParamInfo<int>& i) { return "tp" + std::to_string(i.param); });

}  // namespace
}  // namespace loom
