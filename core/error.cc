#include "core/error.h"

#include <cerrno>
#include <cstring>

namespace loom {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInternal: return "internal error";
    case ErrorKind::kConfig: return "config error";
    case ErrorKind::kShape: return "shape error";
    case ErrorKind::kData: return "data error";
    case ErrorKind::kComm: return "communication error";
    case ErrorKind::kCuda: return "CUDA error";
    case ErrorKind::kIo: return "I/O error";
    case ErrorKind::kSnapshot: return "snapshot error";
    case ErrorKind::kAborted: return "aborted";
  }
  return "error";
}

namespace detail {

// "core/tensor.cc" out of "/abs/path/core/tensor.cc": the folder and file name are enough to find a check.
static const char* short_file(const char* path) {
  const char* last = nullptr;
  const char* before_last = nullptr;
  for (const char* p = path; *p; ++p) {
    if (*p == '/') {
      before_last = last;
      last = p;
    }
  }
  return before_last ? before_last + 1 : path;
}

void throw_error(ErrorKind kind, const char* file, int line, const std::string& message) {
  throw Error(kind, std::string(error_kind_name(kind)) + ": " + message + " [" + short_file(file) + ":" +
                        std::to_string(line) + "]");
}

std::string errno_string() {
  return std::strerror(errno);
}

}  // namespace detail
}  // namespace loom
