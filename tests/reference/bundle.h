// Tensor bundle: the file format through which the PyTorch reference (tests/reference/torch_gpt_reference.py,
// loom_bundle.py) hands weights, batches, logits, losses and gradients to Loom's C++ tests, and back.
//
// Layout, little-endian (the reader assumes a little-endian host, as every machine Loom targets is):
//   "LOOMBNDL"              8 bytes magic
//   uint32 version          = 1
//   uint32 count            number of tensors
//   count times:
//     uint32 name_len, name bytes (utf-8, not NUL-terminated)
//     uint32 dtype          0 = f32, 1 = i32, 2 = f64
//     uint32 ndim, int64 dims[ndim]
//     data                  prod(dims) elements, C order
// Names are unique inside a bundle; tensors keep the order in which they were added or read.
//
//   Bundle b = Bundle::read(path);
//   const BundleTensor& w = b.get("blocks.0.attn.wq.weight", BundleDType::kF32);  // w.shape, w.f32
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace loom::test {

enum class BundleDType : uint32_t { kF32 = 0, kI32 = 1, kF64 = 2 };

const char* bundle_dtype_name(BundleDType dtype);

// One tensor; exactly the vector that matches dtype holds the numel() elements, the other two are empty.
struct BundleTensor {
  std::string name;
  std::vector<int64_t> shape;
  BundleDType dtype = BundleDType::kF32;
  std::vector<float> f32;
  std::vector<int32_t> i32;
  std::vector<double> f64;

  int64_t numel() const;
  std::string shape_str() const;  // "[3, 16]"
};

class Bundle {
 public:
  // Throws loom::Error kIo when the file cannot be opened, kData (naming the path) when it is truncated,
  // has a wrong magic/version/dtype, a negative dimension or a duplicate name.
  static Bundle read(const std::string& path);
  // Throws kIo when the file cannot be written.
  void write(const std::string& path) const;

  // Throws kData naming the missing tensor and listing a few present ones.
  const BundleTensor& get(const std::string& name) const;
  // As get(), and also throws kData when the tensor's dtype is not `dtype`.
  const BundleTensor& get(const std::string& name, BundleDType dtype) const;
  bool has(const std::string& name) const;

  // Throw kShape when data.size() differs from the product of shape, kData on a duplicate name.
  void add_f32(const std::string& name, const std::vector<int64_t>& shape, std::vector<float> data);
  void add_i32(const std::string& name, const std::vector<int64_t>& shape, std::vector<int32_t> data);
  void add_f64(const std::string& name, const std::vector<int64_t>& shape, std::vector<double> data);

  std::vector<std::string> names() const;  // in order
  size_t size() const { return tensors_.size(); }

 private:
  void add(BundleTensor t);

  std::vector<BundleTensor> tensors_;
  std::map<std::string, size_t> index_;
};

// The hyperparameters of a torch_gpt_reference.py bundle, decoded from its "config" tensor (f64, in the order
// of the fields below, which is CONFIG_KEYS in torch_gpt_reference.py). The LR schedule's total step count is
// `steps`.
struct GptReferenceConfig {
  int64_t vocab = 0, dim = 0, layers = 0, heads = 0, ffn = 0, seq = 0, batch = 0, steps = 0, seed = 0;
  double lr = 0, lr_min = 0;
  int64_t warmup = 0;
  double weight_decay = 0, beta1 = 0, beta2 = 0, adam_eps = 0, clip = 0, norm_eps = 0, rope_base = 0;

  static constexpr int64_t kCount = 19;
  // Throws kData when "config" is missing, has the wrong length, or an integer field is not integral.
  static GptReferenceConfig from_bundle(const Bundle& bundle);
};

}  // namespace loom::test
