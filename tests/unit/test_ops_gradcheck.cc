// Finite-difference gradient check of every differentiable op through the ops layer and the tape, including
// views, reuse of a tensor by several ops (gradient accumulation), and a user-defined CustomOp.
#include <gtest/gtest.h>

#include "core/backend.h"
#include "core/error.h"
#include "core/gradcheck.h"
#include "core/ops.h"
#include "tests/unit/test_helpers.h"

namespace loom {
namespace {

using test::HostTensor;

class OpsGradcheck : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> cpu = make_cpu_backend({1});
};

TEST_F(OpsGradcheck, Linear) {
  auto x = HostTensor::randn({2, 3, 5}, 1), w = HostTensor::randn({4, 5}, 2);
  auto r = check_gradients(*cpu, [](Ctx& c, const std::vector<Tensor>& in) { return ops::linear(c, in[0], in[1]); },
                           {x.t, w.t});
  EXPECT_TRUE(r.ok) << r.summary;
  EXPECT_GT(r.checked, 40);
}

TEST_F(OpsGradcheck, AddScaleAndReuse) {
  // y = x*2 + x: x feeds two ops, so its gradient must accumulate (3 * dy).
  auto x = HostTensor::randn({4, 6}, 3);
  auto r = check_gradients(
      *cpu, [](Ctx& c, const std::vector<Tensor>& in) { return ops::add(c, ops::scale(c, in[0], 2.0f), in[0]); },
      {x.t});
  EXPECT_TRUE(r.ok) << r.summary;
}

TEST_F(OpsGradcheck, RmsNorm) {
  auto x = HostTensor::randn({5, 16}, 4), w = HostTensor::randn({16}, 5);
  auto r = check_gradients(
      *cpu, [](Ctx& c, const std::vector<Tensor>& in) { return ops::rmsnorm(c, in[0], in[1], 1e-5f); }, {x.t, w.t});
  EXPECT_TRUE(r.ok) << r.summary;
}

TEST_F(OpsGradcheck, Embedding) {
  auto table = HostTensor::randn({10, 4}, 6);
  auto tok = HostTensor::tokens({2, 5}, 10, 7);
  auto r = check_gradients(*cpu, [](Ctx& c, const std::vector<Tensor>& in) { return ops::embedding(c, in[0], in[1]); },
                           {table.t, tok.t});
  EXPECT_TRUE(r.ok) << r.summary;
}

TEST_F(OpsGradcheck, Rope) {
  auto x = HostTensor::randn({2, 7, 3, 8}, 8);
  auto r =
      check_gradients(*cpu, [](Ctx& c, const std::vector<Tensor>& in) { return ops::rope(c, in[0], 10000.0f); }, {x.t});
  EXPECT_TRUE(r.ok) << r.summary;
}

TEST_F(OpsGradcheck, CausalAttention) {
  auto q = HostTensor::randn({2, 9, 2, 8}, 9), k = HostTensor::randn({2, 9, 2, 8}, 10),
       v = HostTensor::randn({2, 9, 2, 8}, 11);
  auto r = check_gradients(
      *cpu, [](Ctx& c, const std::vector<Tensor>& in) { return ops::causal_attention(c, in[0], in[1], in[2]); },
      {q.t, k.t, v.t});
  EXPECT_TRUE(r.ok) << r.summary;
}

TEST_F(OpsGradcheck, AttentionWithSharedInput) {
  // q = k = v = x: three gradient contributions into one slot.
  auto x = HostTensor::randn({1, 6, 2, 4}, 12);
  auto r = check_gradients(
      *cpu, [](Ctx& c, const std::vector<Tensor>& in) { return ops::causal_attention(c, in[0], in[0], in[0]); }, {x.t});
  EXPECT_TRUE(r.ok) << r.summary;
}

TEST_F(OpsGradcheck, SwiGlu) {
  auto g = HostTensor::randn({3, 10}, 13), u = HostTensor::randn({3, 10}, 14);
  auto r = check_gradients(*cpu, [](Ctx& c, const std::vector<Tensor>& in) { return ops::swiglu(c, in[0], in[1]); },
                           {g.t, u.t});
  EXPECT_TRUE(r.ok) << r.summary;
}

TEST_F(OpsGradcheck, CrossEntropy) {
  auto logits = HostTensor::randn({6, 11}, 15, 2.0f);
  auto tgt = HostTensor::tokens({6}, 11, 16);
  auto r =
      check_gradients(*cpu, [](Ctx& c, const std::vector<Tensor>& in) { return ops::cross_entropy(c, in[0], in[1]); },
                      {logits.t, tgt.t});
  EXPECT_TRUE(r.ok) << r.summary;
}

TEST_F(OpsGradcheck, RowViewsGetTheirOwnGradientRows) {
  // Process the two halves of a batch separately and put them back through a linear layer each.
  auto x = HostTensor::randn({4, 5}, 17), w = HostTensor::randn({3, 5}, 18);
  auto r = check_gradients(*cpu,
                           [](Ctx& c, const std::vector<Tensor>& in) {
                             Tensor top = ops::linear(c, in[0].rows(0, 2), in[1]);
                             Tensor bottom = ops::scale(c, ops::linear(c, in[0].rows(2, 4), in[1]), -0.5f);
                             return ops::add(c, top, bottom);
                           },
                           {x.t, w.t});
  EXPECT_TRUE(r.ok) << r.summary;
}

TEST_F(OpsGradcheck, SmallTransformerBlock) {
  // The composition the GPT block uses, end to end.
  const int64_t B = 2, T = 5, H = 2, Dh = 4, D = H * Dh;
  auto x = HostTensor::randn({B, T, D}, 19), wn = HostTensor::randn({D}, 20), wq = HostTensor::randn({D, D}, 21, 0.5f),
       wk = HostTensor::randn({D, D}, 22, 0.5f), wv = HostTensor::randn({D, D}, 23, 0.5f),
       wo = HostTensor::randn({D, D}, 24, 0.5f);
  auto r = check_gradients(*cpu,
                           [&](Ctx& c, const std::vector<Tensor>& in) {
                             Tensor n = ops::rmsnorm(c, in[0], in[1], 1e-5f);
                             Shape hs{B, T, H, Dh};
                             Tensor q = ops::rope(c, ops::linear(c, n, in[2]).reshape(hs), 10000.0f);
                             Tensor k = ops::rope(c, ops::linear(c, n, in[3]).reshape(hs), 10000.0f);
                             Tensor v = ops::linear(c, n, in[4]).reshape(hs);
                             Tensor a = ops::causal_attention(c, q, k, v).reshape(Shape{B, T, D});
                             return ops::add(c, in[0], ops::linear(c, a, in[5]));
                           },
                           {x.t, wn.t, wq.t, wk.t, wv.t, wo.t});
  EXPECT_TRUE(r.ok) << r.summary;
}

// A user op: y = x * sigmoid(alpha * x) with a learnable scalar-per-feature alpha [D].
class ScaledSigmoidGate : public CustomOp {
 public:
  std::string name() const override { return "scaled_sigmoid_gate"; }
  Shape output_shape(const std::vector<Tensor>& in) const override { return in[0].shape(); }
  void forward(Backend&, const std::vector<Tensor>& in, const Tensor& out) override {
    const int64_t d = in[1].numel();
    const float *x = in[0].ptr<float>(), *a = in[1].ptr<float>();
    float* y = out.ptr<float>();
    for (int64_t i = 0; i < in[0].numel(); ++i) y[i] = x[i] / (1.0f + std::exp(-a[i % d] * x[i]));
  }
  void backward(Backend&, const std::vector<Tensor>& in, const Tensor&, const Tensor& dout,
                const std::vector<Tensor>& grads) override {
    const int64_t d = in[1].numel();
    const float *x = in[0].ptr<float>(), *a = in[1].ptr<float>(), *dy = dout.ptr<float>();
    if (!grads[1].is_null()) std::fill_n(grads[1].ptr<float>(), d, 0.0f);
    for (int64_t i = 0; i < in[0].numel(); ++i) {
      float s = 1.0f / (1.0f + std::exp(-a[i % d] * x[i]));
      float ds = s * (1 - s);
      if (!grads[0].is_null()) grads[0].ptr<float>()[i] = dy[i] * (s + x[i] * ds * a[i % d]);
      if (!grads[1].is_null()) grads[1].ptr<float>()[i % d] += dy[i] * x[i] * ds * x[i];
    }
  }
};

TEST_F(OpsGradcheck, CustomOp) {
  auto x = HostTensor::randn({3, 4}, 25), a = HostTensor::randn({4}, 26);
  auto op = std::make_shared<ScaledSigmoidGate>();
  auto r = check_gradients(*cpu,
                           [&](Ctx& c, const std::vector<Tensor>& in) {
                             return ops::apply(c, op, {in[0], in[1]});
                           },
                           {x.t, a.t});
  EXPECT_TRUE(r.ok) << r.summary;
}

TEST_F(OpsGradcheck, CheckerCatchesAWrongGradient) {
  // The checker itself must fail on a broken backward, or every test above proves nothing.
  class Wrong : public ScaledSigmoidGate {
    void backward(Backend& b, const std::vector<Tensor>& in, const Tensor& out, const Tensor& dout,
                  const std::vector<Tensor>& grads) override {
      ScaledSigmoidGate::backward(b, in, out, dout, grads);
      if (!grads[0].is_null()) grads[0].ptr<float>()[1] += 0.5f;
    }
  };
  auto x = HostTensor::randn({2, 2}, 27), a = HostTensor::randn({2}, 28);
  auto op = std::make_shared<Wrong>();
  auto r = check_gradients(*cpu,
                           [&](Ctx& c, const std::vector<Tensor>& in) {
                             return ops::apply(c, op, {in[0], in[1]});
                           },
                           {x.t, a.t});
  EXPECT_FALSE(r.ok) << r.summary;
}

TEST_F(OpsGradcheck, ShapeErrorsNameTheOpAndArgument) {
  ActivationArena arena(*cpu);
  Ctx c(*cpu, arena, nullptr);
  auto x = HostTensor::randn({2, 5}, 29), w = HostTensor::randn({4, 6}, 30);
  try {
    ops::linear(c, x.t, w.t);
    FAIL() << "expected a shape error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kShape);
    EXPECT_NE(std::string(e.what()).find("linear"), std::string::npos) << e.what();
  }
  auto g = HostTensor::randn({3, 4}, 31), u = HostTensor::randn({3, 5}, 32);
  EXPECT_THROW(ops::swiglu(c, g.t, u.t), Error);
}

}  // namespace
}  // namespace loom
