// The fused kernels' algorithm table (parallel/fused_tuning.h): what the benchmark writes is read back, the
// default where the table is silent, and errors that name the file and line.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "core/error.h"
#include "parallel/fused_tuning.h"

namespace loom {
namespace {

FusedTuning parse(const std::string& text) {
  std::istringstream in(text);
  return FusedTuning::parse(in, "table.txt");
}

std::string error_of(const std::string& text) {
  try {
    parse(text);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(FusedTuning, ReadsTheBenchmarksTableAndDefaultsElsewhere) {
  const FusedTuning t = parse(
      "# written by bench/fused_norm_bench\n\nranks 2 one_shot_max_bytes 1048576\n  ranks 4 one_shot_max_bytes 0\n");
  EXPECT_EQ(t.entries().size(), 2u);
  EXPECT_EQ(t.one_shot_max_bytes(2), 1048576);
  EXPECT_TRUE(t.one_shot(2, 1048576));
  EXPECT_FALSE(t.one_shot(2, 1048577));
  EXPECT_FALSE(t.one_shot(4, 2));  // 0: always two-shot
  EXPECT_EQ(t.one_shot_max_bytes(8), FusedTuning::kDefaultOneShotMaxBytes);
  const FusedTuning d;
  EXPECT_TRUE(d.one_shot(2, FusedTuning::kDefaultOneShotMaxBytes));
  EXPECT_FALSE(d.one_shot(2, FusedTuning::kDefaultOneShotMaxBytes + 1));
  EXPECT_TRUE(FusedTuning::load("").entries().empty());
}

TEST(FusedTuning, BadTablesNameTheFileAndLine) {
  EXPECT_NE(error_of("ranks 2 one_shot_max_bytes 1\nranks 2 one_shot_max_bytes 5\n").find("table.txt:2"),
            std::string::npos);
  EXPECT_NE(error_of("ranks 2 one_shot_max 1\n").find("table.txt:1: expected"), std::string::npos);
  EXPECT_NE(error_of("ranks 2 one_shot_max_bytes 1 extra\n").find("table.txt:1"), std::string::npos);
  EXPECT_NE(error_of("ranks 9 one_shot_max_bytes 1\n").find("2..8"), std::string::npos);
  EXPECT_NE(error_of("ranks 2 one_shot_max_bytes -4\n").find("negative"), std::string::npos);
  EXPECT_NE(error_of("\n\nranks two one_shot_max_bytes 4\n").find("table.txt:3"), std::string::npos);
  try {
    FusedTuning::load("/nonexistent/loom-tuning.txt");
    ADD_FAILURE() << "a missing table must be an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/loom-tuning.txt"), std::string::npos) << e.what();
  }
}

TEST(FusedTuning, WritesWhatItReadsAndReplacesAnEntry) {
  const std::string path = ::testing::TempDir() + "loom_fused_tuning_test.txt";
  std::ofstream(path) << "ranks 8 one_shot_max_bytes 65536\n";
  FusedTuning t = FusedTuning::load(path);
  EXPECT_EQ(t.one_shot_max_bytes(8), 65536);
  t.set(2, 1 << 20);
  t.set(8, 4096);  // replaces
  EXPECT_THROW(t.set(1, 5), Error);
  EXPECT_THROW(t.set(2, -1), Error);
  {
    std::ofstream out(path);
    t.write(out, "written by the test\nsecond comment line");
  }
  const FusedTuning back = FusedTuning::load(path);
  EXPECT_EQ(back.entries(), t.entries());
  EXPECT_EQ(back.one_shot_max_bytes(8), 4096);
  EXPECT_EQ(back.one_shot_max_bytes(2), 1 << 20);
  std::remove(path.c_str());
}

}  // namespace
}  // namespace loom
