// Errors of the framework and the one checking macro per kind of external call.
//
// Every failure a user can cause or meet (bad config, bad shape, missing file, failed MPI/CUDA/NCCL/HDF5/system
// call) is thrown as a loom::Error whose message says what failed, which argument, and what was expected, with
// the file and line of the check. The top level (loom/runtime.h) turns it into one clean message and a non-zero
// exit on every rank.
//
//   LOOM_CHECK(n > 0, kConfig, "train.steps must be positive, got " << n);
//   LOOM_THROW(kData, "token file '" << path << "' is empty");
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace loom {

enum class ErrorKind { kInternal, kConfig, kShape, kData, kComm, kCuda, kIo, kSnapshot, kAborted };

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

// Thrown on ranks that did not fail themselves when a collective check found that another rank failed: the
// failing rank reports, the others exit quietly with a non-zero status.
class ReportedElsewhere : public Error {
 public:
  explicit ReportedElsewhere(int failing_rank)
      : Error(ErrorKind::kAborted, "rank " + std::to_string(failing_rank) + " failed"), failing_rank_(failing_rank) {}
  int failing_rank() const { return failing_rank_; }

 private:
  int failing_rank_;
};

namespace detail {
[[noreturn]] void throw_error(ErrorKind kind, const char* file, int line, const std::string& message);
std::string errno_string();
}  // namespace detail

}  // namespace loom

#define LOOM_THROW(kind, msg)                                                                  \
  do {                                                                                         \
    std::ostringstream loom_msg_;                                                              \
    loom_msg_ << msg;                                                                          \
    ::loom::detail::throw_error(::loom::ErrorKind::kind, __FILE__, __LINE__, loom_msg_.str()); \
  } while (0)

#define LOOM_CHECK(cond, kind, msg)     \
  do {                                  \
    if (!(cond)) LOOM_THROW(kind, msg); \
  } while (0)

// Internal invariants (a failure is a bug in Loom, not in the user's input).
#define LOOM_ASSERT(cond) LOOM_CHECK(cond, kInternal, "assertion failed: " #cond)

// System calls that return -1 and set errno.
#define LOOM_SYSCALL_CHECK(expr)                                                             \
  do {                                                                                       \
    if ((expr) < 0) LOOM_THROW(kIo, #expr << " failed: " << ::loom::detail::errno_string()); \
  } while (0)
