// GPU discovery; safe to call where there is no driver (returns false / 0 with a reason).
#pragma once

#include <string>

namespace loom::cuda {
bool probe_device(std::string* reason);
int device_count();
}  // namespace loom::cuda
