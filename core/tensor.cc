#include "core/tensor.h"

#include <sstream>

#include "core/error.h"

namespace loom {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32: return "f32";
    case DType::kBF16: return "bf16";
    case DType::kI32: return "i32";
    case DType::kU16: return "u16";
  }
  return "?";
}

const char* device_name(Device d) {
  return d == Device::kCpu ? "cpu" : "cuda";
}

Shape::Shape(std::initializer_list<int64_t> dims) {
  for (int64_t d : dims) push_back(d);
}

int Shape::normalize(int i) const {
  int j = i < 0 ? i + ndim_ : i;
  LOOM_CHECK(j >= 0 && j < ndim_, kShape, "dimension " << i << " out of range for shape " << str());
  return j;
}

int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim_; ++i) n *= dims_[static_cast<size_t>(i)];
  return n;
}

void Shape::push_back(int64_t d) {
  LOOM_CHECK(ndim_ < kMaxDims, kShape, "shape has more than " << kMaxDims << " dimensions");
  LOOM_CHECK(d >= 0, kShape, "negative dimension " << d);
  dims_[static_cast<size_t>(ndim_++)] = d;
}

bool Shape::operator==(const Shape& o) const {
  if (ndim_ != o.ndim_) return false;
  for (int i = 0; i < ndim_; ++i)
    if (dims_[static_cast<size_t>(i)] != o.dims_[static_cast<size_t>(i)]) return false;
  return true;
}

std::string Shape::str() const {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < ndim_; ++i) os << (i ? ", " : "") << dims_[static_cast<size_t>(i)];
  os << "]";
  return os.str();
}

Tensor Tensor::reshape(Shape shape) const {
  LOOM_CHECK(shape.numel() == numel(), kShape,
             "cannot reshape " << shape_.str() << " (" << numel() << " elements) to " << shape.str());
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  LOOM_CHECK(ndim() >= 1 && 0 <= begin && begin <= end && end <= shape_[0], kShape,
             "rows [" << begin << ", " << end << ") out of range for shape " << shape_.str());
  int64_t row = shape_[0] == 0 ? 0 : numel() / shape_[0];
  Tensor t = *this;
  t.data_ = static_cast<char*>(data_) + static_cast<size_t>(begin * row) * dtype_size(dtype_);
  t.shape_[0] = end - begin;
  t.grad_.offset += begin * row;
  return t;
}

Tensor Tensor::flatten_2d() const {
  LOOM_CHECK(ndim() >= 1, kShape, "cannot flatten a 0-d tensor to 2-D");
  int64_t last = shape_[-1];
  return reshape(Shape{last == 0 ? 0 : numel() / last, last});
}

Tensor Tensor::flat_range(int64_t begin, int64_t end) const {
  LOOM_CHECK(0 <= begin && begin <= end && end <= numel(), kShape,
             "range [" << begin << ", " << end << ") out of range for " << numel() << " elements");
  Tensor t = *this;
  t.data_ = static_cast<char*>(data_) + static_cast<size_t>(begin) * dtype_size(dtype_);
  t.shape_ = Shape{end - begin};
  t.grad_.offset += begin;
  return t;
}

std::string Tensor::describe() const {
  return std::string(dtype_name(dtype_)) + shape_.str() + " " + device_name(device_);
}

void check_shape(const Tensor& t, const Shape& expected, const char* op, const char* arg) {
  LOOM_CHECK(t.shape() == expected, kShape,
             op << ": argument '" << arg << "' has shape " << t.shape().str() << ", expected " << expected.str());
}

void check_dtype(const Tensor& t, DType expected, const char* op, const char* arg) {
  LOOM_CHECK(
      t.dtype() == expected, kShape,
      op << ": argument '" << arg << "' has dtype " << dtype_name(t.dtype()) << ", expected " << dtype_name(expected));
}

void check_same_device(const Tensor& a, const Tensor& b, const char* op) {
  LOOM_CHECK(
      a.device() == b.device(), kShape,
      op << ": tensors on different devices (" << device_name(a.device()) << " and " << device_name(b.device()) << ")");
}

}  // namespace loom
