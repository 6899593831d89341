// The checking macros for CUDA runtime and cuBLAS calls: every call's result is checked with file and line,
// and the message names the call.
#pragma once

#include <cuda_runtime.h>

#include "core/error.h"

#define LOOM_CUDA_CHECK(expr)                                                                                          \
  do {                                                                                                                 \
    cudaError_t loom_err_ = (expr);                                                                                    \
    if (loom_err_ != cudaSuccess)                                                                                      \
      LOOM_THROW(kCuda,                                                                                                \
                 #expr << " failed: " << cudaGetErrorName(loom_err_) << " (" << cudaGetErrorString(loom_err_) << ")"); \
  } while (0)

// After a kernel launch: catches bad launch configurations at once.
#define LOOM_CUDA_CHECK_LAUNCH(name) LOOM_CUDA_CHECK(cudaGetLastError())
