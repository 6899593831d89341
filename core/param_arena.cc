#include "core/param_arena.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "core/rng.h"

namespace loom {
namespace {

int64_t round_up(int64_t x, int64_t m) {
  return (x + m - 1) / m * m;
}

// outer = product of dims before the split axis, inner = product after it.
void split_extent(const Shape& g, int axis, int64_t* outer, int64_t* inner) {
  *outer = 1;
  *inner = 1;
  for (int i = 0; i < axis; ++i) *outer *= g[i];
  for (int i = axis + 1; i < g.ndim(); ++i) *inner *= g[i];
}

template <bool kToLocal>
void copy_shard(const float* src, float* dst, const Shape& g, const TpSplit& s) {
  if (s.replicated()) {
    std::memcpy(dst, src, static_cast<size_t>(g.numel()) * sizeof(float));
    return;
  }
  int64_t outer, inner;
  split_extent(g, s.axis, &outer, &inner);
  int64_t gl = g[s.axis], ll = gl / s.size;
  for (int64_t o = 0; o < outer; ++o) {
    const int64_t local_row = o * ll * inner;
    const int64_t global_row = (o * gl + s.rank * ll) * inner;
    const size_t n = static_cast<size_t>(ll * inner) * sizeof(float);
    if (kToLocal) {
      std::memcpy(dst + local_row, src + global_row, n);
    } else {
      std::memcpy(dst + global_row, src + local_row, n);
    }
  }
}

// Initial value of local element i of a parameter: a pure function of (seed, name, global element index).
void init_local(const Parameter& p, uint64_t seed, float* out) {
  const Shape& g = p.global_shape();
  const int64_t n = p.local_shape().numel();
  switch (p.init().kind) {
    case InitSpec::Kind::kZeros: std::fill(out, out + n, 0.0f); return;
    case InitSpec::Kind::kOnes: std::fill(out, out + n, 1.0f); return;
    case InitSpec::Kind::kNormal: break;
  }
  const uint64_t stream = fnv1a64(p.name()) ^ static_cast<uint64_t>(RngStream::kInit);
  const float std = p.init().std;
  const TpSplit& s = p.split();
  int64_t outer = 1, inner = g.numel(), gl = 1, ll = 1, start = 0;
  if (!s.replicated()) {
    split_extent(g, s.axis, &outer, &inner);
    gl = g[s.axis];
    ll = gl / s.size;
    start = s.rank * ll;
  }
  // Every element is a pure function of its global index, so rows and pieces of rows can be drawn in parallel
  // (a 0.95B model takes about a minute on one core) with the same result for any thread count. Rows are cut
  // into pieces so that an unsplit parameter (one row) is spread over the threads too.
  constexpr int64_t kPiece = 1 << 14;
  const int64_t pieces = (inner + kPiece - 1) / kPiece;
#pragma omp parallel for collapse(3) schedule(static)
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t a = 0; a < ll; ++a)
      for (int64_t c = 0; c < pieces; ++c) {
        const int64_t local_row = (o * ll + a) * inner;
        const int64_t global_row = (o * gl + start + a) * inner;
        const int64_t end = std::min(inner, (c + 1) * kPiece);
        for (int64_t i = c * kPiece; i < end; ++i)
          out[local_row + i] = std * random_normal(seed, stream, static_cast<uint64_t>(global_row + i));
      }
}

}  // namespace

void extract_shard(const float* global, const Shape& global_shape, const TpSplit& split, float* local) {
  copy_shard<true>(global, local, global_shape, split);
}
void insert_shard(const float* local, const Shape& global_shape, const TpSplit& split, float* global) {
  copy_shard<false>(local, global, global_shape, split);
}

ParameterArena::ParameterArena(Backend& backend, ParamArenaOptions options) : backend_(backend), options_(options) {
  LOOM_CHECK(options_.dp_size >= 1, kConfig, "data-parallel size must be at least 1");
  LOOM_CHECK(options_.grad_dtype == DType::kF32 || options_.grad_dtype == backend.compute_dtype(), kConfig,
             "gradient dtype must be f32 or the compute dtype");
}

ParameterArena::~ParameterArena() {
  if (base_) backend_.deallocate(base_);
}

void ParameterArena::finalize(Module& root) {
  LOOM_CHECK(!finalized(), kConfig, "ParameterArena::finalize() called twice");
  auto named = root.named_parameters();
  LOOM_CHECK(!named.empty(), kConfig, "the model registers no parameters");

  // Stable order within each of the four groups keeps registration order.
  auto group_of = [](const Parameter& p) { return (p.split().replicated() ? 2 : 0) + (p.weight_decay() ? 0 : 1); };
  std::stable_sort(named.begin(), named.end(),
                   [&](const auto& a, const auto& b) { return group_of(*a.second) < group_of(*b.second); });

  int64_t offset = 0;
  int current_group = -1;
  for (auto& [name, p] : named) {
    int g = group_of(*p);
    if (g != current_group) {
      if (!groups_.empty()) groups_.back().count = offset - groups_.back().offset;
      groups_.push_back(ParamGroup{offset, 0, p->weight_decay(), p->split().replicated()});
      current_group = g;
    }
    p->name_ = name;
    p->index_ = static_cast<int>(params_.size());
    params_.push_back(p);
    int64_t n = p->local_shape().numel();
    layout_.push_back(LayoutEntry{name, p->global_shape(), p->local_shape(), p->split(), offset, n, p->weight_decay()});
    numel_ += n;
    offset = round_up(offset + n, kParamAlign);
  }
  groups_.back().count = offset - groups_.back().offset;
  padded_ = round_up(std::max<int64_t>(offset, 1), 128 * options_.dp_size);

  const DType cdt = backend_.compute_dtype(), gdt = options_.grad_dtype;
  const size_t P = static_cast<size_t>(padded_);
  const size_t bytes[5] = {P * dtype_size(cdt), P * dtype_size(gdt), P * 4, P * 4, P * 4};
  for (size_t b : bytes) total_bytes_ += b;
  base_ = backend_.allocate(total_bytes_);
  char* cursor = static_cast<char*>(base_);
  auto region = [&](size_t b, DType dt) {
    Tensor t(cursor, Shape{padded_}, dt, backend_.device());
    cursor += b;
    return t;
  };
  compute_ = region(bytes[0], cdt);
  grads_ = region(bytes[1], gdt);
  master_ = region(bytes[2], DType::kF32);
  m_ = region(bytes[3], DType::kF32);
  v_ = region(bytes[4], DType::kF32);

  for (Parameter* p : params_) {
    const LayoutEntry& e = layout_[static_cast<size_t>(p->index_)];
    auto view = [&](const Tensor& r) { return r.flat_range(e.offset, e.offset + e.numel).reshape(e.local_shape); };
    p->value_ = view(compute_).with_grad(GradRef{GradRef::Kind::kParam, p->index_, 0});
    p->grad_ = view(grads_);
    p->master_ = view(master_);
  }

  // Initialise master on the host (gaps stay zero), then derive the rest.
  std::vector<float> host(P, 0.0f);
  for (Parameter* p : params_) {
    const LayoutEntry& e = layout_[static_cast<size_t>(p->index_)];
    init_local(*p, options_.seed, host.data() + e.offset);
  }
  backend_.upload(master_, host.data());
  backend_.fill(m_, 0.0f);
  backend_.fill(v_, 0.0f);
  zero_grads();
  sync_compute_from_master();
}

uint64_t ParameterArena::layout_hash() const {
  uint64_t h = fnv1a64("loom-layout-v1");
  auto mix = [&](int64_t x) { h = fnv1a64(std::string_view(reinterpret_cast<const char*>(&x), sizeof x), h); };
  for (const LayoutEntry& e : layout_) {
    h = fnv1a64(e.name, h);
    for (int64_t d : e.global_shape) mix(d);
    mix(e.split.axis);
    mix(e.split.size);
    mix(e.offset);
  }
  mix(padded_);
  mix(static_cast<int64_t>(backend_.compute_dtype()));
  return h;
}

int ParameterArena::find(const std::string& name) const {
  for (size_t i = 0; i < layout_.size(); ++i)
    if (layout_[i].name == name) return static_cast<int>(i);
  return -1;
}

void ParameterArena::zero_grads() {
  backend_.fill(grads_, 0.0f);
}

void ParameterArena::sync_compute_from_master() {
  backend_.copy(compute_, master_);
}

void ParameterArena::load_global(const std::string& name, const float* global_data, int64_t global_numel) {
  int i = find(name);
  LOOM_CHECK(i >= 0, kConfig, "no parameter named '" << name << "' in the model");
  const LayoutEntry& e = layout_[static_cast<size_t>(i)];
  LOOM_CHECK(global_numel == e.global_shape.numel(), kShape,
             "parameter '" << name << "' has global shape " << e.global_shape.str() << " (" << e.global_shape.numel()
                           << " elements), got " << global_numel << " elements");
  std::vector<float> local(static_cast<size_t>(e.numel));
  extract_shard(global_data, e.global_shape, e.split, local.data());
  Parameter& p = param(i);
  backend_.upload(p.master_, local.data());
  backend_.copy(p.value_, p.master_);
}

std::vector<float> ParameterArena::read_master(const std::string& name) const {
  int i = find(name);
  LOOM_CHECK(i >= 0, kConfig, "no parameter named '" << name << "' in the model");
  std::vector<float> out(static_cast<size_t>(layout_[static_cast<size_t>(i)].numel));
  backend_.download(param(i).master_, out.data());
  return out;
}

}  // namespace loom
