// Counter-based random numbers (Philox-4x32-10, Salmon et al. 2011). A draw is a pure function of
// (seed, stream, index), so any rank can produce any element of a parameter's initial values, or any sample
// of the data order, without drawing the ones before it; a generator's whole state is (seed, offset), which a
// snapshot stores.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

namespace loom {

// One Philox block: 4 x 32 random bits for counter (counter_lo, counter_hi) under key.
std::array<uint32_t, 4> philox4x32(uint64_t key, uint64_t counter_lo, uint64_t counter_hi);

// Stream ids that keep independent uses apart.
enum class RngStream : uint64_t { kInit = 1, kData = 2, kUser = 3, kDataVal = 4 };

uint64_t random_u64(uint64_t seed, uint64_t stream, uint64_t index);
// Uniform in [0, 1).
double random_uniform(uint64_t seed, uint64_t stream, uint64_t index);
// Standard normal (Box-Muller on one block).
float random_normal(uint64_t seed, uint64_t stream, uint64_t index);

// 64-bit FNV-1a, for deriving per-parameter streams from names and for config/layout hashes.
uint64_t fnv1a64(std::string_view bytes, uint64_t h = 1469598103934665603ull);

// A sequential generator over one stream; state (seed, offset) can be saved and restored exactly.
class Philox {
 public:
  explicit Philox(uint64_t seed, uint64_t offset = 0, uint64_t stream = static_cast<uint64_t>(RngStream::kUser))
      : seed_(seed), offset_(offset), stream_(stream) {}
  uint64_t next_u64() { return random_u64(seed_, stream_, offset_++); }
  double next_uniform() { return random_uniform(seed_, stream_, offset_++); }
  float next_normal() { return random_normal(seed_, stream_, offset_++); }
  uint64_t seed() const { return seed_; }
  uint64_t offset() const { return offset_; }
  void set_offset(uint64_t offset) { offset_ = offset; }

 private:
  uint64_t seed_, offset_, stream_;
};

}  // namespace loom
