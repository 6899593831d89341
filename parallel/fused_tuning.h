// The fused all-reduce + RMSNorm kernels' algorithm table (docs/fused_norm.md): for each TP group size, one-shot
// up to one_shot_max_bytes of partial per call, two-shot above. bench/fused_norm_bench --tuning-out writes it
// after timing both algorithms; the device communicators read it (parallel.fused_tuning, through cuda::FusedNormPath). A text file:
//
//   # comment
//   ranks 2 one_shot_max_bytes 1048576
//   ranks 4 one_shot_max_bytes 262144
//
// Group sizes the table does not list get the default (kDefaultOneShotMaxBytes). The benchmark times the forward
// kernel; the backward (the same staging and barriers, a little more arithmetic) follows the same table.
#pragma once

#include <cstdint>
#include <istream>
#include <map>
#include <ostream>
#include <string>

namespace loom {

class FusedTuning {
 public:
  static constexpr int64_t kDefaultOneShotMaxBytes = int64_t{512} << 10;

  FusedTuning() = default;  // the default for every group size
  // Throws kConfig naming `source` and the line for anything else than comments, blank lines and well-formed
  // entries (group sizes 2..8, each once; bytes >= 0).
  static FusedTuning parse(std::istream& in, const std::string& source);
  // "" gives the default table; a file that cannot be read throws kConfig naming it.
  static FusedTuning load(const std::string& path);

  int64_t one_shot_max_bytes(int ranks) const;
  bool one_shot(int ranks, int64_t bytes) const { return bytes <= one_shot_max_bytes(ranks); }
  const std::map<int, int64_t>& entries() const { return limits_; }
  // Sets (or replaces) one group size's entry; throws kConfig outside 2..8 or for negative bytes.
  void set(int ranks, int64_t one_shot_max_bytes);
  // The file parse() reads: `comment` as # lines, then one line per entry.
  void write(std::ostream& out, const std::string& comment) const;

 private:
  std::map<int, int64_t> limits_;
};

}  // namespace loom
