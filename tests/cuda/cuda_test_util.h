// What the CUDA tests share: whether they can run here, and the backend they run on. Every CUDA test calls
// skip_reason() in its SetUp and skips with that reason when it is not empty, so a machine without a GPU (or a
// build without CUDA, where make_cuda_backend() is not even declared) reports each test as skipped and why.
// The test binary is listed by gtest_discover_tests at build time, which runs it without a GPU: nothing here
// touches CUDA before a test starts.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "core/backend.h"
#ifdef LOOM_HAVE_CUDA
#include "core/cuda/cuda_backend.h"
#endif

namespace loom::test {

// Empty when the CUDA tests can run; otherwise why not.
inline std::string cuda_skip_reason() {
#ifndef LOOM_HAVE_CUDA
  return "this build has no CUDA (LOOM_HAVE_CUDA is not defined: nvcc was not found or LOOM_CUDA=OFF)";
#else
  std::string reason;
  if (!cuda_available(&reason)) return reason.empty() ? std::string("no usable GPU") : reason;
  return {};
#endif
}

// The CUDA backend on GPU 0; only called after cuda_skip_reason() came back empty.
inline std::unique_ptr<Backend> make_test_cuda_backend() {
#ifdef LOOM_HAVE_CUDA
  return make_cuda_backend(0);
#else
  return nullptr;
#endif
}

// A fixture with the CUDA backend on GPU 0 in gpu_, skipping with the reason where there is none.
class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string reason = cuda_skip_reason();
    if (!reason.empty()) GTEST_SKIP() << reason;
    gpu_ = make_test_cuda_backend();
    ASSERT_NE(gpu_, nullptr);
  }
  std::unique_ptr<Backend> gpu_;
};

}  // namespace loom::test
