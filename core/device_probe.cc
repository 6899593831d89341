// cuda_available(): answers without touching CUDA when the build has none.
#include <string>

#include "core/backend.h"
#ifdef LOOM_HAVE_CUDA
#include "core/cuda/device.h"
#endif

namespace loom {

bool cuda_available(std::string* reason) {
#ifdef LOOM_HAVE_CUDA
  return cuda::probe_device(reason);
#else
  if (reason) *reason = "this build of Loom has no CUDA backend (nvcc was not found when it was configured)";
  return false;
#endif
}

}  // namespace loom
