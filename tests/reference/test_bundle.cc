// Tests of the tensor bundle (tests/reference/bundle.h): C++ round trip, error reporting on bad files, exchange
// with the Python reader/writer (loom_bundle.py) in both directions, and a read of what the PyTorch reference
// generator (torch_gpt_reference.py) writes, checked for completeness and for a loss consistent with its logits.
//
// Assumes the source tree is at LOOM_SOURCE_DIR (a compile definition) or, without it, where __FILE__ says; and a
// Python with numpy (and torch, for the generator) at LOOM_TEST_PYTHON, default /usr/bin/python3. Tests that need
// a missing piece are skipped with the reason.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "core/env.h"
#include "core/error.h"
#include "tests/reference/bundle.h"

namespace loom::test {
namespace {

namespace fs = std::filesystem;

// A fresh directory under the system temp dir, removed with everything in it when the test ends.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "loom_bundle_XXXXXX").string();
    LOOM_CHECK(mkdtemp(tmpl.data()) != nullptr, kIo, "mkdtemp(" << tmpl << ") failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

fs::path source_dir() {
#ifdef LOOM_SOURCE_DIR
  return fs::path(LOOM_SOURCE_DIR);
#else
  // __FILE__ is ".../tests/reference/test_bundle.cc" (absolute under CMake, relative to the repo root otherwise).
  return fs::absolute(fs::path(__FILE__)).parent_path().parent_path().parent_path();
#endif
}

std::string python() {
  return env::get_string("LOOM_TEST_PYTHON", "/usr/bin/python3");
}

std::string quoted(const std::string& s) {
  return "'" + s + "'";
}

bool python_has(const std::string& modules) {
  const std::string cmd = quoted(python()) + " -c 'import " + modules + "' >/dev/null 2>&1";
  return std::system(cmd.c_str()) == 0;
}

// Runs a shell command; on failure the assertion shows the command (its own output went to the test's stderr).
::testing::AssertionResult run_command(const std::string& cmd) {
  const int rc = std::system(cmd.c_str());
  if (rc == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "command failed (status " << rc << "): " << cmd;
}

// Element-wise equality with the max difference and the first mismatches on failure.
template <class T>
::testing::AssertionResult same_values(const std::string& what, const std::vector<T>& got, const std::vector<T>& want,
                                       double tol = 0.0) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": " << got.size() << " values, expected " << want.size();
  double max_diff = 0;
  std::ostringstream first;
  int shown = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    max_diff = std::max(max_diff, d);
    if (d > tol && shown < 5) {
      first << "\n  [" << i << "] got " << got[i] << " expected " << want[i];
      ++shown;
    }
  }
  if (shown == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": max difference " << max_diff << " (tolerance " << tol
                                       << "), first mismatches:" << first.str();
}

template <class Fn>
Error expect_error(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "expected a loom::Error, nothing was thrown";
  return Error(ErrorKind::kInternal, "");
}

// A bundle of every dtype, including a 0-d tensor and an empty one, filled with seeded random values.
Bundle random_bundle() {
  std::mt19937 gen(1234);
  std::normal_distribution<float> normal32(0.f, 1.f);
  std::normal_distribution<double> normal64(0.0, 1.0);
  std::uniform_int_distribution<int32_t> ints(-1000000, 1000000);
  Bundle b;
  std::vector<float> w(3 * 5);
  for (float& x : w) x = normal32(gen);
  b.add_f32("blocks.0.attn.wq.weight", {3, 5}, w);
  std::vector<int32_t> tok(2 * 2 * 3);
  for (int32_t& x : tok) x = ints(gen);
  b.add_i32("tokens", {2, 2, 3}, tok);
  std::vector<double> losses(4);
  for (double& x : losses) x = normal64(gen);
  b.add_f64("losses", {4}, losses);
  b.add_f64("scalar", {}, {normal64(gen)});
  b.add_f32("empty", {0, 3}, {});
  return b;
}

void expect_same_bundle(const Bundle& got, const Bundle& want) {
  ASSERT_EQ(got.names(), want.names());
  for (const std::string& name : want.names()) {
    const BundleTensor& g = got.get(name);
    const BundleTensor& w = want.get(name);
    EXPECT_EQ(g.dtype, w.dtype) << name;
    EXPECT_EQ(g.shape, w.shape) << name;
    EXPECT_TRUE(same_values(name, g.f32, w.f32));
    EXPECT_TRUE(same_values(name, g.i32, w.i32));
    EXPECT_TRUE(same_values(name, g.f64, w.f64));
  }
}

std::vector<char> file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::vector<char>& bytes, size_t n) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(n));
}

TEST(Bundle, RoundTripKeepsNamesOrderShapesAndBits) {
  TempDir dir;
  const Bundle b = random_bundle();
  b.write(dir.file("b.bundle"));
  const Bundle r = Bundle::read(dir.file("b.bundle"));
  EXPECT_EQ(r.size(), 5u);
  expect_same_bundle(r, b);
  EXPECT_TRUE(r.has("tokens"));
  EXPECT_FALSE(r.has("token"));
  EXPECT_EQ(r.get("scalar").numel(), 1);
  EXPECT_EQ(r.get("empty").shape_str(), "[0, 3]");
}

TEST(Bundle, MissingTensorErrorNamesItAndListsPresentOnes) {
  const Bundle b = random_bundle();
  Error e = expect_error([&] { b.get("final.norm.weight"); });
  EXPECT_EQ(e.kind(), ErrorKind::kData);
  const std::string msg = e.what();
  EXPECT_NE(msg.find("final.norm.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("blocks.0.attn.wq.weight"), std::string::npos) << msg;
  EXPECT_NE(msg.find("tokens"), std::string::npos) << msg;
}

TEST(Bundle, WrongDtypeIsDataError) {
  const Bundle b = random_bundle();
  EXPECT_NO_THROW(b.get("tokens", BundleDType::kI32));
  Error e = expect_error([&] { b.get("tokens", BundleDType::kF32); });
  EXPECT_EQ(e.kind(), ErrorKind::kData);
  EXPECT_NE(std::string(e.what()).find("i32"), std::string::npos) << e.what();
}

TEST(Bundle, AddChecksSizeAndDuplicates) {
  Bundle b;
  EXPECT_EQ(expect_error([&] { b.add_f32("w", {2, 3}, std::vector<float>(5, 1.f)); }).kind(), ErrorKind::kShape);
  EXPECT_EQ(expect_error([&] { b.add_i32("t", {-1}, {}); }).kind(), ErrorKind::kShape);
  b.add_f64("x", {2}, {1.0, 2.0});
  EXPECT_EQ(expect_error([&] { b.add_f64("x", {1}, {3.0}); }).kind(), ErrorKind::kData);
}

TEST(Bundle, EveryTruncationIsDataErrorNamingThePath) {
  TempDir dir;
  const std::string full = dir.file("full.bundle");
  random_bundle().write(full);
  const std::vector<char> bytes = file_bytes(full);
  ASSERT_GT(bytes.size(), 100u);
  const std::string cut = dir.file("cut.bundle");
  for (size_t n = 0; n < bytes.size(); ++n) {
    write_bytes(cut, bytes, n);
    Error e = expect_error([&] { Bundle::read(cut); });
    EXPECT_EQ(e.kind(), ErrorKind::kData) << "truncated to " << n << " bytes: " << e.what();
    EXPECT_NE(std::string(e.what()).find(cut), std::string::npos) << "truncated to " << n << ": " << e.what();
  }
}

TEST(Bundle, BadMagicVersionTrailingBytesAndMissingFile) {
  TempDir dir;
  const std::string path = dir.file("b.bundle");
  random_bundle().write(path);
  const std::vector<char> good = file_bytes(path);

  std::vector<char> bad = good;
  bad[0] = 'X';
  write_bytes(path, bad, bad.size());
  Error e = expect_error([&] { Bundle::read(path); });
  EXPECT_EQ(e.kind(), ErrorKind::kData);
  EXPECT_NE(std::string(e.what()).find("magic"), std::string::npos) << e.what();

  bad = good;
  bad[8] = 2;  // version
  write_bytes(path, bad, bad.size());
  e = expect_error([&] { Bundle::read(path); });
  EXPECT_EQ(e.kind(), ErrorKind::kData);
  EXPECT_NE(std::string(e.what()).find("version 2"), std::string::npos) << e.what();

  bad = good;
  bad.push_back(0);
  write_bytes(path, bad, bad.size());
  EXPECT_EQ(expect_error([&] { Bundle::read(path); }).kind(), ErrorKind::kData);

  EXPECT_EQ(expect_error([&] { Bundle::read(dir.file("absent.bundle")); }).kind(), ErrorKind::kIo);
}

// Python side of the exchange test: "write OUT" writes tensors from exact formulas; "echo IN OUT" reads IN and
// writes every tensor back as "py.<name>" = 2 * value + 1, same dtype and shape.
constexpr const char* kExchangeScript = R"PY(
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import loom_bundle
mode = sys.argv[2]
if mode == "write":
    i = np.arange(24, dtype=np.float64)
    loom_bundle.write(sys.argv[3], [
        ("a", (i / 7.0 - 1.0).astype(np.float32).reshape(4, 6)),
        ("b", ((np.arange(15) * 7919) % 101 - 50).astype(np.int32).reshape(3, 1, 5)),
        ("c", np.arange(5, dtype=np.float64) / 3.0 + 0.1),
        ("scalar", np.array(-2.5, np.float64)),
    ])
else:
    tensors = loom_bundle.read(sys.argv[3])
    loom_bundle.write(sys.argv[4], [("py." + n, (2 * v + 1).astype(v.dtype)) for n, v in tensors.items()])
)PY";

class PythonExchange : public ::testing::Test {
 protected:
  void SetUp() override {
    module_dir_ = source_dir() / "tests" / "reference";
    if (!fs::exists(module_dir_ / "loom_bundle.py"))
      GTEST_SKIP() << "loom_bundle.py not found under " << module_dir_ << " (set LOOM_SOURCE_DIR at compile time)";
    if (!python_has("numpy")) GTEST_SKIP() << python() << " cannot import numpy (set LOOM_TEST_PYTHON)";
    script_ = dir_.file("exchange.py");
    std::ofstream(script_) << kExchangeScript;
  }
  std::string command(const std::string& args) const {
    return quoted(python()) + " " + quoted(script_) + " " + quoted(module_dir_.string()) + " " + args;
  }

  TempDir dir_;
  fs::path module_dir_;
  std::string script_;
};

TEST_F(PythonExchange, CppReadsWhatPythonWrote) {
  const std::string path = dir_.file("py.bundle");
  ASSERT_TRUE(run_command(command("write " + quoted(path))));
  const Bundle b = Bundle::read(path);
  ASSERT_EQ(b.names(), (std::vector<std::string>{"a", "b", "c", "scalar"}));

  std::vector<float> a(24);
  for (int i = 0; i < 24; ++i) a[i] = static_cast<float>(i / 7.0 - 1.0);
  std::vector<int32_t> ints(15);
  for (int i = 0; i < 15; ++i) ints[i] = (i * 7919) % 101 - 50;
  std::vector<double> c(5);
  for (int i = 0; i < 5; ++i) c[i] = i / 3.0 + 0.1;

  EXPECT_EQ(b.get("a", BundleDType::kF32).shape, (std::vector<int64_t>{4, 6}));
  EXPECT_TRUE(same_values("a", b.get("a").f32, a));
  EXPECT_EQ(b.get("b", BundleDType::kI32).shape, (std::vector<int64_t>{3, 1, 5}));
  EXPECT_TRUE(same_values("b", b.get("b").i32, ints));
  EXPECT_TRUE(same_values("c", b.get("c", BundleDType::kF64).f64, c));
  EXPECT_TRUE(b.get("scalar").shape.empty());
  EXPECT_TRUE(same_values("scalar", b.get("scalar", BundleDType::kF64).f64, {-2.5}));
}

TEST_F(PythonExchange, PythonReadsWhatCppWrote) {
  const std::string in = dir_.file("cpp.bundle");
  const std::string out = dir_.file("echo.bundle");
  const Bundle b = random_bundle();
  b.write(in);
  ASSERT_TRUE(run_command(command("echo " + quoted(in) + " " + quoted(out))));
  const Bundle r = Bundle::read(out);
  ASSERT_EQ(r.size(), b.size());
  for (const std::string& name : b.names()) {
    const BundleTensor& want = b.get(name);
    const BundleTensor& got = r.get("py." + name, want.dtype);
    EXPECT_EQ(got.shape, want.shape) << name;
    std::vector<float> f32 = want.f32;
    for (float& x : f32) x = 2 * x + 1;
    std::vector<int32_t> i32 = want.i32;
    for (int32_t& x : i32) x = 2 * x + 1;
    std::vector<double> f64 = want.f64;
    for (double& x : f64) x = 2 * x + 1;
    EXPECT_TRUE(same_values(name, got.f32, f32));
    EXPECT_TRUE(same_values(name, got.i32, i32));
    EXPECT_TRUE(same_values(name, got.f64, f64));
  }
}

// Runs the generator at a small size and checks the bundle is complete and self-consistent.
TEST(GptReference, GeneratorOutputIsCompleteAndConsistent) {
  const fs::path script = source_dir() / "tests" / "reference" / "torch_gpt_reference.py";
  if (!fs::exists(script)) GTEST_SKIP() << script << " not found (set LOOM_SOURCE_DIR at compile time)";
  if (!python_has("numpy, torch")) GTEST_SKIP() << python() << " cannot import numpy and torch (python3-torch)";
  TempDir dir;
  const std::string path = dir.file("gpt_ref.bundle");
  ASSERT_TRUE(run_command(quoted(python()) + " " + quoted(script.string()) + " --out " + quoted(path) +
                          " --steps 3 --layers 1 >/dev/null"));
  const Bundle b = Bundle::read(path);
  const GptReferenceConfig c = GptReferenceConfig::from_bundle(b);
  EXPECT_EQ(c.vocab, 64);
  EXPECT_EQ(c.dim, 32);
  EXPECT_EQ(c.layers, 1);
  EXPECT_EQ(c.heads, 4);
  EXPECT_EQ(c.ffn, 88);
  EXPECT_EQ(c.seq, 16);
  EXPECT_EQ(c.batch, 3);
  EXPECT_EQ(c.steps, 3);
  EXPECT_EQ(c.warmup, 3);
  EXPECT_DOUBLE_EQ(c.lr, 1e-2);
  EXPECT_DOUBLE_EQ(c.lr_min, 1e-3);
  EXPECT_DOUBLE_EQ(c.weight_decay, 0.1);
  EXPECT_DOUBLE_EQ(c.beta2, 0.95);
  EXPECT_DOUBLE_EQ(c.norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_base, 10000.0);

  const int64_t V = c.vocab, D = c.dim, F = c.ffn;
  std::vector<std::pair<std::string, std::vector<int64_t>>> params = {{"tok_emb.weight", {V, D}}};
  for (int64_t i = 0; i < c.layers; ++i) {
    const std::string p = "blocks." + std::to_string(i) + ".";
    params.insert(params.end(), {{p + "attn_norm.weight", {D}},
                                 {p + "attn.wq.weight", {D, D}},
                                 {p + "attn.wk.weight", {D, D}},
                                 {p + "attn.wv.weight", {D, D}},
                                 {p + "attn.wo.weight", {D, D}},
                                 {p + "mlp_norm.weight", {D}},
                                 {p + "mlp.w1.weight", {F, D}},
                                 {p + "mlp.w3.weight", {F, D}},
                                 {p + "mlp.w2.weight", {D, F}}});
  }
  params.insert(params.end(), {{"norm.weight", {D}}, {"lm_head.weight", {V, D}}});
  for (const auto& [name, shape] : params) {
    for (const char* prefix : {"", "grad.", "final."}) {
      const BundleTensor& t = b.get(prefix + name, BundleDType::kF32);
      EXPECT_EQ(t.shape, shape) << prefix << name;
    }
    // Training moved every parameter, and no gradient is all zero.
    EXPECT_FALSE(same_values(name, b.get("final." + name).f32, b.get(name).f32)) << name << " did not change";
    EXPECT_FALSE(same_values(name, b.get("grad." + name).f32, std::vector<float>(b.get(name).f32.size(), 0.f)))
        << "gradient of " << name << " is zero";
  }

  const std::vector<int64_t> batch_shape = {c.steps, c.batch, c.seq};
  const BundleTensor& tokens = b.get("tokens", BundleDType::kI32);
  const BundleTensor& targets = b.get("targets", BundleDType::kI32);
  ASSERT_EQ(tokens.shape, batch_shape);
  ASSERT_EQ(targets.shape, batch_shape);
  for (int32_t t : targets.i32) ASSERT_TRUE(t >= 0 && t < V) << t;

  // loss0 must be the mean cross-entropy of the stored logits against step 0's targets.
  const BundleTensor& logits = b.get("logits", BundleDType::kF32);
  const int64_t rows = c.batch * c.seq;
  ASSERT_EQ(logits.shape, (std::vector<int64_t>{rows, V}));
  double loss = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = logits.f32.data() + r * V;
    double mx = row[0];
    for (int64_t v = 1; v < V; ++v) mx = std::max(mx, static_cast<double>(row[v]));
    double sum = 0;
    for (int64_t v = 0; v < V; ++v) sum += std::exp(row[v] - mx);
    loss += std::log(sum) + mx - row[targets.i32[r]];
  }
  loss /= static_cast<double>(rows);
  const double loss0 = b.get("loss0", BundleDType::kF64).f64.at(0);
  EXPECT_NEAR(loss, loss0, 1e-6) << "cross-entropy of the stored logits vs loss0";
  EXPECT_GT(loss0, 2.0);  // about log(V) at init, far from a degenerate value

  const BundleTensor& losses = b.get("losses", BundleDType::kF64);
  ASSERT_EQ(losses.shape, (std::vector<int64_t>{c.steps}));
  EXPECT_EQ(losses.f64[0], loss0) << "step 0 of training runs on the same batch and weights as loss0";
  EXPECT_EQ(b.get("lrs", BundleDType::kF64).f64.at(0), c.lr / 3) << "warmup: lr_max * 1 / 3 at step 0";
}

}  // namespace
}  // namespace loom::test
