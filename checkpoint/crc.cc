#include "checkpoint/crc.h"

#include <isa-l/crc.h>

#include <algorithm>

namespace loom {

// ISA-L's length is 64-bit; the 1 GiB pieces only bound the time of one call.
uint32_t crc32(const void* data, size_t len, uint32_t seed) {
  constexpr size_t kPiece = size_t{1} << 30;
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t crc = seed;
  while (len > 0) {
    size_t n = std::min(len, kPiece);
    crc = crc32_gzip_refl(crc, p, n);
    p += n;
    len -= n;
  }
  return crc;
}

}  // namespace loom
