// HDF5 snapshot files (checkpoint/hdf5_format.h): real parameter arenas of a TP=2 x DP=2 run (4 ranks simulated
// in one process, 2 per node, 2 nodes) are written, found, assembled into global tensors and resharded to
// TP=1 x DP=1, TP=4 x DP=1 and TP=1 x DP=3, and compared element for element with arenas built directly with
// those layouts. Also: incomplete, truncated and corrupt versions are excluded or fail to load (never crash),
// missing or doubly stored pieces are named, h5py and h5dump read the files, and disk errors leave no temp file.
//
// Assumes the source tree at LOOM_SOURCE_DIR (or where __FILE__ says), /usr/bin/python3 with h5py and numpy
// (LOOM_TEST_PYTHON overrides) and h5dump on PATH; the tests that need a missing one are skipped with the reason.
// Runs as any user, root included (the unwritable directory is a path under a regular file: ENOTDIR; a full disk is
// stood in for by a file size limit, RLIMIT_FSIZE, set and restored within its test).
#include <gtest/gtest.h>
#include <hdf5.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <sstream>

#include "checkpoint/hdf5_format.h"
#include "core/backend.h"
#include "core/env.h"
#include "core/error.h"
#include "core/module.h"
#include "core/param_arena.h"
#include "core/rng.h"
#include "tests/reference/bundle.h"

namespace loom::snap {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kVocab = 24, kDim = 12, kFfn = 28;  // sizes that make parameters straddle DP slice boundaries
constexpr uint64_t kSeed = 2024;
constexpr int kKinds = 3;
const char* const kKindNames[kKinds] = {"master", "adam_m", "adam_v"};

// A transformer-like parameter set: matrices split on axis 0 (column parallel) and axis 1 (row parallel), a sharded
// vector without weight decay, replicated vectors and a replicated matrix.
class Block : public Module {
 public:
  Block(TpSplit col, TpSplit row) {
    register_parameter("wq", Shape{kFfn, kDim}, InitSpec::zeros(), {col});
    register_parameter("wo", Shape{kDim, kFfn}, InitSpec::zeros(), {row});
    register_parameter("bias", Shape{kFfn}, InitSpec::zeros(), {col});
    register_parameter("mix", Shape{kDim, kDim}, InitSpec::zeros());
    register_parameter("norm", Shape{kDim}, InitSpec::ones());
  }
};

class Toy : public Module {
 public:
  Toy(int tp_rank, int tp_size) {
    const TpSplit col{0, tp_rank, tp_size}, row{1, tp_rank, tp_size};
    register_parameter("emb", Shape{kVocab, kDim}, InitSpec::zeros(), {col});
    auto& blocks = register_module<ModuleList>("blocks");
    for (int i = 0; i < 2; ++i) blocks.append<Block>(col, row);
    register_parameter("head", Shape{kVocab, kDim}, InitSpec::zeros(), {col});
    register_parameter("final_norm", Shape{kDim}, InitSpec::ones());
  }
};

// The global (TP=1) master, m and v of every parameter: distinct random values per parameter and kind.
struct Globals {
  std::map<std::string, std::vector<float>> values[kKinds];
  std::map<std::string, Shape> shape;
};

Globals make_globals() {
  Globals g;
  Toy full(0, 1);
  uint64_t stream = 0;
  for (auto& [name, p] : full.named_parameters()) {
    g.shape[name] = p->global_shape();
    for (int k = 0; k < kKinds; ++k) {
      std::vector<float>& v = g.values[k][name];
      v.resize(static_cast<size_t>(p->global_shape().numel()));
      ++stream;
      for (size_t i = 0; i < v.size(); ++i) v[i] = (k + 1) * random_normal(kSeed, stream, i);
    }
  }
  return g;
}

// One rank's arena holding the global values, and host copies of its master, m and v regions.
struct Rig {
  std::unique_ptr<Toy> model;
  std::unique_ptr<ParameterArena> arena;
  std::vector<float> region[kKinds];

  int64_t padded() const { return arena->padded_numel(); }
  std::pair<int64_t, int64_t> dp_slice(int dp_rank, int dp_size) const {
    return {dp_rank * padded() / dp_size, (dp_rank + 1) * padded() / dp_size};
  }
};

Rig make_rig(Backend& cpu, const Globals& g, int tp_rank, int tp_size, int dp_size) {
  Rig rig;
  rig.model = std::make_unique<Toy>(tp_rank, tp_size);
  rig.arena = std::make_unique<ParameterArena>(cpu, ParamArenaOptions{DType::kF32, dp_size, 7});
  rig.arena->finalize(*rig.model);
  const Tensor regions[kKinds] = {rig.arena->master(), rig.arena->adam_m(), rig.arena->adam_v()};
  for (int k = 0; k < kKinds; ++k) {
    std::vector<float> host(static_cast<size_t>(rig.padded()), 0.0f);
    for (const LayoutEntry& e : rig.arena->layout())
      extract_shard(g.values[k].at(e.name).data(), e.global_shape, e.split, host.data() + e.offset);
    cpu.upload(regions[k], host.data());
    // What a snapshot stages is what the arena holds: read it back rather than trusting `host`.
    rig.region[k].resize(host.size());
    cpu.download(regions[k], rig.region[k].data());
  }
  return rig;
}

// Whether some parameter of the layout crosses one of the DP slice boundaries.
bool some_parameter_straddles(const Rig& rig, int dp_size) {
  for (int d = 1; d < dp_size; ++d) {
    const int64_t boundary = rig.dp_slice(d, dp_size).first;
    for (const LayoutEntry& e : rig.arena->layout())
      if (e.offset < boundary && boundary < e.offset + e.numel) return true;
  }
  return false;
}

// Exact equality with the max difference and the first mismatches on failure.
::testing::AssertionResult same_values(const std::string& what, const float* got, const float* want, size_t n) {
  double max_diff = 0;
  size_t bad = 0;
  std::ostringstream first;
  for (size_t i = 0; i < n; ++i) {
    if (got[i] == want[i]) continue;
    max_diff = std::max(max_diff, std::fabs(static_cast<double>(got[i]) - want[i]));
    if (bad++ < 5) first << "\n  [" << i << "] got " << got[i] << ", expected " << want[i];
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << bad << " of " << n << " elements differ, max |diff| "
                                       << max_diff << first.str();
}

::testing::AssertionResult same_values(const std::string& what, const std::vector<float>& got,
                                       const std::vector<float>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": " << got.size() << " elements, expected " << want.size();
  return same_values(what, got.data(), want.data(), got.size());
}

// Runs f, which must throw loom::Error; returns its kind and message (kInternal and "" with a failure if not).
template <class F>
std::pair<ErrorKind, std::string> error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return {e.kind(), e.what()};
  }
  ADD_FAILURE() << "expected a loom::Error";
  return {ErrorKind::kInternal, ""};
}

fs::path source_dir() {
#ifdef LOOM_SOURCE_DIR
  return fs::path(LOOM_SOURCE_DIR);
#else
  return fs::absolute(fs::path(__FILE__)).parent_path().parent_path().parent_path();
#endif
}

std::vector<std::string> files_in(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void flip_byte(const fs::path& path, size_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f) << path;
  f.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x5a);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(&c, 1);
  ASSERT_TRUE(f) << "flipping byte " << offset << " of " << path;
}

class SnapshotH5 : public ::testing::Test {
 protected:
  static constexpr int kTp = 2, kDp = 2, kRanksPerNode = 2, kNodes = 2;

  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "loom_hdf5_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    cpu_ = make_cpu_backend({1});
    globals_ = make_globals();
    for (int t = 0; t < kTp; ++t) source_.push_back(make_rig(*cpu_, globals_, t, kTp, kDp));
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // Rank r = dp * kTp + tp (TP ranks contiguous), on node r / kRanksPerNode.
  SliceData slice_of(int rank) const {
    const int tp = rank % kTp, dp = rank / kTp;
    const Rig& rig = source_[static_cast<size_t>(tp)];
    const auto [begin, end] = rig.dp_slice(dp, kDp);
    return SliceData{rank,
                     tp,
                     dp,
                     begin,
                     end,
                     rig.region[0].data() + begin,
                     rig.region[1].data() + begin,
                     rig.region[2].data() + begin};
  }

  SnapshotMeta meta_of(int64_t version, int node) const {
    SnapshotMeta m;
    m.version = version;
    m.node = node;
    m.num_nodes = kNodes;
    m.tp_size = kTp;
    m.dp_size = kDp;
    m.layout_hash = source_[0].arena->layout_hash();
    m.config_hash = 0x0123456789abcdefull;
    m.seed = 0xfedcba9876543210ull;  // above 2^63: the uint64 attribute must keep it
    m.config_toml = "[model]\ndim = 12\nname = \"toy ✓\"\n";
    m.padded_numel = source_[0].padded();
    return m;
  }

  // Writes every node's file of `version`; `edit` may change a node's meta and slices first.
  std::vector<std::string> write_version(
      int64_t version, const std::function<void(int node, SnapshotMeta&, std::vector<SliceData>&)>& edit = nullptr) {
    std::vector<std::string> paths;
    for (int node = 0; node < kNodes; ++node) {
      SnapshotMeta meta = meta_of(version, node);
      std::vector<SliceData> slices;
      for (int r = node * kRanksPerNode; r < (node + 1) * kRanksPerNode; ++r) slices.push_back(slice_of(r));
      if (edit) edit(node, meta, slices);
      paths.push_back(write_node_file(dir_.string(), meta, source_[0].arena->layout(), slices));
    }
    return paths;
  }

  // The first parameter (in name order, as load_global checks them) of TP rank 1's layout whose elements meet
  // [begin, end) of the regions; its entry.
  LayoutEntry first_param_meeting(int64_t begin, int64_t end) const {
    std::vector<LayoutEntry> entries = source_[1].arena->layout();
    std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
    for (const LayoutEntry& e : entries)
      if (e.offset < end && begin < e.offset + e.numel) return e;
    return LayoutEntry{};
  }

  fs::path dir_;
  std::unique_ptr<Backend> cpu_;
  Globals globals_;
  std::vector<Rig> source_;  // by TP rank
};

TEST_F(SnapshotH5, RoundTripAssemblesTheGlobalTensors) {
  ASSERT_TRUE(some_parameter_straddles(source_[0], kDp)) << "the test model no longer splits a parameter over slices";
  const auto paths = write_version(5);
  ASSERT_EQ(paths.size(), 2u);
  EXPECT_EQ(paths[0], (dir_ / "snapshot-v00000005-node0000.h5").string());
  EXPECT_EQ(paths[1], (dir_ / "snapshot-v00000005-node0001.h5").string());
  EXPECT_EQ(files_in(dir_), (std::vector<std::string>{"snapshot-v00000005-node0000.h5",
                                                      "snapshot-v00000005-node0001.h5"}));  // no temp files left
  EXPECT_EQ(complete_versions(dir_.string()), (std::vector<int64_t>{5}));

  const GlobalState state = load_global(dir_.string(), 5);
  const SnapshotMeta want = meta_of(5, 0);
  EXPECT_EQ(state.meta.version, 5);
  EXPECT_EQ(state.meta.node, -1);
  EXPECT_EQ(state.meta.num_nodes, kNodes);
  EXPECT_EQ(state.meta.tp_size, kTp);
  EXPECT_EQ(state.meta.dp_size, kDp);
  EXPECT_EQ(state.meta.layout_hash, want.layout_hash);
  EXPECT_EQ(state.meta.config_hash, want.config_hash);
  EXPECT_EQ(state.meta.seed, want.seed);
  EXPECT_EQ(state.meta.config_toml, want.config_toml);
  EXPECT_EQ(state.meta.padded_numel, want.padded_numel);
  ASSERT_EQ(state.global_shape, globals_.shape);
  const std::map<std::string, std::vector<float>>* got[kKinds] = {&state.master, &state.adam_m, &state.adam_v};
  for (int k = 0; k < kKinds; ++k) {
    ASSERT_EQ(got[k]->size(), globals_.values[k].size()) << kKindNames[k];
    for (const auto& [name, values] : globals_.values[k])
      EXPECT_TRUE(same_values(std::string(kKindNames[k]) + " " + name, got[k]->at(name), values));
  }
}

TEST_F(SnapshotH5, FillSliceReshardsToOtherTpAndDpSizes) {
  write_version(9);
  const GlobalState state = load_global(dir_.string(), 9);
  const std::pair<int, int> targets[] = {{1, 1}, {4, 1}, {1, 3}, {2, 2}};  // (TP, DP)
  for (const auto& [tp, dp] : targets) {
    for (int t = 0; t < tp; ++t) {
      const Rig direct = make_rig(*cpu_, globals_, t, tp, dp);
      if (tp == 1 && dp == 3) {
        EXPECT_TRUE(some_parameter_straddles(direct, dp)) << "TP=1 x DP=3 splits no parameter";
      }
      for (int d = 0; d < dp; ++d) {
        const auto [begin, end] = direct.dp_slice(d, dp);
        const size_t n = static_cast<size_t>(end - begin);
        std::vector<float> out[kKinds];
        for (auto& o : out) o.assign(n, -1.0f);  // fill_slice must also zero the gaps
        fill_slice(state, direct.arena->layout(), begin, end, out[0].data(), out[1].data(), out[2].data());
        for (int k = 0; k < kKinds; ++k) {
          std::ostringstream what;
          what << "TP=" << tp << " x DP=" << dp << " rank (tp " << t << ", dp " << d << ") " << kKindNames[k];
          EXPECT_TRUE(same_values(what.str(), out[k].data(), direct.region[k].data() + begin, n));
        }
      }
    }
  }
}

TEST_F(SnapshotH5, CompleteVersionsSkipsMissingTruncatedAndCorruptFiles) {
  {
    const auto paths = write_version(1);
    // Names Loom does not write are not snapshot files, even when they parse to a version and node.
    fs::copy_file(paths[1], dir_ / "snapshot-v00000001-node00001.h5");
    fs::copy_file(paths[1], dir_ / "snapshot-v1-node1.h5");
  }
  fs::remove(write_version(2)[1]);  // node 1 missing
  {
    const std::string p = write_version(3)[0];
    fs::resize_file(p, fs::file_size(p) / 2);  // truncated
  }
  flip_byte(write_version(4)[0], 40);  // inside the superblock, whose checksum then fails
  {
    const std::string p = write_version(6)[0];
    std::ofstream(p, std::ios::trunc) << "not an HDF5 file";
  }
  write_version(8, [](int node, SnapshotMeta& m, std::vector<SliceData>&) {
    if (node == 1) m.layout_hash ^= 1;  // the nodes disagree
  });
  write_version(10, [](int node, SnapshotMeta& m, std::vector<SliceData>&) {
    if (node == 1) m.num_nodes = 3;  // node 1 believes in a third node
  });
  {
    const std::string p = write_version(12)[0];  // an unfinished write: only its temp file exists
    fs::rename(p, p + ".tmp.999");
  }

  EXPECT_EQ(complete_versions(dir_.string()), (std::vector<int64_t>{1}));
  EXPECT_EQ(complete_versions((dir_ / "no_such_dir").string()), (std::vector<int64_t>{}));

  for (int64_t v : {2, 3, 4, 6, 8, 10, 12}) {
    const auto [kind, message] = error_of([&] { load_global(dir_.string(), v); });
    EXPECT_EQ(kind, ErrorKind::kSnapshot) << "version " << v << ": " << message;
    EXPECT_NE(message.find("snapshot version " + std::to_string(v)), std::string::npos) << message;
  }
  EXPECT_NE(error_of([&] { load_global(dir_.string(), 2); }).second.find("node files missing (nodes 1)"),
            std::string::npos);
  EXPECT_NE(error_of([&] { load_global(dir_.string(), 3); }).second.find("snapshot-v00000003-node0000.h5"),
            std::string::npos);
  // The intact version still loads.
  EXPECT_EQ(load_global(dir_.string(), 1).master.size(), globals_.values[0].size());
}

TEST_F(SnapshotH5, CorruptDataFailsTheLoadThroughTheChecksum) {
  const std::string path = write_version(3)[0];
  // Find the bytes of rank 0's master values of its first parameter in the file and flip one of them.
  const std::string bytes = read_text(path);
  const LayoutEntry& first = source_[0].arena->layout().front();
  const std::string needle(reinterpret_cast<const char*>(source_[0].region[0].data() + first.offset), 32);
  const size_t at = bytes.find(needle);
  ASSERT_NE(at, std::string::npos) << "the values of '" << first.name << "' are not stored as raw f32 in " << path;
  ASSERT_EQ(bytes.find(needle, at + 1), std::string::npos);
  flip_byte(path, at + 9);

  EXPECT_EQ(complete_versions(dir_.string()), (std::vector<int64_t>{3}));  // the metadata is intact
  const auto [kind, message] = error_of([&] { load_global(dir_.string(), 3); });
  EXPECT_EQ(kind, ErrorKind::kIo);
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_NE(message.find("H5Dread"), std::string::npos) << message;
  EXPECT_NE(message.find("Fletcher32"), std::string::npos) << message;
}

TEST_F(SnapshotH5, NewerOrIncompleteRootAttributesAreRefused) {
  const auto paths = write_version(1);
  auto edit_root = [](const std::string& path, const std::function<void(hid_t)>& edit) {
    const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(file, 0) << path;
    edit(file);
    ASSERT_GE(H5Fclose(file), 0);
  };
  edit_root(paths[0], [](hid_t file) {  // as a later Loom would write it
    const hid_t attr = H5Aopen(file, "format_version", H5P_DEFAULT);
    const int64_t two = 2;
    EXPECT_GE(H5Awrite(attr, H5T_NATIVE_INT64, &two), 0);
    H5Aclose(attr);
  });
  edit_root(paths[1], [](hid_t file) { EXPECT_GE(H5Adelete(file, "tp_size"), 0); });

  EXPECT_EQ(complete_versions(dir_.string()), (std::vector<int64_t>{}));
  auto [kind, message] = error_of([&] { describe_file(paths[0]); });
  EXPECT_EQ(kind, ErrorKind::kSnapshot);
  EXPECT_NE(message.find("'" + paths[0] + "' object '/' has snapshot format_version 2; this Loom reads version 1"),
            std::string::npos)
      << message;
  std::tie(kind, message) = error_of([&] { describe_file(paths[1]); });
  EXPECT_EQ(kind, ErrorKind::kSnapshot);
  EXPECT_NE(message.find("'" + paths[1] + "' object '/' has no attribute 'tp_size'"), std::string::npos) << message;
}

TEST_F(SnapshotH5, MissingOrDoublyStoredPiecesNameTheParameterAndRange) {
  const int64_t half = source_[0].padded() / 2;
  // Version 1: node 1 lost rank 3 (TP rank 1, DP rank 1), so TP shard 1 lacks the second half of the regions.
  write_version(1, [](int node, SnapshotMeta&, std::vector<SliceData>& slices) {
    if (node == 1) slices.pop_back();
  });
  EXPECT_EQ(complete_versions(dir_.string()), (std::vector<int64_t>{1}));  // every file is there and sound
  {
    const LayoutEntry e = first_param_meeting(half, source_[1].padded());
    ASSERT_FALSE(e.name.empty());
    const int64_t missing_from = std::max<int64_t>(0, half - e.offset);
    const auto [kind, message] = error_of([&] { load_global(dir_.string(), 1); });
    EXPECT_EQ(kind, ErrorKind::kSnapshot);
    std::ostringstream want;
    want << "parameter '" << e.name << "' (TP rank 1 of 2, local shard of " << e.numel << " elements): elements ["
         << missing_from << ", " << e.numel << ") are missing";
    EXPECT_NE(message.find(want.str()), std::string::npos) << message << "\nexpected: " << want.str();
  }
  // Version 2: rank 2 (TP rank 0, DP rank 1) stores 64 elements more at the front, which rank 0 holds too.
  write_version(2, [&](int node, SnapshotMeta&, std::vector<SliceData>& slices) {
    if (node != 1) return;
    SliceData& s = slices.front();
    s.slice_begin -= 64;
    s.master -= 64;
    s.adam_m -= 64;
    s.adam_v -= 64;
  });
  {
    const LayoutEntry e = first_param_meeting(half - 64, half);
    ASSERT_FALSE(e.name.empty()) << "no parameter in the doubly stored range";
    const auto [kind, message] = error_of([&] { load_global(dir_.string(), 2); });
    EXPECT_EQ(kind, ErrorKind::kSnapshot);
    EXPECT_NE(message.find("parameter '" + e.name + "' (TP rank 0 of 2"), std::string::npos) << message;
    EXPECT_NE(message.find("are stored twice (in '/rank0/" + e.name + "' and '/rank2/" + e.name + "')"),
              std::string::npos)
        << message;
  }
}

TEST_F(SnapshotH5, FillSliceNamesMissingOrMisshapenParameters) {
  write_version(4);
  const GlobalState state = load_global(dir_.string(), 4);
  std::vector<LayoutEntry> layout = source_[0].arena->layout();
  std::vector<float> m(static_cast<size_t>(source_[0].padded())), a(m.size()), v(m.size());
  const int64_t end = source_[0].padded();

  std::vector<LayoutEntry> renamed = layout;
  renamed[1].name = "blocks.7.wq";
  auto [kind, message] = error_of([&] { fill_slice(state, renamed, 0, end, m.data(), a.data(), v.data()); });
  EXPECT_EQ(kind, ErrorKind::kSnapshot);
  EXPECT_NE(message.find("parameter 'blocks.7.wq' of the model is not in snapshot version 4"), std::string::npos)
      << message;

  std::vector<LayoutEntry> reshaped = layout;
  reshaped[0].global_shape = Shape{kVocab / 2, kDim * 2};
  std::tie(kind, message) = error_of([&] { fill_slice(state, reshaped, 0, end, m.data(), a.data(), v.data()); });
  EXPECT_EQ(kind, ErrorKind::kSnapshot);
  EXPECT_NE(message.find("parameter '" + layout[0].name +
                         "' has global shape [24, 12] in snapshot version 4 but "
                         "[12, 24] in the model"),
            std::string::npos)
      << message;
}

TEST_F(SnapshotH5, H5pyReadsTheSameTensors) {
  const std::string python = env::get_string("LOOM_TEST_PYTHON", "/usr/bin/python3");
  if (std::system(("'" + python + "' -c 'import h5py, numpy' >/dev/null 2>&1").c_str()) != 0)
    GTEST_SKIP() << python << " cannot import h5py and numpy (Debian: apt-get install python3-h5py)";
  const fs::path script = source_dir() / "tests/reference/read_snapshot_h5.py";
  if (!fs::exists(script)) GTEST_SKIP() << "reader script not found at " << script;
  const auto paths = write_version(11);
  const std::string bundle = (dir_ / "state.bundle").string();
  const std::string cmd = "'" + python + "' '" + script.string() + "' --bundle '" + bundle + "' '" + paths[0] + "' '" +
                          paths[1] + "' > '" + (dir_ / "h5py.txt").string() + "'";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << "command failed: " << cmd;
  EXPECT_NE(read_text(dir_ / "h5py.txt").find("version 11: 13 parameters, tp_size 2, dp_size 2, 2 nodes"),
            std::string::npos)
      << read_text(dir_ / "h5py.txt");

  const test::Bundle b = test::Bundle::read(bundle);
  EXPECT_EQ(b.size(), kKinds * globals_.shape.size());
  for (int k = 0; k < kKinds; ++k)
    for (const auto& [name, values] : globals_.values[k]) {
      const test::BundleTensor& t = b.get(std::string(kKindNames[k]) + ":" + name, test::BundleDType::kF32);
      const Shape& shape = globals_.shape.at(name);
      EXPECT_EQ(t.shape, std::vector<int64_t>(shape.begin(), shape.end())) << name;
      EXPECT_TRUE(same_values("h5py " + t.name, t.f32, values));
    }
}

TEST_F(SnapshotH5, H5dumpListsTheGroupsAndAttributes) {
  if (std::system("h5dump --version >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "h5dump is not on PATH (Debian: apt-get install hdf5-tools)";
  const auto paths = write_version(13);
  const fs::path out = dir_ / "h5dump.txt";
  auto h5dump = [&](const std::string& args) {
    const std::string cmd = "h5dump " + args + " > '" + out.string() + "' 2>&1";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd << ":\n" << read_text(out);
    return read_text(out);
  };
  // Node 0 holds ranks 0 and 1 (TP ranks 0 and 1 of DP rank 0): the first half of every TP shard's regions.
  const std::string text = h5dump("-H '" + paths[0] + "'");
  for (const char* want : {"GROUP \"/\"", "ATTRIBUTE \"format\"", "ATTRIBUTE \"layout_hash\"",
                           "ATTRIBUTE \"config_toml\"", "GROUP \"rank0\"", "GROUP \"rank1\"", "GROUP \"emb\"",
                           "GROUP \"blocks.0.wq\"", "GROUP \"head\"", "ATTRIBUTE \"piece_begin\"",
                           "ATTRIBUTE \"global_shape\"", "DATASET \"master\"", "DATASET \"adam_v\"", "H5T_IEEE_F32LE"})
    EXPECT_NE(text.find(want), std::string::npos) << "h5dump -H output lacks " << want << ":\n" << text.substr(0, 3000);
  // Attribute values, and data (which h5dump checksums as it reads).
  EXPECT_NE(h5dump("-a /format '" + paths[0] + "'").find("\"loom-snapshot\""), std::string::npos) << read_text(out);
  EXPECT_NE(h5dump("-d /rank1/emb/master '" + paths[0] + "'").find("DATASPACE  SIMPLE { ( 12, 12 ) / ( 12, 12 ) }"),
            std::string::npos)
      << read_text(out);
}

TEST_F(SnapshotH5, UnwritableDirectoryIsAnIoErrorWithoutTempFile) {
  const fs::path plain = dir_ / "plain_file";
  std::ofstream(plain) << "x";
  const std::vector<SliceData> slices = {slice_of(0), slice_of(1)};
  for (const auto& [target, errno_text] :
       {std::pair{plain / "sub", "Not a directory"}, std::pair{dir_ / "missing", "No such file or directory"}}) {
    const auto [kind, message] =
        error_of([&] { write_node_file(target.string(), meta_of(1, 0), source_[0].arena->layout(), slices); });
    EXPECT_EQ(kind, ErrorKind::kIo);
    EXPECT_NE(message.find((target / "snapshot-v00000001-node0000.h5").string()), std::string::npos) << message;
    EXPECT_NE(message.find(errno_text), std::string::npos) << message;
  }
  EXPECT_EQ(files_in(dir_), (std::vector<std::string>{"plain_file"}));
}

TEST_F(SnapshotH5, FullDiskIsAnIoErrorWithoutTempFile) {
  // A file size limit makes write() fail with EFBIG part way through the file, as a full disk fails with ENOSPC.
  rlimit saved{};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &saved), 0);
  auto* saved_handler = signal(SIGXFSZ, SIG_IGN);  // otherwise exceeding the limit kills the process
  rlimit small = saved;
  small.rlim_cur = 4096;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  const std::vector<SliceData> slices = {slice_of(0), slice_of(1)};
  const auto [kind, message] =
      error_of([&] { write_node_file(dir_.string(), meta_of(1, 0), source_[0].arena->layout(), slices); });
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &saved), 0);
  signal(SIGXFSZ, saved_handler);

  EXPECT_EQ(kind, ErrorKind::kIo);
  EXPECT_NE(message.find("snapshot-v00000001-node0000.h5"), std::string::npos) << message;
  EXPECT_NE(message.find("File too large"), std::string::npos) << message;
  EXPECT_EQ(files_in(dir_), (std::vector<std::string>{}));
  // HDF5 released the failed file (no open files, no descriptor holding the deleted temp file's space), and the
  // same write now succeeds.
  EXPECT_EQ(H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_ALL), 0);
  for (const auto& fd : fs::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    const std::string target = fs::read_symlink(fd.path(), ec).string();
    EXPECT_EQ(target.find(dir_.string()), std::string::npos)
        << "descriptor " << fd.path() << " still open on " << target;
  }
  write_version(1);
  EXPECT_EQ(complete_versions(dir_.string()), (std::vector<int64_t>{1}));
}

TEST_F(SnapshotH5, DescribeFileSummarisesRanksAndParameters) {
  const auto paths = write_version(7);
  const std::string text = describe_file(paths[0]);
  const auto [b1, e1] = source_[1].dp_slice(0, kDp);
  std::ostringstream rank1;
  rank1 << "rank 1: tp 1, dp 0, slice [" << b1 << ", " << e1 << ") = " << e1 - b1 << " elements";
  for (const std::string& want :
       {std::string("format loom-snapshot v1, version 7, node 0 of 2"), std::string("tp_size 2, dp_size 2"),
        std::string("layout_hash 0x"), std::string("seed 18364758544493064720"),
        "config_toml: " + std::to_string(meta_of(7, 0).config_toml.size()) + " bytes",
        std::string("rank 0: tp 0, dp 0"), rank1.str(), std::string("total: 2 ranks")})
    EXPECT_NE(text.find(want), std::string::npos) << "lacks '" << want << "':\n" << text;
  EXPECT_EQ(error_of([&] { describe_file((dir_ / "nope.h5").string()); }).first, ErrorKind::kIo);
}

TEST_F(SnapshotH5, InconsistentArgumentsAreRejectedBeforeWriting) {
  const auto& layout = source_[0].arena->layout();
  const std::vector<SliceData> good = {slice_of(0), slice_of(1)};
  auto kind_of = [&](SnapshotMeta meta, std::vector<LayoutEntry> l, std::vector<SliceData> s) {
    return error_of([&] { write_node_file(dir_.string(), meta, l, s); }).first;
  };
  SnapshotMeta bad_node = meta_of(1, 0);
  bad_node.node = 2;
  EXPECT_EQ(kind_of(bad_node, layout, good), ErrorKind::kSnapshot);
  std::vector<SliceData> outside = good;
  outside[1].slice_end = source_[0].padded() + 1;
  EXPECT_EQ(kind_of(meta_of(1, 0), layout, outside), ErrorKind::kSnapshot);
  std::vector<SliceData> bad_tp = good;
  bad_tp[1].tp_rank = kTp;
  EXPECT_EQ(kind_of(meta_of(1, 0), layout, bad_tp), ErrorKind::kSnapshot);
  std::vector<SliceData> twice = {good[0], good[0]};
  EXPECT_EQ(kind_of(meta_of(1, 0), layout, twice), ErrorKind::kSnapshot);
  std::vector<LayoutEntry> slash = layout;
  slash[0].name = "emb/weight";
  EXPECT_EQ(kind_of(meta_of(1, 0), slash, good), ErrorKind::kSnapshot);
  SnapshotMeta other_tp = meta_of(1, 0);
  other_tp.tp_size = 4;  // the layout's shards are halves
  EXPECT_EQ(kind_of(other_tp, layout, good), ErrorKind::kSnapshot);
  EXPECT_EQ(files_in(dir_), (std::vector<std::string>{}));
}

}  // namespace
}  // namespace loom::snap
