// CRC-32 of snapshot bytes: the daemon checksums a staged buffer before committing it and checks it again before
// restoring from it. The polynomial is gzip/zlib's (reflected 0x04C11DB7), so a value can be checked with any
// zlib (`python3 -c "import zlib; print(zlib.crc32(b))"`); ISA-L computes it with carry-less multiplies.
#pragma once

#include <cstddef>
#include <cstdint>

namespace loom {

// CRC-32 (gzip/zlib) of data[0..len), continuing from `seed` (the CRC of the bytes before, 0 to start):
//   crc32(ab, na + nb) == crc32(b, nb, crc32(a, na)).
uint32_t crc32(const void* data, size_t len, uint32_t seed = 0);

}  // namespace loom
