// Tensor: a non-owning view of contiguous row-major memory (pointer, shape, dtype, device) plus the handle the
// autograd tape uses to find its gradient. Storage always comes from an arena (core/arena.h,
// core/param_arena.h), never from the tensor itself, so copying a Tensor is cheap and never frees anything.
//
// Views (reshape, rows) share storage and gradient: a view of rows [a, b) has its gradient at the same rows of
// the base's gradient (grad_offset), so a model can split a batch into halves and still get correct gradients.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/dtype.h"

namespace loom {

// Up to kMaxDims dimensions, stored inline.
class Shape {
 public:
  static constexpr int kMaxDims = 6;
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);
  template <class It>
  Shape(It begin, It end) {
    for (It it = begin; it != end; ++it) push_back(*it);
  }
  int ndim() const { return ndim_; }
  int64_t operator[](int i) const { return dims_[static_cast<size_t>(normalize(i))]; }
  int64_t& operator[](int i) { return dims_[static_cast<size_t>(normalize(i))]; }
  int64_t numel() const;
  void push_back(int64_t d);
  const int64_t* begin() const { return dims_.data(); }
  const int64_t* end() const { return dims_.data() + ndim_; }
  bool operator==(const Shape& o) const;
  bool operator!=(const Shape& o) const { return !(*this == o); }
  std::string str() const;  // "[4, 128, 256]"

 private:
  int normalize(int i) const;  // negative indices count from the back; throws a shape error out of range
  std::array<int64_t, kMaxDims> dims_{};
  int ndim_ = 0;
};

// Gradient handle: which tape slot (activation) or parameter holds this tensor's gradient.
struct GradRef {
  enum class Kind : uint8_t { kNone, kSlot, kParam };
  Kind kind = Kind::kNone;
  int32_t index = -1;
  int64_t offset = 0;  // element offset of this view's gradient inside the slot / parameter gradient
};

class Tensor {
 public:
  Tensor() = default;
  Tensor(void* data, Shape shape, DType dtype, Device device)
      : data_(data), shape_(shape), dtype_(dtype), device_(device) {}

  void* data() const { return data_; }
  template <class T>
  T* ptr() const {
    return static_cast<T*>(data_);
  }
  const Shape& shape() const { return shape_; }
  int ndim() const { return shape_.ndim(); }
  int64_t size(int dim) const { return shape_[dim]; }
  int64_t numel() const { return shape_.numel(); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  bool defined() const { return data_ != nullptr || numel() == 0; }
  bool is_null() const { return data_ == nullptr && shape_.ndim() == 0; }

  const GradRef& grad_ref() const { return grad_; }
  bool requires_grad() const { return grad_.kind != GradRef::Kind::kNone; }
  Tensor with_grad(GradRef g) const {
    Tensor t = *this;
    t.grad_ = g;
    return t;
  }
  Tensor detach() const { return with_grad(GradRef{}); }

  // Same storage, new shape with the same element count.
  Tensor reshape(Shape shape) const;
  // Rows [begin, end) along dimension 0.
  Tensor rows(int64_t begin, int64_t end) const;
  // Treat as 2-D: [numel / last, last].
  Tensor flatten_2d() const;
  // Elements [begin, end) of the flat view.
  Tensor flat_range(int64_t begin, int64_t end) const;

  std::string describe() const;  // "f32[4, 16] cpu"

 private:
  void* data_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::kF32;
  Device device_ = Device::kCpu;
  GradRef grad_;
};

// Throws a shape error naming the op and argument when t's shape is not `expected`.
void check_shape(const Tensor& t, const Shape& expected, const char* op, const char* arg);
void check_dtype(const Tensor& t, DType expected, const char* op, const char* arg);
void check_same_device(const Tensor& a, const Tensor& b, const char* op);

}  // namespace loom
