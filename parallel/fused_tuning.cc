#include "parallel/fused_tuning.h"

#include <fstream>
#include <sstream>

#include "core/error.h"

namespace loom {

FusedTuning FusedTuning::parse(std::istream& in, const std::string& source) {
  FusedTuning t;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    std::istringstream words(line);
    std::string first;
    if (!(words >> first) || first[0] == '#') continue;
    std::string key;
    long long ranks = 0, bytes = 0;
    std::string rest;
    const bool ok = first == "ranks" && (words >> ranks >> key >> bytes) && key == "one_shot_max_bytes" &&
                    !(words >> rest);
    LOOM_CHECK(ok, kConfig,
               source << ":" << number << ": expected 'ranks N one_shot_max_bytes B', got '" << line << "'");
    LOOM_CHECK(ranks >= 2 && ranks <= 8, kConfig,
               source << ":" << number << ": group size " << ranks << " (the fused kernels take 2..8 ranks)");
    LOOM_CHECK(bytes >= 0, kConfig, source << ":" << number << ": negative byte count " << bytes);
    LOOM_CHECK(t.limits_.emplace(static_cast<int>(ranks), bytes).second, kConfig,
               source << ":" << number << ": group size " << ranks << " appears twice");
  }
  return t;
}

FusedTuning FusedTuning::load(const std::string& path) {
  if (path.empty()) return FusedTuning();
  std::ifstream in(path);
  LOOM_CHECK(in.good(), kConfig,
             "parallel.fused_tuning: cannot read '" << path << "' (written by bench/fused_norm_bench --tuning-out)");
  return parse(in, path);
}

int64_t FusedTuning::one_shot_max_bytes(int ranks) const {
  auto it = limits_.find(ranks);
  return it == limits_.end() ? kDefaultOneShotMaxBytes : it->second;
}

}  // namespace loom
