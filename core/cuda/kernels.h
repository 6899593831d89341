// Launchers shared between the CUDA kernel files: element-type conversion and fill, used by copy() and fill()
// and by kernels that write either f32 or bf16. Each enqueues on `stream` and checks the launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"

namespace loom::cuda {

// dst[i] = convert(src[i]) for f32 <-> bf16 (and same-type copies), n elements, both on the device.
void launch_convert(void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t n, cudaStream_t stream);
// dst[i] = value for f32, bf16, i32 (value cast) and u16.
void launch_fill(void* dst, DType dtype, float value, int64_t n, cudaStream_t stream);

// Blocks for a grid-stride loop over n elements with `threads` per block, capped so the grid stays resident.
inline unsigned grid_for(int64_t n, int threads, int max_blocks = 65535) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > max_blocks) b = max_blocks;
  return static_cast<unsigned>(b);
}

}  // namespace loom::cuda
