// Element types and devices. f32 is the CPU compute type and the type of master weights and optimizer state;
// bf16 is the GPU compute type; i32/u16 hold tokens.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace loom {

enum class DType : uint8_t { kF32, kBF16, kI32, kU16 };
enum class Device : uint8_t { kCpu, kCuda };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kBF16: return 2;
    case DType::kI32: return 4;
    case DType::kU16: return 2;
  }
  return 0;
}
const char* dtype_name(DType t);
const char* device_name(Device d);

// bfloat16 on the host: the upper 16 bits of an f32, rounded to nearest even (NaN kept NaN).
struct bf16 {
  uint16_t bits;
};
inline bf16 f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}
inline float bf16_to_f32(bf16 h) {
  uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace loom
