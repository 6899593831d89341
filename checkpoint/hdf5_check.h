// Checked HDF5 calls and RAII handles for the HDF5 C API (<hdf5.h>), as NCCL's checks.h does for its own.
//
//   h5::QuietErrors quiet;                                  // the error stack goes into exceptions, not stderr
//   h5::ErrorContext ctx("writing snapshot file '" + tmp + "'");
//   h5::File file(LOOM_H5_CHECK(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get())));
//   LOOM_H5_CHECK(H5Fflush(file.get(), H5F_SCOPE_GLOBAL));
//   file.close();                                           // a failed close is reported, not swallowed
//
// LOOM_H5_CHECK(expr) evaluates an HDF5 call and returns its result; a negative result (every HDF5 call reports
// failure that way: herr_t, hid_t, htri_t, ssize_t) throws loom::Error kIo whose message holds the context of
// this thread (ErrorContext), the call's source text, errno when the call set it (a failed write on a full disk
// says "No space left on device"), and HDF5's own error stack, innermost cause last.
//
// Assumes HDF5 1.10 or newer. Debian's libhdf5 is built thread-safe (one library-wide lock, an error stack per
// thread), so QuietErrors and ErrorContext are per thread.
#pragma once

#include <hdf5.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"

namespace loom::h5 {

namespace detail {

inline thread_local const std::string* g_context = nullptr;

// Collects the records of HDF5's error stack, API call first ("H5F__super_read: truncated file: eof = 1000").
inline herr_t collect_error_record(unsigned, const H5E_error2_t* e, void* out) {
  std::string record = std::string(e->func_name ? e->func_name : "?") + ": " + (e->desc ? e->desc : "");
  std::replace(record.begin(), record.end(), '\n', ' ');  // some descriptions span lines
  static_cast<std::vector<std::string>*>(out)->push_back(std::move(record));
  return 0;
}

// The stack as one line: the API call, then the innermost records, which say why.
inline std::string error_stack_text() {
  constexpr size_t kInnermost = 5;
  std::vector<std::string> records;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, collect_error_record, &records);
  H5Eclear2(H5E_DEFAULT);
  std::string text;
  for (size_t i = 0; i < records.size(); ++i) {
    if (i > 0 && i + kInnermost < records.size()) {
      if (i == 1) text += " <- ...";
      continue;
    }
    text += (i ? " <- " : "") + records[i];
  }
  return text;
}

[[noreturn]] inline void throw_failed_call(const char* call, int saved_errno, const char* file, int line) {
  std::string message;
  if (g_context) message += *g_context + ": ";
  message += call;
  message += " failed";
  if (saved_errno != 0)
    message += std::string(" (errno ") + std::to_string(saved_errno) + ": " + std::strerror(saved_errno) + ")";
  const std::string stack = error_stack_text();
  if (!stack.empty()) message += "; HDF5: " + stack;
  ::loom::detail::throw_error(ErrorKind::kIo, file, line, message);
}

template <class T>
T checked(T result, const char* call, const char* file, int line) {
  if (result < 0) throw_failed_call(call, errno, file, line);  // errno first: the error walk may change it
  return result;
}

}  // namespace detail

// While alive, every failed LOOM_H5_CHECK on this thread starts its message with `what` (say which file and
// what was being done, so the error names the path). Nests: the innermost context wins.
class ErrorContext {
 public:
  explicit ErrorContext(std::string what) : what_(std::move(what)), previous_(detail::g_context) {
    detail::g_context = &what_;
  }
  ~ErrorContext() { detail::g_context = previous_; }
  ErrorContext(const ErrorContext&) = delete;
  ErrorContext& operator=(const ErrorContext&) = delete;

 private:
  std::string what_;
  const std::string* previous_;
};

// While alive, HDF5 does not print its error stack to stderr on this thread: failures reach the user once, as an
// exception carrying the stack. Restores the previous handler on destruction.
class QuietErrors {
 public:
  QuietErrors() {
    H5Eget_auto2(H5E_DEFAULT, &func_, &data_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~QuietErrors() { H5Eset_auto2(H5E_DEFAULT, func_, data_); }
  QuietErrors(const QuietErrors&) = delete;
  QuietErrors& operator=(const QuietErrors&) = delete;

 private:
  H5E_auto2_t func_ = nullptr;
  void* data_ = nullptr;
};

// Owns one hid_t and closes it with Close (named kCloseName in errors). The destructor ignores a failed close (it
// runs during unwinding); call close() where a failure must be reported, as for a file or dataset being written,
// whose close flushes.
template <herr_t (*Close)(hid_t), const char* kCloseName>
class Handle {
 public:
  Handle() = default;
  explicit Handle(hid_t id) : id_(id) {}
  ~Handle() {
    if (id_ >= 0) Close(id_);
  }
  Handle(Handle&& other) noexcept : id_(std::exchange(other.id_, -1)) {}
  Handle& operator=(Handle&& other) noexcept {
    if (this != &other) {
      if (id_ >= 0) Close(id_);
      id_ = std::exchange(other.id_, -1);
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  hid_t get() const { return id_; }
  void close();

 private:
  hid_t id_ = -1;
};

inline constexpr char kFileClose[] = "H5Fclose(file)";
inline constexpr char kGroupClose[] = "H5Gclose(group)";
inline constexpr char kDatasetClose[] = "H5Dclose(dataset)";
inline constexpr char kDataspaceClose[] = "H5Sclose(dataspace)";
inline constexpr char kAttributeClose[] = "H5Aclose(attribute)";
inline constexpr char kPropListClose[] = "H5Pclose(property list)";
inline constexpr char kDatatypeClose[] = "H5Tclose(datatype)";

using File = Handle<H5Fclose, kFileClose>;
using Group = Handle<H5Gclose, kGroupClose>;
using Dataset = Handle<H5Dclose, kDatasetClose>;
using Dataspace = Handle<H5Sclose, kDataspaceClose>;
using Attribute = Handle<H5Aclose, kAttributeClose>;
using PropList = Handle<H5Pclose, kPropListClose>;
using Datatype = Handle<H5Tclose, kDatatypeClose>;

}  // namespace loom::h5

// Evaluates an HDF5 call, throws kIo on a negative result (see the top of this file), returns the result.
// errno is cleared first so that only an errno set by this call is reported.
#define LOOM_H5_CHECK(expr) (errno = 0, ::loom::h5::detail::checked((expr), #expr, __FILE__, __LINE__))

template <herr_t (*Close)(hid_t), const char* kCloseName>
void loom::h5::Handle<Close, kCloseName>::close() {
  const hid_t id = std::exchange(id_, -1);
  if (id < 0) return;
  errno = 0;
  detail::checked(Close(id), kCloseName, __FILE__, __LINE__);
}
