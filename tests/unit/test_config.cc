// Tests of loom::Config (core/config.h): precedence across defaults, presets, TOML file, LOOM_* environment and
// CLI; the TOML reader and writer; every user error is a kConfig error naming what is wrong and where it came
// from; help, table, hash and the `--` passthrough.
//
// Assumes it may set and unset LOOM_* variables of its own process: each test starts with none set and puts
// back what was there before.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/env.h"
#include "core/error.h"
#include "core/rng.h"
#include "loom/train_config.h"

namespace loom {
namespace {

// The variables a small training program would declare.
struct Vars {
  int64_t steps = 200;
  int micro_batch = 8;
  double lr = 3e-4;
  float beta2 = 0.95f;
  bool verbose = false;
  std::string run_name = "run";
  std::string dtype = "f32";
  int ranks_per_node = 4;

  void add_to(Config& cfg) {
    cfg.add("train.steps", &steps, "optimizer steps to run");
    cfg.add("train.micro_batch", &micro_batch, "sequences per micro-batch");
    cfg.add("train.lr", &lr, "peak learning rate");
    cfg.add("optim.beta2", &beta2, "Adam beta2");
    cfg.add("log.verbose", &verbose, "log every step");
    cfg.add("log.run_name", &run_name, "name of the run");
    cfg.add_choice("model.dtype", &dtype, {"f32", "bf16"}, "compute dtype");
    cfg.add("parallel.ranks_per_node", &ranks_per_node, "ranks on each (emulated) node");
    cfg.add_check(
        "train.steps", [this] { return steps > 0; }, "must be positive");
    cfg.add_preset("small", {{"train.steps", "10"}, {"model.dtype", "bf16"}}, "tiny run for tests");
    cfg.add_preset("big", {{"train.steps", "1000"}, {"train.lr", "1e-3"}}, "long run");
  }
};

// argv for parse(): argv[0] is "prog".
class Args {
 public:
  Args(const std::vector<std::string>& args) : storage_{"prog"} {
    storage_.insert(storage_.end(), args.begin(), args.end());
    for (std::string& s : storage_) pointers_.push_back(s.data());
    pointers_.push_back(nullptr);
  }
  int argc() const { return static_cast<int>(storage_.size()); }
  char** argv() { return pointers_.data(); }

 private:
  std::vector<std::string> storage_;
  std::vector<char*> pointers_;
};

std::vector<std::string> parse(Config& cfg, const std::vector<std::string>& args) {
  Args a(args);
  return cfg.parse(a.argc(), a.argv());
}

// Runs fn, which must throw a config error whose message contains every one of `parts`.
void expect_config_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kConfig) << e.what();
    for (const std::string& part : parts) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
          << "message lacks '" << part << "':\n  " << e.what();
    }
    return;
  }
  ADD_FAILURE() << "expected a config error containing '" << (parts.empty() ? "" : parts[0]) << "'";
}

// Each test starts with no LOOM_* variables and gets the old ones back at the end; temp files are removed.
class ConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    saved_env_ = env::with_prefix("LOOM_");
    for (const auto& [name, value] : saved_env_) unsetenv(name.c_str());
  }
  void TearDown() override {
    for (const auto& [name, value] : env::with_prefix("LOOM_")) unsetenv(name.c_str());
    for (const auto& [name, value] : saved_env_) setenv(name.c_str(), value.c_str(), 1);
    for (const std::string& path : files_) std::filesystem::remove_all(path);
  }
  std::string write_file(const std::string& text) {
    std::string path = (std::filesystem::temp_directory_path() / ("loom_test_config_" + std::to_string(getpid()) + "_" +
                                                                  std::to_string(files_.size()) + ".toml"))
                           .string();
    std::ofstream(path) << text;
    files_.push_back(path);
    return path;
  }

  std::vector<std::pair<std::string, std::string>> saved_env_;
  std::vector<std::string> files_;
};

TEST_F(ConfigTest, DefaultsStayWhenNothingIsSet) {
  Config cfg;
  Vars v;
  v.add_to(cfg);
  EXPECT_TRUE(parse(cfg, {}).empty());
  EXPECT_EQ(v.steps, 200);
  EXPECT_EQ(v.lr, 3e-4);
  EXPECT_EQ(v.dtype, "f32");
  EXPECT_EQ(cfg.source("train.steps"), ConfigSource::kDefault);
  EXPECT_EQ(cfg.preset(), "");
  EXPECT_EQ(cfg.value_string("train.steps"), "200");
  EXPECT_EQ(cfg.value_string("optim.beta2"), "0.95");
  EXPECT_EQ(cfg.value_string("log.verbose"), "false");
}

// One key set by all five sources: each source, when present, beats every lower one.
TEST_F(ConfigTest, PrecedenceAcrossAllFiveSources) {
  struct Case {
    bool preset, file, env, cli;
    int64_t want;
    ConfigSource source;
  };
  const std::vector<Case> cases = {
      {false, false, false, false, 200, ConfigSource::kDefault}, {true, false, false, false, 10, ConfigSource::kPreset},
      {true, true, false, false, 20, ConfigSource::kFile},       {true, true, true, false, 30, ConfigSource::kEnv},
      {true, true, true, true, 40, ConfigSource::kCli},          {false, false, true, true, 40, ConfigSource::kCli},
      {false, true, true, false, 30, ConfigSource::kEnv},        {true, false, false, true, 40, ConfigSource::kCli},
  };
  const std::string file = write_file("[train]\nsteps = 20\n");
  for (const Case& c : cases) {
    Config cfg;
    Vars v;
    v.add_to(cfg);
    if (c.preset) cfg.set_default_preset("small");
    if (c.file) setenv("LOOM_CONFIG", file.c_str(), 1);
    if (c.env) setenv("LOOM_STEPS", "30", 1);
    if (c.cli) {
      parse(cfg, {"--steps", "40"});
    } else {
      parse(cfg, {});
    }
    unsetenv("LOOM_CONFIG");
    unsetenv("LOOM_STEPS");
    SCOPED_TRACE(testing::Message() << "preset " << c.preset << " file " << c.file << " env " << c.env << " cli "
                                    << c.cli);
    EXPECT_EQ(v.steps, c.want);
    EXPECT_EQ(cfg.source("train.steps"), c.source) << config_source_name(cfg.source("train.steps"));
  }
}

// Different keys from different sources in one parse, and the table that reports them.
TEST_F(ConfigTest, EachSourceFillsItsKeysAndTheTableSaysWhich) {
  const std::string file = write_file("preset = \"small\"\n[train]\nlr = 1\nsteps = 77\n");
  setenv("LOOM_MICRO_BATCH", "3", 1);
  setenv("LOOM_STEPS", "55", 1);
  Config cfg;
  Vars v;
  v.add_to(cfg);
  parse(cfg, {"--config", file, "--steps=66", "--beta2", "0.999"});
  EXPECT_EQ(v.dtype, "bf16");   // preset
  EXPECT_EQ(v.lr, 1.0);         // file, an integer given to a float key
  EXPECT_EQ(v.micro_batch, 3);  // env
  EXPECT_EQ(v.steps, 66);       // in file, env and CLI: CLI wins
  EXPECT_EQ(v.beta2, 0.999f);   // CLI
  EXPECT_EQ(cfg.source("model.dtype"), ConfigSource::kPreset);
  EXPECT_EQ(cfg.source("train.lr"), ConfigSource::kFile);
  EXPECT_EQ(cfg.source("train.micro_batch"), ConfigSource::kEnv);
  EXPECT_EQ(cfg.source("train.steps"), ConfigSource::kCli);
  EXPECT_EQ(cfg.source("log.run_name"), ConfigSource::kDefault);

  const std::string table = cfg.table();
  std::istringstream lines(table);
  std::vector<std::string> rows;
  for (std::string line; std::getline(lines, line);) rows.push_back(line);
  ASSERT_EQ(rows.size(), 9u) << table;
  // Aligned: every row has its value at the same column.
  const size_t value_column = rows[0].find("value");
  for (const std::string& row : rows) {
    EXPECT_NE(row[value_column], ' ') << table;
    EXPECT_EQ(row[value_column - 1], ' ') << table;
  }
  // Each row split into its words: key, value, source (and the preset's name).
  auto row_of = [&](const std::string& key) {
    for (const std::string& row : rows) {
      std::istringstream words(row);
      std::vector<std::string> out;
      for (std::string w; words >> w;) out.push_back(w);
      if (!out.empty() && out[0] == key) return out;
    }
    return std::vector<std::string>{};
  };
  using Row = std::vector<std::string>;
  EXPECT_EQ(row_of("key"), (Row{"key", "value", "source"})) << table;
  EXPECT_EQ(row_of("train.steps"), (Row{"train.steps", "66", "cli"})) << table;
  EXPECT_EQ(row_of("train.lr"), (Row{"train.lr", "1", "file"})) << table;
  EXPECT_EQ(row_of("train.micro_batch"), (Row{"train.micro_batch", "3", "env"})) << table;
  EXPECT_EQ(row_of("model.dtype"), (Row{"model.dtype", "bf16", "preset", "small"})) << table;
  EXPECT_EQ(row_of("log.run_name"), (Row{"log.run_name", "run", "default"})) << table;
  EXPECT_EQ(row_of("optim.beta2"), (Row{"optim.beta2", "0.999", "cli"})) << table;
}

TEST_F(ConfigTest, TomlFileWithEveryType) {
  const std::string file = write_file(
      "# a comment\n"
      "[train]\n"
      "steps = 1234\n"
      "micro_batch = -2\n"
      "lr = 2.5e-3\n"
      "[optim]\n"
      "beta2 = 0.98\n"
      "[log]\n"
      "verbose = true\n"
      "run_name = \"a \\\"quoted\\\" name\"\n"
      "[model]\n"
      "dtype = 'bf16'\n"
      "[parallel]\n"
      "ranks_per_node = 2\n");
  Config cfg;
  Vars v;
  v.add_to(cfg);
  parse(cfg, {"--config=" + file});
  EXPECT_EQ(v.steps, 1234);
  EXPECT_EQ(v.micro_batch, -2);
  EXPECT_EQ(v.lr, 2.5e-3);
  EXPECT_EQ(v.beta2, 0.98f);
  EXPECT_TRUE(v.verbose);
  EXPECT_EQ(v.run_name, "a \"quoted\" name");
  EXPECT_EQ(v.dtype, "bf16");
  EXPECT_EQ(v.ranks_per_node, 2);
  EXPECT_EQ(cfg.source("parallel.ranks_per_node"), ConfigSource::kFile);

  // Dotted keys at the top level are the same keys.
  Config cfg2;
  Vars v2;
  v2.add_to(cfg2);
  parse(cfg2, {"--config", write_file("train.steps = 9\nparallel.ranks_per_node = 3\n")});
  EXPECT_EQ(v2.steps, 9);
  EXPECT_EQ(v2.ranks_per_node, 3);
}

TEST_F(ConfigTest, CliSpellings) {
  const std::vector<std::vector<std::string>> spellings = {
      {"--ranks-per-node", "7"},          {"--ranks_per_node", "7"},       {"--ranks-per-node=7"},
      {"--parallel.ranks_per_node", "7"}, {"--parallel.ranks-per-node=7"},
  };
  for (const auto& spelling : spellings) {
    Config cfg;
    Vars v;
    v.add_to(cfg);
    parse(cfg, spelling);
    EXPECT_EQ(v.ranks_per_node, 7) << spelling[0];
  }
  Config cfg;
  Vars v;
  v.add_to(cfg);
  parse(cfg, {"--lr", "-1.5e-4", "--micro-batch", "-3", "--run-name="});
  EXPECT_EQ(v.lr, -1.5e-4);  // a value may start with a single '-'
  EXPECT_EQ(v.micro_batch, -3);
  EXPECT_EQ(v.run_name, "");
}

TEST_F(ConfigTest, BoolForms) {
  struct Case {
    std::vector<std::string> args;
    bool want;
  };
  const std::vector<Case> cases = {
      {{"--verbose"}, true},         {{"--verbose", "--steps", "5"}, true},
      {{"--verbose", "--"}, true},   {{"--verbose=false"}, false},
      {{"--verbose", "no"}, false},  {{"--verbose", "on"}, true},
      {{"--verbose", "TRUE"}, true}, {{"--verbose=0"}, false},
      {{"--verbose", "1"}, true},    {{"--verbose=off"}, false},
      {{"--log.verbose"}, true},     {{"--verbose=yes"}, true},
  };
  for (const Case& c : cases) {
    Config cfg;
    Vars v;
    v.verbose = !c.want;
    v.add_to(cfg);
    parse(cfg, c.args);
    EXPECT_EQ(v.verbose, c.want) << c.args[0] << (c.args.size() > 1 ? " " + c.args[1] : "");
    EXPECT_EQ(cfg.value_string("log.verbose"), c.want ? "true" : "false");
  }
  for (const char* text : {"yes", "1", "On"}) {
    setenv("LOOM_VERBOSE", text, 1);
    Config cfg;
    Vars v;
    v.add_to(cfg);
    parse(cfg, {});
    EXPECT_TRUE(v.verbose) << text;
  }
}

TEST_F(ConfigTest, ArgumentsAfterDoubleDashPassThrough) {
  Config cfg;
  Vars v;
  v.add_to(cfg);
  std::vector<std::string> rest = parse(cfg, {"--steps", "5", "--", "--steps", "9", "data.bin", "--", "-h"});
  EXPECT_EQ(v.steps, 5);
  EXPECT_EQ(rest, (std::vector<std::string>{"--steps", "9", "data.bin", "--", "-h"}));
  EXPECT_FALSE(cfg.help_requested());
}

TEST_F(ConfigTest, PresetFromEachSource) {
  const std::string file_small = write_file("preset = \"small\"\n");
  struct Case {
    std::string cli, env, file, default_preset, want;
  };
  const std::vector<Case> cases = {
      {"", "", "", "", ""},
      {"", "", "", "big", "big"},
      {"", "", "small", "big", "small"},
      {"", "big", "small", "", "big"},
      {"small", "big", "", "", "small"},
      {"big", "small", "small", "small", "big"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE("cli '" + c.cli + "' env '" + c.env + "' file '" + c.file + "' default '" + c.default_preset + "'");
    Config cfg;
    Vars v;
    v.add_to(cfg);
    if (!c.default_preset.empty()) cfg.set_default_preset(c.default_preset);
    if (!c.env.empty()) setenv("LOOM_PRESET", c.env.c_str(), 1);
    if (!c.file.empty()) setenv("LOOM_CONFIG", file_small.c_str(), 1);
    if (c.cli.empty()) {
      parse(cfg, {});
    } else {
      parse(cfg, {"--preset", c.cli});
    }
    unsetenv("LOOM_PRESET");
    unsetenv("LOOM_CONFIG");
    EXPECT_EQ(cfg.preset(), c.want);
    const int64_t want_steps = c.want == "small" ? 10 : c.want == "big" ? 1000 : 200;
    EXPECT_EQ(v.steps, want_steps);
    EXPECT_EQ(v.dtype, c.want == "small" ? "bf16" : "f32");
    EXPECT_EQ(v.lr, c.want == "big" ? 1e-3 : 3e-4);
    EXPECT_EQ(cfg.source("train.steps"), c.want.empty() ? ConfigSource::kDefault : ConfigSource::kPreset);
  }
  // --preset= chooses none, even over a default.
  Config cfg;
  Vars v;
  v.add_to(cfg);
  cfg.set_default_preset("big");
  parse(cfg, {"--preset="});
  EXPECT_EQ(cfg.preset(), "");
  EXPECT_EQ(v.steps, 200);
}

TEST_F(ConfigTest, EveryUserErrorNamesWhatAndWhere) {
  auto with = [](std::vector<std::string> args) {
    return [args] {
      Config cfg;
      Vars v;
      v.add_to(cfg);
      Args a(args);
      cfg.parse(a.argc(), a.argv());
    };
  };
  // Unknown keys, with the closest known one.
  const std::string typo = write_file("[train]\nsteps = 5\nstepz = 10\n");
  expect_config_error(with({"--config", typo}), {"'train.stepz'", typo, "line 3", "did you mean 'train.steps'"});
  expect_config_error(with({"--stepz", "5"}), {"'--stepz'", "command line", "did you mean '--steps'"});
  expect_config_error(with({"--train.stepz=5"}), {"'--train.stepz'", "command line", "'--train.steps'"});
  expect_config_error(with({"--completely-unrelated", "1"}), {"'--completely-unrelated'", "command line"});

  // Values of the wrong type, from each source.
  expect_config_error(with({"--steps", "ten"}), {"train.steps expects an integer, got 'ten' (from --steps)"});
  expect_config_error(with({"--steps", "1.5"}), {"train.steps", "the float ", "'1.5'", "--steps"});
  expect_config_error(with({"--steps=1e3"}), {"train.steps", "the float ", "'1e3'"});
  expect_config_error(with({"--micro-batch", "3000000000"}), {"train.micro_batch", "32-bit", "'3000000000'"});
  expect_config_error(with({"--steps", "99999999999999999999"}), {"train.steps", "64-bit"});
  expect_config_error(with({"--lr", "fast"}), {"train.lr", "number", "'fast'", "--lr"});
  expect_config_error(with({"--lr", "nan"}), {"train.lr", "'nan'"});
  expect_config_error(with({"--beta2", "1e300"}), {"optim.beta2", "32-bit float", "'1e300'"});
  expect_config_error(with({"--verbose=maybe"}), {"log.verbose", "bool", "'maybe'", "--verbose"});
  expect_config_error(with({"--dtype", "f16"}), {"model.dtype", "'f16'", "f32", "bf16"});
  const std::string float_file = write_file("[train]\nsteps = 3.0\n");
  expect_config_error(with({"--config", float_file}), {"train.steps", "the float ", "'3.0'", float_file, "line 2"});
  const std::string string_file = write_file("[train]\nsteps = \"ten\"\n");
  expect_config_error(with({"--config", string_file}), {"train.steps", "'ten'", string_file});
  const std::string array_file = write_file("[train]\nsteps = [1, 2]\n");
  expect_config_error(with({"--config", array_file}), {"train.steps", "array", array_file});
  setenv("LOOM_STEPS", "ten", 1);
  expect_config_error(with({}), {"train.steps", "'ten'", "LOOM_STEPS"});
  unsetenv("LOOM_STEPS");

  // The file itself.
  const std::string missing = "/nonexistent/loom/config.toml";
  expect_config_error(with({"--config", missing}), {missing, "does not exist", "--config"});
  setenv("LOOM_CONFIG", missing.c_str(), 1);
  expect_config_error(with({}), {missing, "LOOM_CONFIG"});
  unsetenv("LOOM_CONFIG");
  const std::string dir = std::filesystem::temp_directory_path().string();
  expect_config_error(with({"--config", dir}), {dir, "directory"});
  if (geteuid() != 0) {
    const std::string locked = write_file("[train]\nsteps = 1\n");
    std::filesystem::permissions(locked, std::filesystem::perms::none);
    expect_config_error(with({"--config", locked}), {locked, "cannot be read"});
  } else {
    std::cout << "note: running as root, the unreadable-file case is covered by the directory case only\n";
  }
  const std::string broken = write_file("[train]\nsteps = = 5\n");
  expect_config_error(with({"--config", broken}), {broken, "line 2, column"});

  // Presets, checks and stray arguments.
  expect_config_error(with({"--preset", "huge"}), {"'huge'", "--preset", "big, small"});
  setenv("LOOM_PRESET", "huge", 1);
  expect_config_error(with({}), {"'huge'", "LOOM_PRESET", "big, small"});
  unsetenv("LOOM_PRESET");
  expect_config_error(with({"--config", write_file("preset = \"huge\"\n")}), {"'huge'", "file", "big, small"});
  expect_config_error(with({"--steps", "0"}), {"train.steps must be positive, got 0 (from --steps)"});
  expect_config_error(with({"data.bin"}), {"unexpected argument 'data.bin'"});
  expect_config_error(with({"-x"}), {"'-x'"});
  expect_config_error(with({"--steps"}), {"'--steps'", "needs a value"});
  expect_config_error(with({"--steps", "--lr", "1"}), {"'--steps'", "needs a value"});
}

TEST_F(ConfigTest, DeclarationMistakesAreInternalErrors) {
  auto expect_internal = [](const std::function<void(Config&)>& declare, const std::string& part) {
    Config cfg;
    try {
      declare(cfg);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kInternal) << e.what();
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
      return;
    }
    ADD_FAILURE() << "expected an internal error containing '" << part << "'";
  };
  int64_t a = 0, b = 0;
  std::string s = "x";
  expect_internal([&](Config& c) { c.add("train.lr", &a, ""), c.add("optim.lr", &b, ""); }, "LOOM_LR");
  expect_internal([&](Config& c) { c.add("train.lr", &a, ""), c.add("train.lr", &b, ""); }, "twice");
  expect_internal([&](Config& c) { c.add("lr", &a, ""); }, "section.name");
  expect_internal([&](Config& c) { c.add("Train.lr", &a, ""); }, "lower-case");
  expect_internal([&](Config& c) { c.add("train.preset", &a, ""); }, "reserved");
  expect_internal([&](Config& c) { c.add("a.b", &a, ""), c.add("a.b.c", &b, ""); }, "nest");
  expect_internal([&](Config& c) { c.add_choice("m.mode", &s, {"y", "z"}, ""); }, "not one of");
  expect_internal([&](Config& c) { c.set_default_preset("nope"); }, "nope");
  expect_internal(
      [&](Config& c) {
        c.add_check(
            "train.nope", [] { return true; }, "");
      },
      "train.nope");
}

TEST_F(ConfigTest, HelpListsFlagsEnvNamesDefaultsAndPresets) {
  for (const char* flag : {"--help", "-h"}) {
    Config cfg;
    Vars v;
    v.add_to(cfg);
    cfg.set_default_preset("small");
    std::vector<std::string> rest = parse(cfg, {"--steps", "ten", flag, "--", "x"});
    EXPECT_TRUE(cfg.help_requested()) << flag;
    EXPECT_EQ(rest, std::vector<std::string>{"x"});
    EXPECT_EQ(v.steps, 200) << "help applies nothing";
    const std::string help = cfg.help();
    for (const char* part : {"Usage: prog",
                             "--ranks-per-node INT",
                             "LOOM_RANKS_PER_NODE",
                             "parallel.ranks_per_node",
                             "ranks on each (emulated) node",
                             "default '4'",
                             "--lr FLOAT",
                             "LOOM_LR",
                             "default '0.0003'",
                             "--verbose[=BOOL]",
                             "--dtype {f32|bf16}",
                             "--run-name STR",
                             "--config FILE",
                             "LOOM_CONFIG",
                             "--preset NAME",
                             "LOOM_PRESET",
                             "default: small",
                             "tiny run for tests",
                             "train.steps=10",
                             "[parallel]"}) {
      EXPECT_NE(help.find(part), std::string::npos) << "help lacks '" << part << "':\n" << help;
    }
  }
}

// Random values (fixed seed) written by to_toml() and read back by parse() come back identical, with the same
// hash; a preset in effect is written too.
TEST_F(ConfigTest, ToTomlRoundTripsRandomValues) {
  Philox rng(20240611);
  for (int trial = 0; trial < 20; ++trial) {
    Config out_cfg;
    Vars out;
    out.add_to(out_cfg);
    parse(out_cfg, {"--preset", trial % 2 ? "big" : "small"});
    const auto u = [&] { return rng.next_u64(); };
    out.steps = static_cast<int64_t>(u() >> (u() % 63)) | 1;  // positive (the check wants it), any magnitude
    out.micro_batch = static_cast<int>(static_cast<int32_t>(u()));
    out.lr = (rng.next_uniform() - 0.5) * std::pow(10.0, static_cast<int>(u() % 40) - 20);
    out.beta2 = static_cast<float>(rng.next_normal() * std::pow(10.0f, static_cast<int>(u() % 20) - 10));
    out.verbose = u() & 1;
    out.run_name.clear();
    for (int i = 0; i < 12; ++i) out.run_name += static_cast<char>(1 + u() % 127);  // control chars, quotes, '\\'
    out.run_name += "\xc3\xa9";                                                     // and UTF-8
    out.dtype = u() & 1 ? "bf16" : "f32";
    const std::string toml = out_cfg.to_toml();

    Config in_cfg;
    Vars in;
    in.add_to(in_cfg);
    parse(in_cfg, {"--config", write_file(toml)});
    SCOPED_TRACE(toml);
    EXPECT_EQ(in.steps, out.steps);
    EXPECT_EQ(in.micro_batch, out.micro_batch);
    EXPECT_EQ(in.lr, out.lr) << "difference " << in.lr - out.lr;
    EXPECT_EQ(in.beta2, out.beta2) << "difference " << in.beta2 - out.beta2;
    EXPECT_EQ(in.verbose, out.verbose);
    EXPECT_EQ(in.run_name, out.run_name);
    EXPECT_EQ(in.dtype, out.dtype);
    EXPECT_EQ(in.ranks_per_node, out.ranks_per_node);
    EXPECT_EQ(in_cfg.preset(), out_cfg.preset());
    EXPECT_EQ(in_cfg.hash(), out_cfg.hash());
    EXPECT_EQ(in_cfg.to_toml(), toml);
  }
}

TEST_F(ConfigTest, HashFollowsValuesOnly) {
  Config a, b;
  Vars va, vb;
  va.add_to(a);
  vb.add_to(b);
  parse(a, {});
  parse(b, {"--steps", "200", "--lr=0.0003"});  // same values, other sources
  EXPECT_EQ(a.hash(), b.hash());
  const uint64_t before = a.hash();
  a.set("train.lr", "3e-4", ConfigSource::kCli);
  EXPECT_EQ(a.hash(), before);
  a.set("train.lr", "3.0001e-4", ConfigSource::kCli);
  EXPECT_NE(a.hash(), before);
  a.set("train.lr", "0.0003", ConfigSource::kFile);
  EXPECT_EQ(a.hash(), before);
  for (const char* key : {"train.steps", "log.verbose", "log.run_name", "model.dtype", "optim.beta2"}) {
    Config c;
    Vars vc;
    vc.add_to(c);
    parse(c, {});
    const std::string value = std::string(key) == "log.verbose"   ? "true"
                              : std::string(key) == "model.dtype" ? "bf16"
                                                                  : "17";
    c.set(key, value, ConfigSource::kCli);
    EXPECT_NE(c.hash(), before) << key;
  }
}

TEST_F(ConfigTest, SetValidatesLikeParse) {
  Config cfg;
  Vars v;
  v.add_to(cfg);
  cfg.set("train.steps", "12", ConfigSource::kEnv);
  EXPECT_EQ(v.steps, 12);
  EXPECT_EQ(cfg.source("train.steps"), ConfigSource::kEnv);
  expect_config_error([&] { cfg.set("train.steps", "0", ConfigSource::kCli); }, {"must be positive"});
  expect_config_error([&] { cfg.set("train.steps", "x", ConfigSource::kCli); }, {"train.steps", "'x'"});
  expect_config_error([&] { cfg.set("train.stepz", "1", ConfigSource::kCli); }, {"'train.stepz'", "train.steps"});
  expect_config_error([&] { cfg.set("model.dtype", "f64", ConfigSource::kCli); }, {"'f64'", "bf16"});
}

TEST_F(ConfigTest, UnknownEnvVariablesAreReportedNotFatal) {
  setenv("LOOM_STEPZ", "5", 1);
  setenv("LOOM_LOG_LEVEL", "info", 1);
  setenv("LOOM_STEPS", "", 1);  // empty: as if unset
  setenv("LOOM_CONFIG", "", 1);
  Config cfg;
  Vars v;
  v.add_to(cfg);
  cfg.allow_env("LOOM_LOG_LEVEL");
  parse(cfg, {});
  EXPECT_EQ(cfg.unknown_env(), std::vector<std::string>{"LOOM_STEPZ"});
  EXPECT_EQ(v.steps, 200);
  cfg.warn_unknown_env();
}

// The harness's and scripts' own variables (LOOM_BIN, ...) reach every program they start; the trainer's keys do
// not warn about them, but still about a misspelt setting.
TEST_F(ConfigTest, TrainerKnowsTheScriptsVariables) {
  setenv("LOOM_STEPZ", "5", 1);
  setenv("LOOM_BIN", "/somewhere/bin", 1);
  setenv("LOOM_SOURCE_DIR", "/src", 1);
  setenv("LOOM_MPIRUN", "mpirun", 1);
  Config cfg;
  TrainConfig train;
  train.declare(cfg);
  parse(cfg, {});
  EXPECT_EQ(cfg.unknown_env(), std::vector<std::string>{"LOOM_STEPZ"});
}

}  // namespace
}  // namespace loom
