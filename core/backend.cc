#include "core/backend.h"

#include "core/error.h"

namespace loom {

void Backend::download(const Tensor& src, void* host) {
  Tensor h(host, src.shape(), src.dtype(), Device::kCpu);
  copy(h, src);
  synchronize();
}

void Backend::upload(const Tensor& dst, const void* host) {
  Tensor h(const_cast<void*>(host), dst.shape(), dst.dtype(), Device::kCpu);
  copy(dst, h);
  synchronize();
}

float Backend::read_scalar(const Tensor& t) {
  LOOM_CHECK(t.numel() == 1 && t.dtype() == DType::kF32, kInternal,
             "read_scalar needs a one-element f32 tensor, got " << t.describe());
  float v = 0;
  download(t, &v);
  return v;
}

}  // namespace loom
