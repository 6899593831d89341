// ActivationArena: the per-step bump allocator for activations, their gradients and kernel scratch.
// Everything allocated during one micro-batch (forward + backward) is released at once by reset(). Sizes are
// the same every step, so after the first step the arena holds one block of the peak size and the step does
// no device allocation at all (which also makes the step capturable as a CUDA graph).
#pragma once

#include <cstddef>
#include <vector>

#include "core/backend.h"
#include "core/tensor.h"

namespace loom {

class ActivationArena {
 public:
  static constexpr size_t kAlignment = 256;
  explicit ActivationArena(Backend& backend, size_t min_block_bytes = size_t{64} << 20);
  ~ActivationArena();
  ActivationArena(const ActivationArena&) = delete;
  ActivationArena& operator=(const ActivationArena&) = delete;

  Tensor allocate(const Shape& shape, DType dtype);
  // Releases everything allocated since the last reset. When the last step needed more than one block, the
  // blocks are replaced by a single block of the peak size.
  void reset();

  size_t used_bytes() const { return used_; }
  size_t peak_bytes() const { return peak_; }
  size_t reserved_bytes() const;
  Backend& backend() const { return backend_; }

 private:
  struct Block {
    char* base;
    size_t size;
    size_t used;
  };
  Backend& backend_;
  size_t min_block_bytes_;
  std::vector<Block> blocks_;
  size_t current_ = 0;  // index of the block being filled
  size_t used_ = 0;     // bytes handed out since reset (including alignment padding)
  size_t peak_ = 0;
};

}  // namespace loom
