#include "core/arena.h"

#include <algorithm>

#include "core/error.h"

namespace loom {

ActivationArena::ActivationArena(Backend& backend, size_t min_block_bytes)
    : backend_(backend), min_block_bytes_(min_block_bytes) {}

ActivationArena::~ActivationArena() {
  for (auto& b : blocks_) backend_.deallocate(b.base);
}

size_t ActivationArena::reserved_bytes() const {
  size_t total = 0;
  for (auto& b : blocks_) total += b.size;
  return total;
}

Tensor ActivationArena::allocate(const Shape& shape, DType dtype) {
  size_t bytes = static_cast<size_t>(shape.numel()) * dtype_size(dtype);
  size_t padded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  if (padded == 0) padded = kAlignment;
  while (current_ < blocks_.size() && blocks_[current_].used + padded > blocks_[current_].size) ++current_;
  if (current_ == blocks_.size()) {
    size_t size = std::max(min_block_bytes_, padded);
    char* base = static_cast<char*>(backend_.allocate(size));
    blocks_.push_back(Block{base, size, 0});
  }
  Block& b = blocks_[current_];
  char* p = b.base + b.used;
  b.used += padded;
  used_ += padded;
  peak_ = std::max(peak_, used_);
  return Tensor(p, shape, dtype, backend_.device());
}

void ActivationArena::reset() {
  if (blocks_.size() > 1) {
    // Consolidate: one block large enough for the whole step next time.
    backend_.synchronize();
    for (auto& b : blocks_) backend_.deallocate(b.base);
    blocks_.clear();
    size_t size = std::max(min_block_bytes_, peak_);
    blocks_.push_back(Block{static_cast<char*>(backend_.allocate(size)), size, 0});
  }
  for (auto& b : blocks_) b.used = 0;
  current_ = 0;
  used_ = 0;
}

}  // namespace loom
