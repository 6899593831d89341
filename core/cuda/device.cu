// Probing for a usable GPU without failing on machines that have the toolkit but no driver or device (the CI
// machine): every failure becomes a reason string.
#include <cuda_runtime.h>

#include <string>

#include "core/cuda/device.h"

namespace loom::cuda {

bool probe_device(std::string* reason) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    if (reason) *reason = std::string("no usable CUDA device: ") + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error state
    return false;
  }
  if (count == 0) {
    if (reason) *reason = "no CUDA device present";
    return false;
  }
  return true;
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

}  // namespace loom::cuda
