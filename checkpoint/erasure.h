// Erasure coding of the in-memory snapshots (ARCHITECTURE.md §5; the idea is REFT's): the daemons of an EC group
// of G nodes protect each other's snapshot blobs with Reed-Solomon parity so that any p lost nodes can be rebuilt
// from the survivors, at a memory overhead of p/(G-p) instead of the p-fold of mirroring.
//
// Three layers:
//   - ReedSolomon: a systematic (k + p, k) code over GF(2^8) with Intel ISA-L. The generator is ISA-L's Cauchy
//     matrix (identity on top, 1/(i ^ j) below), so every k x k submatrix is invertible: any k of the k + p
//     fragments rebuild the rest.
//   - GroupLayout: where the fragments of a group live. Stripes rotate their parity holders over the nodes, so
//     every node holds the same amount of parity and every node is a data node in k stripes.
//   - encode_group / rebuild_group: whole-group operations on in-memory buffers (the reference for the networked
//     daemons, and what a single-node daemon uses); encode_stripe is the per-stripe piece the networked daemons
//     run once they have gathered a stripe's data chunks.
// plain::ReedSolomon is the same code written out with a 256 x 256 multiplication table: it checks ISA-L in the
// tests and is the peer of bench/ec_bench.cc.
//
// Assumes: fragment buffers do not overlap; the const methods are safe to call from several threads at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace loom::ec {

// Largest k + p of a code over GF(2^8) with ISA-L's Cauchy construction.
inline constexpr int kMaxFragments = 255;

// Systematic Reed-Solomon code: k data fragments, p parity fragments, all `len` bytes. Fragment index f in
// [0, k + p): f < k is data fragment f, f >= k is parity fragment f - k.
class ReedSolomon {
 public:
  // 1 <= k, 0 <= p, k + p <= kMaxFragments; a config error naming k and p otherwise.
  ReedSolomon(int k, int p);
  ReedSolomon(const ReedSolomon&) = delete;
  ReedSolomon& operator=(const ReedSolomon&) = delete;

  int k() const { return k_; }
  int p() const { return p_; }
  // The (k + p) x k generator, row-major: rows 0..k-1 are the identity, row k + i gives parity i.
  const std::vector<uint8_t>& generator() const { return generator_; }

  // parity[i] (i < p) from data[0..k), each `len` bytes. Any len, no alignment needed (multiples of 64 are fastest).
  void encode(size_t len, const uint8_t* const* data, uint8_t* const* parity) const;

  // Rebuilds the fragments missing_idx (data or parity) into out[0..missing_idx.size()) from surviving fragments
  // (present_idx[i] is the index of present[i]). Uses the first k entries of present_idx; more are allowed and
  // ignored. Throws a snapshot error when fewer than k survive, or when an index is out of range, repeated, or
  // both present and missing. Decode tables are cached per (survivors, missing) pattern.
  void reconstruct(size_t len, const std::vector<int>& present_idx, const uint8_t* const* present,
                   const std::vector<int>& missing_idx, uint8_t* const* out) const;

 private:
  // ISA-L tables (32 bytes per coefficient) that turn the k survivors into the missing fragments.
  std::shared_ptr<const std::vector<uint8_t>> decode_tables(const std::vector<int>& survivors,
                                                            const std::vector<int>& missing_idx) const;

  int k_, p_;
  std::vector<uint8_t> generator_;      // (k + p) x k
  std::vector<uint8_t> encode_tables_;  // ec_init_tables of the p parity rows: 32 * k * p
  mutable std::mutex cache_mutex_;
  mutable std::map<std::vector<int>, std::shared_ptr<const std::vector<uint8_t>>> decode_cache_;
};

// ---- placement -------------------------------------------------------------------------------------------------

// A data chunk of a stripe: chunk `chunk` of node `node`'s blob.
struct FragmentRef {
  int node;
  int chunk;
  bool operator==(const FragmentRef&) const = default;
};

// Placement of an EC group of G nodes (daemon ranks 0..G-1), each holding one blob of S bytes.
//
// Parity mode (p >= 1 and G > p), k = G - p:
//   - There are G stripes. Stripe j's parity holders are nodes (j + i) mod G for i < p (parity slot i lives on
//     the i-th of them); its k data fragments are one chunk from each other node, in increasing node order.
//   - Each blob is split into k chunks of chunk_bytes(S) = padded_blob_bytes(S) / k bytes, where the padded size
//     is S rounded up to a multiple of k * 64 (64-byte chunks suit the SIMD kernels). The padding is implicit:
//     blob buffers are S bytes long and the bytes past S count as zeros.
//   - Node n's c-th chunk is a data fragment of the c-th stripe (in increasing j) in which n is not a parity
//     holder. Every node holds p parity chunks, one per stripe it is a parity holder of: overhead p / (G - p).
//   - Every stripe touches every node exactly once, so any p lost nodes cost each stripe at most p fragments.
// No protection (p == 0): k = G, stripes without parity; nothing lost can be rebuilt.
// Mirroring (p >= 1 and G <= p, too few nodes for parity): node n's blob is copied whole to the next
//   copies = min(p, G - 1) nodes (n + 1 + i) mod G, i < copies. Expressed in the same terms: stripe j is node j's
//   blob as a single chunk (k() == 1) and its "parity" slots are the copies; any `copies` lost nodes are
//   recoverable. G == 1 has nowhere to copy to, so copies == 0 there (unprotected).
class GroupLayout {
 public:
  // 1 <= group_size <= kMaxFragments, parity >= 0; a config error otherwise.
  GroupLayout(int group_size, int parity);

  bool mirroring() const { return mirroring_; }
  int group_size() const { return g_; }
  // The requested parity count (copies in mirroring mode are parity_slots()).
  int parity() const { return p_; }
  // Data fragments per stripe: G - p, or 1 when mirroring.
  int k() const { return k_; }
  // Parity (or copy) slots per stripe: p, or min(p, G - 1) when mirroring.
  int parity_slots() const { return slots_; }
  // The number of lost nodes that is always recoverable.
  int tolerated_losses() const { return slots_; }

  size_t padded_blob_bytes(size_t blob_bytes) const;
  size_t chunk_bytes(size_t blob_bytes) const;

  // Stripe j's k data fragments in order.
  const std::vector<FragmentRef>& stripe_data(int stripe) const;
  // Stripe j's parity holders in slot order (slot i is stored on node stripe_parity_nodes(j)[i]).
  const std::vector<int>& stripe_parity_nodes(int stripe) const;
  // The node of each of stripe j's k + parity_slots() fragments, in fragment order (data, then parity): the
  // indices ReedSolomon::reconstruct takes.
  std::vector<int> stripe_nodes(int stripe) const;

  // What node n stores as parity: (stripe, slot) pairs in storage order; each entry is chunk_bytes long, so
  // entry e starts at byte e * chunk_bytes(S) of the node's parity area.
  const std::vector<std::pair<int, int>>& parity_held_by(int node) const;
  // Index into parity_held_by(holder) of stripe j's slot i, i.e. where that parity chunk sits in its holder's area.
  int parity_position(int stripe, int slot) const;
  size_t parity_bytes_per_node(size_t blob_bytes) const;

  // Mirroring: the nodes that hold a copy of node n's blob (empty otherwise).
  std::vector<int> mirror_holders(int node) const;

  // Whether every lost node's blob and parity area can be rebuilt from the others. Node ids must be in range and
  // distinct (a snapshot error otherwise).
  bool recoverable(const std::vector<int>& lost) const;

  // The code of the stripes: ReedSolomon(k, p) in parity and no-protection modes; null when mirroring.
  const ReedSolomon* code() const { return code_.get(); }

 private:
  void check_node(int node, const char* what) const;
  void check_stripe(int stripe) const;

  int g_, p_, k_, slots_;
  bool mirroring_;
  std::vector<std::vector<FragmentRef>> stripe_data_;   // [stripe] -> k data fragments
  std::vector<std::vector<int>> stripe_parity_;         // [stripe] -> slot holders
  std::vector<std::vector<std::pair<int, int>>> held_;  // [node] -> (stripe, slot)
  std::vector<std::vector<int>> parity_position_;       // [stripe][slot] -> index in the holder's list
  std::shared_ptr<const ReedSolomon> code_;
};

// Stripe j's parity (or mirror copies) from its k data chunks, each chunk_bytes long: parity[i] is slot i.
void encode_stripe(const GroupLayout& layout, int stripe, size_t chunk_bytes, const uint8_t* const* data,
                   uint8_t* const* parity);

// Computes every node's parity area from all blobs. blobs[n] is blob_bytes long, parity_areas[n] is
// parity_bytes_per_node(blob_bytes) long.
void encode_group(const GroupLayout& layout, size_t blob_bytes, const std::vector<const uint8_t*>& blobs,
                  const std::vector<uint8_t*>& parity_areas);

// Rebuilds the blobs and parity areas of the `lost` nodes (outputs) from the other nodes' blobs and parity areas
// (inputs, not modified). A snapshot error when the loss is not recoverable.
void rebuild_group(const GroupLayout& layout, size_t blob_bytes, const std::vector<int>& lost,
                   const std::vector<uint8_t*>& blobs, const std::vector<uint8_t*>& parity_areas);

// ---- plain reference -------------------------------------------------------------------------------------------

// The same code without ISA-L: GF(2^8) with the polynomial 0x11d, one 64 KiB product table, byte at a time.
// Produces the same bytes as loom::ec::ReedSolomon (same Cauchy generator); reconstructs by Gauss-Jordan
// elimination of the survivors' rows on every call. For validation and as the benchmark's peer.
namespace plain {

uint8_t gf_mul(uint8_t a, uint8_t b);
uint8_t gf_inv(uint8_t a);  // a != 0

class ReedSolomon {
 public:
  ReedSolomon(int k, int p);
  int k() const { return k_; }
  int p() const { return p_; }
  const std::vector<uint8_t>& generator() const { return generator_; }
  void encode(size_t len, const uint8_t* const* data, uint8_t* const* parity) const;
  void reconstruct(size_t len, const std::vector<int>& present_idx, const uint8_t* const* present,
                   const std::vector<int>& missing_idx, uint8_t* const* out) const;

 private:
  // out[r] = sum_c rows[r][c] * in[c] for r < nrows, over `len` bytes.
  void multiply(size_t len, const uint8_t* rows, int nrows, const uint8_t* const* in, uint8_t* const* out) const;
  int k_, p_;
  std::vector<uint8_t> generator_;
};

}  // namespace plain

}  // namespace loom::ec
