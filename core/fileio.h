// Small RAII helpers for POSIX file work shared by the token files (core/data.cc) and the HDF5 snapshots
// (checkpoint/hdf5_format.cc): an owned file descriptor, and a temp file that is unlinked unless its write
// reached the rename.
#pragma once

#include <unistd.h>

#include <string>
#include <utility>

namespace loom {

class UniqueFd {
 public:
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  int get() const { return fd_; }
  // Closes now and returns close()'s result: for a written file, close can report a deferred write error.
  int close() { return ::close(std::exchange(fd_, -1)); }

 private:
  int fd_;
};

// Unlinks a temp file when the write that owns it fails before the rename.
class TempFileGuard {
 public:
  explicit TempFileGuard(std::string path) : path_(std::move(path)) {}
  ~TempFileGuard() {
    if (armed_) ::unlink(path_.c_str());
  }
  TempFileGuard(const TempFileGuard&) = delete;
  TempFileGuard& operator=(const TempFileGuard&) = delete;
  void release() { armed_ = false; }

 private:
  std::string path_;
  bool armed_ = true;
};

}  // namespace loom
