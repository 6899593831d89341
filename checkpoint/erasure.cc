#include "checkpoint/erasure.h"

#include <isa-l/erasure_code.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <sstream>

#include "core/error.h"

namespace loom::ec {
namespace {

// ec_encode_data takes an int length: longer fragments go through in pieces (a multiple of 64, so every piece
// but the last runs at full SIMD width).
constexpr size_t kMaxPiece = size_t{1} << 30;
// Decode patterns are few in practice (one per set of lost nodes and stripe shape); the bound only keeps a
// pathological caller from growing the cache forever.
constexpr size_t kMaxCachedPatterns = 1024;

// out[r] = sum_c M[r][c] * in[c] over len bytes, with M given as ISA-L tables of nin x nout coefficients.
void apply_tables(size_t len, int nin, int nout, const uint8_t* tables, const uint8_t* const* in, uint8_t* const* out) {
  if (len == 0 || nout == 0) return;
  std::vector<uint8_t*> src(nin), dst(nout);
  for (size_t off = 0; off < len; off += kMaxPiece) {
    int n = static_cast<int>(std::min(kMaxPiece, len - off));
    // ISA-L's signature is not const-correct; it only reads the sources and the tables.
    for (int i = 0; i < nin; ++i) src[i] = const_cast<uint8_t*>(in[i]) + off;
    for (int i = 0; i < nout; ++i) dst[i] = out[i] + off;
    ec_encode_data(n, nin, nout, const_cast<uint8_t*>(tables), src.data(), dst.data());
  }
}

void check_code_shape(int k, int p) {
  LOOM_CHECK(
      k >= 1 && p >= 0 && k + p <= kMaxFragments, kConfig,
      "Reed-Solomon code needs k >= 1, p >= 0 and k + p <= " << kMaxFragments << ", got k = " << k << ", p = " << p);
}

// Validates reconstruct's indices against a (k + p, k) code and returns the k survivors it will use.
std::vector<int> check_erasures(int k, int p, const std::vector<int>& present_idx,
                                const std::vector<int>& missing_idx) {
  const int n = k + p;
  std::vector<char> seen(n, 0);  // 1: present, 2: missing
  for (int f : present_idx) {
    LOOM_CHECK(f >= 0 && f < n, kSnapshot,
               "reconstruct: present fragment index " << f << " is outside [0, " << n << ") (k = " << k << ", p = " << p
                                                      << ")");
    LOOM_CHECK(!seen[f], kSnapshot, "reconstruct: present fragment index " << f << " is given twice");
    seen[f] = 1;
  }
  for (int f : missing_idx) {
    LOOM_CHECK(f >= 0 && f < n, kSnapshot,
               "reconstruct: missing fragment index " << f << " is outside [0, " << n << ") (k = " << k << ", p = " << p
                                                      << ")");
    LOOM_CHECK(seen[f] != 1, kSnapshot, "reconstruct: fragment " << f << " is both present and missing");
    LOOM_CHECK(seen[f] != 2, kSnapshot, "reconstruct: missing fragment index " << f << " is given twice");
    seen[f] = 2;
  }
  LOOM_CHECK(
      static_cast<int>(present_idx.size()) >= k, kSnapshot,
      "reconstruct: " << present_idx.size() << " fragments survive, k = " << k << " are needed (p = " << p << ")");
  return std::vector<int>(present_idx.begin(), present_idx.begin() + k);
}

// Rows (missing.size() x k) that map the k survivors to the missing fragments. With B the survivors' rows of
// the generator G, the data is B^-1 * survivors, so fragment f is G[f] * B^-1 * survivors. `invert(b, inv)`
// inverts a k x k matrix (false when singular), `mul` multiplies in GF(2^8); ISA-L and the plain code each
// bring their own.
template <class Invert, class Mul>
std::vector<uint8_t> decode_rows(const std::vector<uint8_t>& generator, int k, const std::vector<int>& survivors,
                                 const std::vector<int>& missing, Invert invert, Mul mul) {
  std::vector<uint8_t> b(static_cast<size_t>(k) * k), inv(static_cast<size_t>(k) * k);
  for (int r = 0; r < k; ++r) std::memcpy(&b[r * k], &generator[survivors[r] * k], k);
  LOOM_CHECK(invert(b, inv), kInternal, "Reed-Solomon decode matrix is singular (k = " << k << ")");
  std::vector<uint8_t> rows(missing.size() * k, 0);
  for (size_t m = 0; m < missing.size(); ++m) {
    const uint8_t* g = &generator[missing[m] * k];
    for (int c = 0; c < k; ++c) {
      uint8_t acc = 0;
      for (int t = 0; t < k; ++t) acc ^= mul(g[t], inv[t * k + c]);
      rows[m * k + c] = acc;
    }
  }
  return rows;
}

}  // namespace

// ---- ReedSolomon (ISA-L) ---------------------------------------------------------------------------------------

ReedSolomon::ReedSolomon(int k, int p) : k_(k), p_(p) {
  check_code_shape(k, p);
  generator_.resize(static_cast<size_t>(k + p) * k);
  gf_gen_cauchy1_matrix(generator_.data(), k + p, k);
  encode_tables_.resize(static_cast<size_t>(32) * k * p);
  if (p > 0) ec_init_tables(k, p, &generator_[static_cast<size_t>(k) * k], encode_tables_.data());
}

void ReedSolomon::encode(size_t len, const uint8_t* const* data, uint8_t* const* parity) const {
  apply_tables(len, k_, p_, encode_tables_.data(), data, parity);
}

std::shared_ptr<const std::vector<uint8_t>> ReedSolomon::decode_tables(const std::vector<int>& survivors,
                                                                       const std::vector<int>& missing_idx) const {
  std::vector<int> key = survivors;
  key.push_back(-1);
  key.insert(key.end(), missing_idx.begin(), missing_idx.end());
  std::lock_guard<std::mutex> lock(cache_mutex_);
  if (auto it = decode_cache_.find(key); it != decode_cache_.end()) return it->second;
  auto invert = [this](std::vector<uint8_t>& b, std::vector<uint8_t>& inv) {
    return gf_invert_matrix(b.data(), inv.data(), k_) == 0;
  };
  auto mul = [](uint8_t a, uint8_t b) { return gf_mul(a, b); };
  std::vector<uint8_t> rows = decode_rows(generator_, k_, survivors, missing_idx, invert, mul);
  auto tables = std::make_shared<std::vector<uint8_t>>(32 * rows.size());
  ec_init_tables(k_, static_cast<int>(missing_idx.size()), rows.data(), tables->data());
  if (decode_cache_.size() >= kMaxCachedPatterns) decode_cache_.clear();
  decode_cache_.emplace(std::move(key), tables);
  return tables;
}

void ReedSolomon::reconstruct(size_t len, const std::vector<int>& present_idx, const uint8_t* const* present,
                              const std::vector<int>& missing_idx, uint8_t* const* out) const {
  std::vector<int> survivors = check_erasures(k_, p_, present_idx, missing_idx);
  if (missing_idx.empty()) return;
  auto tables = decode_tables(survivors, missing_idx);
  apply_tables(len, k_, static_cast<int>(missing_idx.size()), tables->data(), present, out);
}

// ---- GroupLayout -----------------------------------------------------------------------------------------------

GroupLayout::GroupLayout(int group_size, int parity) : g_(group_size), p_(parity) {
  LOOM_CHECK(group_size >= 1 && group_size <= kMaxFragments, kConfig,
             "EC group size must be in [1, " << kMaxFragments << "], got " << group_size);
  LOOM_CHECK(parity >= 0, kConfig,
             "EC parity count must be >= 0, got " << parity << " (group size " << group_size << ")");
  mirroring_ = parity >= 1 && group_size <= parity;
  k_ = mirroring_ ? 1 : g_ - p_;
  slots_ = mirroring_ ? std::min(p_, g_ - 1) : p_;

  stripe_data_.resize(g_);
  stripe_parity_.resize(g_);
  held_.resize(g_);
  parity_position_.resize(g_);
  std::vector<int> next_chunk(g_, 0);
  for (int j = 0; j < g_; ++j) {
    // Mirroring: node j's blob, copied to the nodes after it. Parity: holders j .. j+p-1, data from the rest.
    const int first_holder = mirroring_ ? j + 1 : j;
    std::vector<char> is_holder(g_, 0);
    for (int i = 0; i < slots_; ++i) {
      int holder = (first_holder + i) % g_;
      is_holder[holder] = 1;
      stripe_parity_[j].push_back(holder);
      parity_position_[j].push_back(static_cast<int>(held_[holder].size()));
      held_[holder].emplace_back(j, i);
    }
    if (mirroring_) {
      stripe_data_[j].push_back({j, 0});
      continue;
    }
    for (int n = 0; n < g_; ++n) {
      if (!is_holder[n]) stripe_data_[j].push_back({n, next_chunk[n]++});
    }
  }
  if (!mirroring_) code_ = std::make_shared<const ReedSolomon>(k_, p_);
}

void GroupLayout::check_node(int node, const char* what) const {
  LOOM_CHECK(node >= 0 && node < g_, kSnapshot, what << " " << node << " is outside the group [0, " << g_ << ")");
}

void GroupLayout::check_stripe(int stripe) const {
  LOOM_CHECK(stripe >= 0 && stripe < g_, kSnapshot,
             "stripe " << stripe << " is outside [0, " << g_ << ") (one stripe per node)");
}

size_t GroupLayout::padded_blob_bytes(size_t blob_bytes) const {
  const size_t unit = static_cast<size_t>(k_) * 64;
  return (blob_bytes + unit - 1) / unit * unit;
}

size_t GroupLayout::chunk_bytes(size_t blob_bytes) const {
  return padded_blob_bytes(blob_bytes) / k_;
}

const std::vector<FragmentRef>& GroupLayout::stripe_data(int stripe) const {
  check_stripe(stripe);
  return stripe_data_[stripe];
}

const std::vector<int>& GroupLayout::stripe_parity_nodes(int stripe) const {
  check_stripe(stripe);
  return stripe_parity_[stripe];
}

std::vector<int> GroupLayout::stripe_nodes(int stripe) const {
  check_stripe(stripe);
  std::vector<int> nodes;
  for (const FragmentRef& f : stripe_data_[stripe]) nodes.push_back(f.node);
  nodes.insert(nodes.end(), stripe_parity_[stripe].begin(), stripe_parity_[stripe].end());
  return nodes;
}

const std::vector<std::pair<int, int>>& GroupLayout::parity_held_by(int node) const {
  check_node(node, "node");
  return held_[node];
}

int GroupLayout::parity_position(int stripe, int slot) const {
  check_stripe(stripe);
  LOOM_CHECK(slot >= 0 && slot < slots_, kSnapshot, "parity slot " << slot << " is outside [0, " << slots_ << ")");
  return parity_position_[stripe][slot];
}

size_t GroupLayout::parity_bytes_per_node(size_t blob_bytes) const {
  return static_cast<size_t>(slots_) * chunk_bytes(blob_bytes);
}

std::vector<int> GroupLayout::mirror_holders(int node) const {
  check_node(node, "node");
  return mirroring_ ? stripe_parity_[node] : std::vector<int>{};
}

bool GroupLayout::recoverable(const std::vector<int>& lost) const {
  std::vector<char> is_lost(g_, 0);
  for (int n : lost) {
    check_node(n, "lost node");
    LOOM_CHECK(!is_lost[n], kSnapshot, "lost node " << n << " is listed twice");
    is_lost[n] = 1;
  }
  // A stripe survives while at most parity_slots() of its fragments are lost; a lost node's parity area is
  // made of other stripes' fragments, so it comes back when every stripe does.
  for (int j = 0; j < g_; ++j) {
    int lost_fragments = 0;
    for (int n : stripe_nodes(j)) lost_fragments += is_lost[n];
    if (lost_fragments > slots_) return false;
  }
  return true;
}

// ---- whole-group operations ------------------------------------------------------------------------------------

namespace {

// Chunk c of a blob whose bytes past blob_bytes count as zeros. A chunk inside the blob is used in place; one
// that reaches past the end goes through a zero-padded scratch buffer (at most one per node holds real bytes).
class BlobChunks {
 public:
  BlobChunks(size_t blob_bytes, size_t chunk_bytes) : blob_bytes_(blob_bytes), chunk_bytes_(chunk_bytes) {}

  bool inside(int c) const { return (static_cast<size_t>(c) + 1) * chunk_bytes_ <= blob_bytes_; }

  // A readable chunk_bytes buffer with chunk c's bytes; `scratch` backs it when the chunk is not inside.
  const uint8_t* read(const uint8_t* blob, int c, std::vector<uint8_t>& scratch) const {
    if (inside(c)) return blob + c * chunk_bytes_;
    scratch.assign(chunk_bytes_, 0);
    size_t begin = c * chunk_bytes_;
    if (begin < blob_bytes_) std::memcpy(scratch.data(), blob + begin, blob_bytes_ - begin);
    return scratch.data();
  }

  // A writable chunk_bytes buffer for chunk c; call commit afterwards to move the real bytes into the blob.
  uint8_t* write(uint8_t* blob, int c, std::vector<uint8_t>& scratch) const {
    if (inside(c)) return blob + c * chunk_bytes_;
    scratch.resize(chunk_bytes_);
    return scratch.data();
  }
  void commit(uint8_t* blob, int c, const std::vector<uint8_t>& scratch) const {
    size_t begin = c * chunk_bytes_;
    if (inside(c) || begin >= blob_bytes_) return;
    std::memcpy(blob + begin, scratch.data(), blob_bytes_ - begin);
  }

 private:
  size_t blob_bytes_, chunk_bytes_;
};

void check_buffers(const GroupLayout& layout, size_t blob_bytes, size_t nblobs, size_t nparity, const char* what) {
  LOOM_CHECK(
      nblobs == static_cast<size_t>(layout.group_size()) && nparity == nblobs, kSnapshot,
      what << ": expected " << layout.group_size() << " blobs and parity areas, got " << nblobs << " and " << nparity);
}

// Mirroring: the copy of `blob` in a slot of chunk_bytes (the blob, then zeros).
void write_copy(uint8_t* slot, const uint8_t* blob, size_t blob_bytes, size_t chunk_bytes) {
  if (blob_bytes > 0) std::memcpy(slot, blob, blob_bytes);
  std::memset(slot + blob_bytes, 0, chunk_bytes - blob_bytes);
}

}  // namespace

void encode_stripe(const GroupLayout& layout, int stripe, size_t chunk_bytes, const uint8_t* const* data,
                   uint8_t* const* parity) {
  layout.stripe_data(stripe);  // checks the stripe index
  if (layout.mirroring()) {
    for (int i = 0; i < layout.parity_slots(); ++i) std::memcpy(parity[i], data[0], chunk_bytes);
    return;
  }
  layout.code()->encode(chunk_bytes, data, parity);
}

void encode_group(const GroupLayout& layout, size_t blob_bytes, const std::vector<const uint8_t*>& blobs,
                  const std::vector<uint8_t*>& parity_areas) {
  check_buffers(layout, blob_bytes, blobs.size(), parity_areas.size(), "encode_group");
  const size_t chunk = layout.chunk_bytes(blob_bytes);
  if (chunk == 0 || layout.parity_slots() == 0) return;
  if (layout.mirroring()) {
    for (int n = 0; n < layout.group_size(); ++n) {
      const auto& holders = layout.stripe_parity_nodes(n);
      for (int i = 0; i < static_cast<int>(holders.size()); ++i) {
        uint8_t* slot = parity_areas[holders[i]] + layout.parity_position(n, i) * chunk;
        write_copy(slot, blobs[n], blob_bytes, chunk);
      }
    }
    return;
  }
  const BlobChunks chunks(blob_bytes, chunk);
  std::vector<std::vector<uint8_t>> scratch(layout.k());
  std::vector<const uint8_t*> data(layout.k());
  std::vector<uint8_t*> parity(layout.parity_slots());
  for (int j = 0; j < layout.group_size(); ++j) {
    const auto& fragments = layout.stripe_data(j);
    for (int f = 0; f < layout.k(); ++f)
      data[f] = chunks.read(blobs[fragments[f].node], fragments[f].chunk, scratch[f]);
    const auto& holders = layout.stripe_parity_nodes(j);
    for (int i = 0; i < layout.parity_slots(); ++i) {
      parity[i] = parity_areas[holders[i]] + layout.parity_position(j, i) * chunk;
    }
    encode_stripe(layout, j, chunk, data.data(), parity.data());
  }
}

void rebuild_group(const GroupLayout& layout, size_t blob_bytes, const std::vector<int>& lost,
                   const std::vector<uint8_t*>& blobs, const std::vector<uint8_t*>& parity_areas) {
  check_buffers(layout, blob_bytes, blobs.size(), parity_areas.size(), "rebuild_group");
  if (!layout.recoverable(lost)) {
    std::ostringstream nodes;
    for (size_t i = 0; i < lost.size(); ++i) nodes << (i ? ", " : "") << lost[i];
    LOOM_THROW(kSnapshot, "cannot rebuild lost nodes [" << nodes.str() << "]: a group of " << layout.group_size()
                                                        << " with parity " << layout.parity() << " tolerates "
                                                        << layout.tolerated_losses() << " lost node(s)");
  }
  const size_t chunk = layout.chunk_bytes(blob_bytes);
  if (lost.empty() || chunk == 0) return;
  std::vector<char> is_lost(layout.group_size(), 0);
  for (int n : lost) is_lost[n] = 1;

  if (layout.mirroring()) {
    // Blobs first, from a surviving copy; then the lost nodes' copies of other blobs, all of which now exist.
    for (int n : lost) {
      const auto& holders = layout.stripe_parity_nodes(n);
      for (int i = 0; i < static_cast<int>(holders.size()); ++i) {
        if (is_lost[holders[i]]) continue;
        std::memcpy(blobs[n], parity_areas[holders[i]] + layout.parity_position(n, i) * chunk, blob_bytes);
        break;
      }
    }
    for (int n : lost) {
      const auto& held = layout.parity_held_by(n);
      for (size_t e = 0; e < held.size(); ++e)
        write_copy(parity_areas[n] + e * chunk, blobs[held[e].first], blob_bytes, chunk);
    }
    return;
  }

  const BlobChunks chunks(blob_bytes, chunk);
  const int k = layout.k();
  const ReedSolomon& code = *layout.code();
  std::vector<std::vector<uint8_t>> in_scratch(k), out_scratch(layout.parity_slots());
  for (int j = 0; j < layout.group_size(); ++j) {
    const std::vector<int> nodes = layout.stripe_nodes(j);
    const auto& fragments = layout.stripe_data(j);
    // Fragment f's buffer: a chunk of a blob (f < k) or a slot of a parity area (f >= k).
    auto parity_slot = [&](int f) { return parity_areas[nodes[f]] + layout.parity_position(j, f - k) * chunk; };
    std::vector<int> present_idx, missing_idx;
    std::vector<const uint8_t*> present;
    std::vector<uint8_t*> out;
    for (int f = 0; f < static_cast<int>(nodes.size()); ++f) {
      if (is_lost[nodes[f]]) {
        missing_idx.push_back(f);
        uint8_t* buf =
            f < k ? chunks.write(blobs[nodes[f]], fragments[f].chunk, out_scratch[out.size()]) : parity_slot(f);
        out.push_back(buf);
      } else if (static_cast<int>(present_idx.size()) < k) {
        present_idx.push_back(f);
        present.push_back(f < k ? chunks.read(blobs[nodes[f]], fragments[f].chunk, in_scratch[present.size()])
                                : parity_slot(f));
      }
    }
    if (missing_idx.empty()) continue;
    code.reconstruct(chunk, present_idx, present.data(), missing_idx, out.data());
    for (size_t m = 0; m < missing_idx.size(); ++m) {
      int f = missing_idx[m];
      if (f < k) chunks.commit(blobs[nodes[f]], fragments[f].chunk, out_scratch[m]);
    }
  }
}

// ---- plain reference -------------------------------------------------------------------------------------------

namespace plain {
namespace {

// GF(2^8) modulo x^8 + x^4 + x^3 + x^2 + 1 (0x11d, ISA-L's field), generator 2.
struct Field {
  std::array<uint8_t, 512> exp{};
  std::array<int, 256> log{};
  std::vector<uint8_t> mul;  // 256 x 256 products, row a: a * b for every b
  Field() : mul(256 * 256) {
    int x = 1;
    for (int i = 0; i < 255; ++i) {
      exp[i] = exp[i + 255] = static_cast<uint8_t>(x);
      log[x] = i;
      x <<= 1;
      if (x & 0x100) x ^= 0x11d;
    }
    for (int a = 1; a < 256; ++a) {
      for (int b = 1; b < 256; ++b) mul[a * 256 + b] = exp[log[a] + log[b]];
    }
  }
};

const Field& field() {
  static const Field f;
  return f;
}

// Gauss-Jordan elimination; a is consumed.
bool invert(std::vector<uint8_t>& a, std::vector<uint8_t>& inv, int n) {
  inv.assign(static_cast<size_t>(n) * n, 0);
  for (int i = 0; i < n; ++i) inv[i * n + i] = 1;
  for (int col = 0; col < n; ++col) {
    int pivot = col;
    while (pivot < n && a[pivot * n + col] == 0) ++pivot;
    if (pivot == n) return false;
    for (int c = 0; c < n; ++c) {
      std::swap(a[pivot * n + c], a[col * n + c]);
      std::swap(inv[pivot * n + c], inv[col * n + c]);
    }
    uint8_t scale = gf_inv(a[col * n + col]);
    for (int c = 0; c < n; ++c) {
      a[col * n + c] = gf_mul(a[col * n + c], scale);
      inv[col * n + c] = gf_mul(inv[col * n + c], scale);
    }
    for (int r = 0; r < n; ++r) {
      uint8_t factor = a[r * n + col];
      if (r == col || factor == 0) continue;
      for (int c = 0; c < n; ++c) {
        a[r * n + c] ^= gf_mul(factor, a[col * n + c]);
        inv[r * n + c] ^= gf_mul(factor, inv[col * n + c]);
      }
    }
  }
  return true;
}

}  // namespace

uint8_t gf_mul(uint8_t a, uint8_t b) {
  return field().mul[a * 256 + b];
}

uint8_t gf_inv(uint8_t a) {
  LOOM_CHECK(a != 0, kInternal, "gf_inv(0): zero has no inverse in GF(2^8)");
  return field().exp[255 - field().log[a]];
}

ReedSolomon::ReedSolomon(int k, int p) : k_(k), p_(p) {
  check_code_shape(k, p);
  generator_.assign(static_cast<size_t>(k + p) * k, 0);
  for (int i = 0; i < k; ++i) generator_[i * k + i] = 1;
  for (int i = k; i < k + p; ++i) {
    for (int j = 0; j < k; ++j) generator_[i * k + j] = gf_inv(static_cast<uint8_t>(i ^ j));
  }
}

void ReedSolomon::multiply(size_t len, const uint8_t* rows, int nrows, const uint8_t* const* in,
                           uint8_t* const* out) const {
  if (len == 0) return;
  const uint8_t* products = field().mul.data();
  for (int r = 0; r < nrows; ++r) {
    uint8_t* dst = out[r];
    std::memset(dst, 0, len);
    for (int c = 0; c < k_; ++c) {
      const uint8_t* times = products + 256 * rows[r * k_ + c];
      const uint8_t* src = in[c];
      for (size_t b = 0; b < len; ++b) dst[b] ^= times[src[b]];
    }
  }
}

void ReedSolomon::encode(size_t len, const uint8_t* const* data, uint8_t* const* parity) const {
  multiply(len, &generator_[static_cast<size_t>(k_) * k_], p_, data, parity);
}

void ReedSolomon::reconstruct(size_t len, const std::vector<int>& present_idx, const uint8_t* const* present,
                              const std::vector<int>& missing_idx, uint8_t* const* out) const {
  std::vector<int> survivors = check_erasures(k_, p_, present_idx, missing_idx);
  auto inverse = [this](std::vector<uint8_t>& b, std::vector<uint8_t>& inv) { return invert(b, inv, k_); };
  std::vector<uint8_t> rows = decode_rows(generator_, k_, survivors, missing_idx, inverse, gf_mul);
  multiply(len, rows.data(), static_cast<int>(missing_idx.size()), present, out);
}

}  // namespace plain

}  // namespace loom::ec
