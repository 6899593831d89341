// Tensor x data parallelism computes exactly the single-rank training run: on 4 ranks, the layouts TP=1 x DP=4,
// TP=2 x DP=2 and TP=4 x DP=1 give the same losses over 10 steps and the same gradients (every parameter shard,
// after the data-parallel all-reduce) as one rank training on the whole global batch, with the fused
// all-reduce + residual + RMSNorm (model.fused_norm, the default), without it, and with it and the token-split
// overlap (model.overlap: the batch in two halves, the backward interleaved by the tape's lanes). The multi-rank runs go
// through Session and Trainer exactly as gpt-train does; the reference is computed on each rank by hand.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "core/data.h"
#include "examples/gpt/model.h"
#include "loom/loom.h"
#include "tests/mpi/mpi_test_util.h"

namespace loom {
namespace {

constexpr int kSteps = 10;

// Arguments of the runs: a small model that every layout can split (4 heads, vocab 256, ffn 128).
enum class Mode { kUnfused, kFused, kOverlap };

std::vector<std::string> run_args(int tp, Mode mode) {
  return {"test", "--dim", "64", "--n-layers", "2", "--n-heads", "4", "--ffn-hidden", "128", "--seq-len", "32",
          "--vocab-size", "256", "--batch-size", "8", "--steps", std::to_string(kSteps), "--lr", "3e-3",
          "--warmup-steps", "3", "--tp", std::to_string(tp), "--device", "cpu", "--threads", "1",
          "--log-level", "warn", "--eval-batches", "0", "--fused-norm", mode != Mode::kUnfused ? "true" : "false",
          "--overlap", mode == Mode::kOverlap ? "true" : "false"};
}

struct Reference {
  std::vector<double> losses;
  std::vector<std::vector<float>> grads0;  // full-shape gradients of step 0, in layout order
  std::vector<std::string> names;
};

// One rank, whole batch, no communication: the run the parallel layouts must reproduce.
Reference single_rank_reference(const TrainConfig& t, const gpt::GptConfig& mc, const std::string& data_path) {
  auto cpu = make_cpu_backend({1});
  gpt::Gpt model(mc, TpGroup::none());
  ParameterArena params(*cpu, ParamArenaOptions{DType::kF32, 1, static_cast<uint64_t>(t.seed)});
  params.finalize(model);
  AdamW opt(params, AdamWConfig{t.beta1, t.beta2, t.adam_eps, t.weight_decay, t.grad_clip});
  LrSchedule sched{t.lr, t.min_lr, t.warmup_steps, t.steps};
  TokenFile file = TokenFile::open(data_path);
  BatchSampler sampler(file, mc.seq_len, t.batch_size, static_cast<uint64_t>(t.seed), t.val_fraction);
  ActivationArena act(*cpu);
  Reference ref;
  std::vector<int32_t> in(static_cast<size_t>(t.batch_size * mc.seq_len)), tg(in.size());
  for (int64_t s = 0; s < t.steps; ++s) {
    params.zero_grads();
    act.reset();
    sampler.fill(Split::kTrain, s, 0, t.batch_size, in.data(), tg.data());
    Tape tape(act, &params);
    Ctx c(*cpu, act, &tape);
    Shape bt{t.batch_size, mc.seq_len};
    Tensor loss = model.loss(c, Tensor(in.data(), bt, DType::kI32, Device::kCpu),
                             Tensor(tg.data(), bt, DType::kI32, Device::kCpu));
    tape.backward(loss);
    ref.losses.push_back(cpu->read_scalar(loss));
    if (s == 0) {
      for (const LayoutEntry& e : params.layout()) {
        std::vector<float> g(static_cast<size_t>(e.numel));
        cpu->download(params.param(params.find(e.name)).grad(), g.data());
        ref.grads0.push_back(std::move(g));
        ref.names.push_back(e.name);
      }
    }
    opt.step(sched.at(s), 1.0, nullptr);
  }
  return ref;
}

class TpEquivalence : public ::testing::TestWithParam<std::tuple<int, Mode>> {};  // (TP size, mode)

TEST_P(TpEquivalence, LossesAndGradientsMatchOneRank) {
  const auto [tp, mode] = GetParam();
  ASSERT_EQ(test::world_size(), 4) << "this test is written for 4 ranks";
  std::vector<std::string> args = run_args(tp, mode);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  int argc = static_cast<int>(argv.size());
  char** argvp = argv.data();

  Session session(argc, argvp);
  Config cfg;
  gpt::GptConfig mc;
  mc.declare(cfg);
  TrainConfig train;
  ASSERT_TRUE(session.start(cfg, train, argc, argvp, [&](const TrainConfig& t) { mc.validate(t.tp); }));
  ASSERT_EQ(session.groups().tp_size(), tp);
  ASSERT_EQ(mc.fused_norm, mode != Mode::kUnfused) << "--fused-norm did not reach the model config";
  ASSERT_EQ(mc.overlap, mode == Mode::kOverlap) << "--overlap did not reach the model config";
  gpt::Gpt model(mc, session.tp());
  Trainer trainer(session, model);
  const std::string data = default_corpus_path(default_cache_dir());
  Reference ref = single_rank_reference(train, mc, data);

  for (int s = 0; s < kSteps; ++s) {
    StepStats st = trainer.train_step();
    EXPECT_NEAR(st.loss, ref.losses[static_cast<size_t>(s)], 2e-6 * ref.losses[static_cast<size_t>(s)])
        << "tp " << tp << ", step " << s;
    if (s != 0) continue;
    // After step 0 the arena still holds that step's gradients, summed over the DP group.
    ParameterArena& p = trainer.params();
    const double dp = session.groups().dp_size();
    ASSERT_EQ(p.layout().size(), ref.names.size());
    for (size_t i = 0; i < ref.names.size(); ++i) {
      const LayoutEntry& e = p.layout()[static_cast<size_t>(p.find(ref.names[i]))];
      std::vector<float> expect(static_cast<size_t>(e.numel)), got(static_cast<size_t>(e.numel));
      extract_shard(ref.grads0[i].data(), e.global_shape, e.split, expect.data());
      session.backend().download(p.param(p.find(e.name)).grad(), got.data());
      double worst = 0, scale = 0;
      for (size_t j = 0; j < got.size(); ++j) {
        worst = std::max(worst, std::fabs(got[j] / dp - expect[j]));
        scale = std::max(scale, static_cast<double>(std::fabs(expect[j])));
      }
      EXPECT_LE(worst, 1e-5 * scale + 1e-9) << e.name << " (tp " << tp << ", shard of rank "
                                            << session.groups().tp_rank() << "): max abs difference " << worst
                                            << " against gradients up to " << scale;
    }
  }
}

std::string layout_name(const ::testing::TestParamInfo<std::tuple<int, Mode>>& i) {
  static const char* const kModes[] = {"_unfused", "_fused", "_overlap"};
  return "tp" + std::to_string(std::get<0>(i.param)) + kModes[static_cast<int>(std::get<1>(i.param))];
}

INSTANTIATE_TEST_SUITE_P(Layouts, TpEquivalence,
                         ::testing::Combine(::testing::Values(1, 2, 4),
                                            ::testing::Values(Mode::kUnfused, Mode::kFused, Mode::kOverlap)),
                         layout_name);

}  // namespace
}  // namespace loom
