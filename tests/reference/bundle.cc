// Tensor bundle reader and writer (format in bundle.h). The whole file is read into memory first and parsed with
// a cursor that checks every length against what is left, so a truncated or corrupt file is a data error that
// names the path and the offset, never an out-of-bounds read.
#include "tests/reference/bundle.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>

#include "core/error.h"

namespace loom::test {

namespace {

constexpr char kMagic[8] = {'L', 'O', 'O', 'M', 'B', 'N', 'D', 'L'};
constexpr uint32_t kVersion = 1;
constexpr uint32_t kMaxDims = 16;          // far above any real tensor; guards against garbage ndim
constexpr uint32_t kMaxNameLen = 1 << 16;  // likewise for names
constexpr size_t kListedNames = 8;         // how many present names a "missing tensor" error lists

size_t dtype_bytes(BundleDType dtype) {
  return dtype == BundleDType::kF64 ? 8 : 4;
}

// Bounds-checked reads from the file's bytes.
class Cursor {
 public:
  Cursor(const std::string& path, const std::vector<char>& bytes) : path_(path), bytes_(bytes) {}

  void read(void* out, size_t n, const char* what) {
    LOOM_CHECK(n <= remaining(), kData,
               "tensor bundle '" << path_ << "' is truncated: reading " << what << " needs " << n << " bytes at offset "
                                 << pos_ << ", only " << remaining() << " left");
    std::memcpy(out, bytes_.data() + pos_, n);
    pos_ += n;
  }
  template <class T>
  T read_scalar(const char* what) {
    T v;
    read(&v, sizeof(T), what);
    return v;
  }
  size_t remaining() const { return bytes_.size() - pos_; }
  size_t pos() const { return pos_; }

 private:
  const std::string& path_;
  const std::vector<char>& bytes_;
  size_t pos_ = 0;
};

template <class T>
void write_bytes(std::ofstream& out, const T* data, size_t count) {
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(count * sizeof(T)));
}

int64_t checked_numel(const std::string& name, const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    LOOM_CHECK(d >= 0, kShape, "tensor bundle: '" << name << "' has a negative dimension " << d);
    n *= d;
  }
  return n;
}

}  // namespace

const char* bundle_dtype_name(BundleDType dtype) {
  switch (dtype) {
    case BundleDType::kF32: return "f32";
    case BundleDType::kI32: return "i32";
    case BundleDType::kF64: return "f64";
  }
  return "?";
}

int64_t BundleTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string BundleTensor::shape_str() const {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

Bundle Bundle::read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  LOOM_CHECK(in, kIo, "cannot open tensor bundle '" << path << "' for reading");
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  LOOM_CHECK(!in.bad(), kIo, "error while reading tensor bundle '" << path << "'");

  Cursor cur(path, bytes);
  char magic[8];
  cur.read(magic, sizeof(magic), "the magic");
  LOOM_CHECK(std::memcmp(magic, kMagic, sizeof(magic)) == 0, kData,
             "'" << path << "' is not a tensor bundle (magic is not \"LOOMBNDL\")");
  uint32_t version = cur.read_scalar<uint32_t>("the version");
  LOOM_CHECK(version == kVersion, kData,
             "tensor bundle '" << path << "' has version " << version << ", expected " << kVersion);
  uint32_t count = cur.read_scalar<uint32_t>("the tensor count");

  Bundle bundle;
  for (uint32_t i = 0; i < count; ++i) {
    BundleTensor t;
    uint32_t name_len = cur.read_scalar<uint32_t>("a name length");
    LOOM_CHECK(name_len <= kMaxNameLen, kData,
               "tensor bundle '" << path << "': tensor " << i << " has a name length of " << name_len
                                 << " bytes at offset " << cur.pos() - 4 << ", expected at most " << kMaxNameLen);
    t.name.resize(name_len);
    cur.read(t.name.data(), name_len, "a tensor name");
    uint32_t dtype = cur.read_scalar<uint32_t>("a dtype");
    LOOM_CHECK(dtype <= 2, kData,
               "tensor bundle '" << path << "': tensor '" << t.name << "' has dtype code " << dtype
                                 << ", expected 0 (f32), 1 (i32) or 2 (f64)");
    t.dtype = static_cast<BundleDType>(dtype);
    uint32_t ndim = cur.read_scalar<uint32_t>("a rank");
    LOOM_CHECK(ndim <= kMaxDims, kData,
               "tensor bundle '" << path << "': tensor '" << t.name << "' has " << ndim
                                 << " dimensions, expected at most " << kMaxDims);
    t.shape.resize(ndim);
    cur.read(t.shape.data(), ndim * sizeof(int64_t), "the dimensions");
    // Check each factor against what is left so the product can neither overflow nor promise absent bytes.
    const size_t elem = dtype_bytes(t.dtype);
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      LOOM_CHECK(d >= 0, kData,
                 "tensor bundle '" << path << "': tensor '" << t.name << "' has a negative dimension " << d);
      if (d == 0) {
        numel = 0;
        break;
      }
      LOOM_CHECK(numel <= cur.remaining() / elem / static_cast<uint64_t>(d), kData,
                 "tensor bundle '" << path << "' is truncated: tensor '" << t.name << "' of shape " << t.shape_str()
                                   << " needs more than the " << cur.remaining() << " bytes left");
      numel *= static_cast<uint64_t>(d);
    }
    switch (t.dtype) {
      case BundleDType::kF32:
        t.f32.resize(numel);
        cur.read(t.f32.data(), numel * elem, "tensor data");
        break;
      case BundleDType::kI32:
        t.i32.resize(numel);
        cur.read(t.i32.data(), numel * elem, "tensor data");
        break;
      case BundleDType::kF64:
        t.f64.resize(numel);
        cur.read(t.f64.data(), numel * elem, "tensor data");
        break;
    }
    LOOM_CHECK(!bundle.has(t.name), kData, "tensor bundle '" << path << "' holds '" << t.name << "' twice");
    bundle.add(std::move(t));
  }
  LOOM_CHECK(cur.remaining() == 0, kData,
             "tensor bundle '" << path << "' has " << cur.remaining() << " unexpected bytes after its " << count
                               << " tensors");
  return bundle;
}

void Bundle::write(const std::string& path) const {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  LOOM_CHECK(out, kIo, "cannot open tensor bundle '" << path << "' for writing");
  out.write(kMagic, sizeof(kMagic));
  const uint32_t header[2] = {kVersion, static_cast<uint32_t>(tensors_.size())};
  write_bytes(out, header, 2);
  for (const BundleTensor& t : tensors_) {
    const uint32_t name_len = static_cast<uint32_t>(t.name.size());
    write_bytes(out, &name_len, 1);
    out.write(t.name.data(), static_cast<std::streamsize>(t.name.size()));
    const uint32_t dtype_ndim[2] = {static_cast<uint32_t>(t.dtype), static_cast<uint32_t>(t.shape.size())};
    write_bytes(out, dtype_ndim, 2);
    write_bytes(out, t.shape.data(), t.shape.size());
    switch (t.dtype) {
      case BundleDType::kF32: write_bytes(out, t.f32.data(), t.f32.size()); break;
      case BundleDType::kI32: write_bytes(out, t.i32.data(), t.i32.size()); break;
      case BundleDType::kF64: write_bytes(out, t.f64.data(), t.f64.size()); break;
    }
  }
  out.close();
  LOOM_CHECK(out, kIo, "error while writing tensor bundle '" << path << "'");
}

const BundleTensor& Bundle::get(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    std::ostringstream present;
    for (size_t i = 0; i < tensors_.size() && i < kListedNames; ++i) present << (i ? ", " : "") << tensors_[i].name;
    if (tensors_.size() > kListedNames) present << ", ... (" << tensors_.size() << " in all)";
    LOOM_THROW(kData, "tensor bundle has no tensor '"
                          << name << "'; it holds: " << (tensors_.empty() ? "nothing" : present.str()));
  }
  return tensors_[it->second];
}

const BundleTensor& Bundle::get(const std::string& name, BundleDType dtype) const {
  const BundleTensor& t = get(name);
  LOOM_CHECK(
      t.dtype == dtype, kData,
      "tensor bundle: '" << name << "' is " << bundle_dtype_name(t.dtype) << ", expected " << bundle_dtype_name(dtype));
  return t;
}

bool Bundle::has(const std::string& name) const {
  return index_.count(name) != 0;
}

void Bundle::add(BundleTensor t) {
  LOOM_CHECK(!has(t.name), kData, "tensor bundle: '" << t.name << "' added twice");
  index_.emplace(t.name, tensors_.size());
  tensors_.push_back(std::move(t));
}

void Bundle::add_f32(const std::string& name, const std::vector<int64_t>& shape, std::vector<float> data) {
  const int64_t n = checked_numel(name, shape);
  LOOM_CHECK(static_cast<int64_t>(data.size()) == n, kShape,
             "tensor bundle: '" << name << "' has " << data.size() << " values, its shape needs " << n);
  add(BundleTensor{name, shape, BundleDType::kF32, std::move(data), {}, {}});
}

void Bundle::add_i32(const std::string& name, const std::vector<int64_t>& shape, std::vector<int32_t> data) {
  const int64_t n = checked_numel(name, shape);
  LOOM_CHECK(static_cast<int64_t>(data.size()) == n, kShape,
             "tensor bundle: '" << name << "' has " << data.size() << " values, its shape needs " << n);
  add(BundleTensor{name, shape, BundleDType::kI32, {}, std::move(data), {}});
}

void Bundle::add_f64(const std::string& name, const std::vector<int64_t>& shape, std::vector<double> data) {
  const int64_t n = checked_numel(name, shape);
  LOOM_CHECK(static_cast<int64_t>(data.size()) == n, kShape,
             "tensor bundle: '" << name << "' has " << data.size() << " values, its shape needs " << n);
  add(BundleTensor{name, shape, BundleDType::kF64, {}, {}, std::move(data)});
}

std::vector<std::string> Bundle::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const BundleTensor& t : tensors_) out.push_back(t.name);
  return out;
}

GptReferenceConfig GptReferenceConfig::from_bundle(const Bundle& bundle) {
  const BundleTensor& t = bundle.get("config", BundleDType::kF64);
  LOOM_CHECK(t.numel() == kCount, kData,
             "tensor bundle: 'config' has " << t.numel() << " values, expected " << kCount
                                            << " (see CONFIG_KEYS in torch_gpt_reference.py)");
  size_t i = 0;
  auto real = [&]() { return t.f64[i++]; };
  auto integer = [&](const char* key) {
    const double v = t.f64[i++];
    LOOM_CHECK(v == std::floor(v), kData,
               "tensor bundle: config value '" << key << "' = " << v << " should be an integer");
    return static_cast<int64_t>(v);
  };
  GptReferenceConfig c;
  c.vocab = integer("vocab");
  c.dim = integer("dim");
  c.layers = integer("layers");
  c.heads = integer("heads");
  c.ffn = integer("ffn");
  c.seq = integer("seq");
  c.batch = integer("batch");
  c.steps = integer("steps");
  c.seed = integer("seed");
  c.lr = real();
  c.lr_min = real();
  c.warmup = integer("warmup");
  c.weight_decay = real();
  c.beta1 = real();
  c.beta2 = real();
  c.adam_eps = real();
  c.clip = real();
  c.norm_eps = real();
  c.rope_base = real();
  return c;
}

}  // namespace loom::test
