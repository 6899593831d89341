#include "parallel/fused_tuning.h"

#include <fstream>
#include <sstream>

#include "core/error.h"

namespace loom {

namespace {
// Why an entry cannot be in the table, or "".
std::string invalid(long long ranks, long long bytes) {
  if (ranks < 2 || ranks > 8) return "group size " + std::to_string(ranks) + " (the fused kernels take 2..8 ranks)";
  if (bytes < 0) return "negative byte count " + std::to_string(bytes);
  return "";
}
}  // namespace

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
    LOOM_CHECK(t.limits_.count(static_cast<int>(ranks)) == 0, kConfig,
               source << ":" << number << ": group size " << ranks << " appears twice");
    const std::string why = invalid(ranks, bytes);
    LOOM_CHECK(why.empty(), kConfig, source << ":" << number << ": " << why);
    t.limits_[static_cast<int>(ranks)] = bytes;
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

void FusedTuning::set(int ranks, int64_t one_shot_max_bytes) {
  const std::string why = invalid(ranks, one_shot_max_bytes);
  LOOM_CHECK(why.empty(), kConfig, "fused tuning: " << why);
  limits_[ranks] = one_shot_max_bytes;
}

void FusedTuning::write(std::ostream& out, const std::string& comment) const {
  std::istringstream lines(comment);
  for (std::string line; std::getline(lines, line);) out << "# " << line << "\n";
  for (const auto& [ranks, bytes] : limits_) out << "ranks " << ranks << " one_shot_max_bytes " << bytes << "\n";
}

int64_t FusedTuning::one_shot_max_bytes(int ranks) const {
  auto it = limits_.find(ranks);
  return it == limits_.end() ? kDefaultOneShotMaxBytes : it->second;
}

}  // namespace loom
