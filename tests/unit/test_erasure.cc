// Erasure coding of snapshots (checkpoint/erasure.h) and the snapshot CRC (checkpoint/crc.h).
//
// ISA-L's code is checked byte for byte against the plain GF(2^8) implementation (same Cauchy generator), and
// every reconstruction against the original bytes. The group tests encode random blobs of awkward sizes, drop
// every set of nodes the layout promises to survive, fill the lost buffers with garbage, rebuild, and compare
// blobs and parity areas with what they were; guard bytes after each blob catch writes into the padding.
#include <gtest/gtest.h>
#include <isa-l/erasure_code.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/crc.h"
#include "checkpoint/erasure.h"
#include "core/error.h"
#include "core/rng.h"

namespace loom::ec {
namespace {

using Bytes = std::vector<uint8_t>;

Bytes random_bytes(size_t n, uint64_t seed, uint64_t stream) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(random_u64(seed, stream, i) >> 24);
  return b;
}

::testing::AssertionResult bytes_equal(const uint8_t* got, const uint8_t* want, size_t n, const std::string& what) {
  size_t bad = 0;
  int max_diff = 0;
  std::ostringstream first;
  for (size_t i = 0; i < n; ++i) {
    if (got[i] == want[i]) continue;
    max_diff = std::max(max_diff, std::abs(int{got[i]} - int{want[i]}));
    if (bad++ < 5) first << "\n  [" << i << "] got " << int{got[i]} << ", expected " << int{want[i]};
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << bad << " of " << n << " bytes differ, max |diff| " << max_diff
                                       << first.str();
}

// Runs fn, expects a loom::Error of `kind` whose message contains `needle`.
void expect_error(const std::function<void()>& fn, ErrorKind kind, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected a " << error_kind_name(kind) << " containing '" << needle << "', nothing thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

std::vector<const uint8_t*> pointers(const std::vector<Bytes>& v) {
  std::vector<const uint8_t*> p;
  for (const Bytes& b : v) p.push_back(b.data());
  return p;
}

std::vector<uint8_t*> pointers(std::vector<Bytes>& v) {
  std::vector<uint8_t*> p;
  for (Bytes& b : v) p.push_back(b.data());
  return p;
}

// All subsets of {0..n-1} of size <= max_size, as sorted lists.
std::vector<std::vector<int>> subsets_up_to(int n, int max_size) {
  std::vector<std::vector<int>> out;
  for (unsigned mask = 0; mask < (1u << n); ++mask) {
    std::vector<int> s;
    for (int i = 0; i < n; ++i) {
      if (mask & (1u << i)) s.push_back(i);
    }
    if (static_cast<int>(s.size()) <= max_size) out.push_back(s);
  }
  return out;
}

std::string list(const std::vector<int>& v) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  return s.str() + "]";
}

// ---- CRC -------------------------------------------------------------------------------------------------------

// Bitwise CRC-32 (reflected 0xEDB88320), the textbook definition.
uint32_t crc32_bitwise(const uint8_t* p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int b = 0; b < 8; ++b) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return ~c;
}

TEST(Crc, KnownVectorAndChaining) {
  const char* check = "123456789";
  EXPECT_EQ(crc32(check, 9), 0xCBF43926u);
  EXPECT_EQ(crc32(check, 0), 0u);
  Bytes data = random_bytes(10007, 1, 1);
  const uint32_t whole = crc32(data.data(), data.size());
  EXPECT_EQ(whole, crc32_bitwise(data.data(), data.size()));
  for (size_t split : {size_t{0}, size_t{1}, size_t{63}, size_t{5000}, data.size()}) {
    uint32_t head = crc32(data.data(), split);
    EXPECT_EQ(crc32(data.data() + split, data.size() - split, head), whole) << "split at " << split;
  }
  data[777] ^= 0x10;
  EXPECT_NE(crc32(data.data(), data.size()), whole);
}

// ---- ReedSolomon -----------------------------------------------------------------------------------------------

struct Coded {
  std::vector<Bytes> fragments;  // k data, then p parity
};

// Random data fragments and their ISA-L parity; checks the parity against the plain code.
Coded encode_random(const ReedSolomon& rs, size_t len, uint64_t seed) {
  const int k = rs.k(), p = rs.p();
  Coded c;
  for (int i = 0; i < k; ++i) c.fragments.push_back(random_bytes(len, seed, 100 + i));
  for (int i = 0; i < p; ++i) c.fragments.emplace_back(len, 0xEE);
  std::vector<const uint8_t*> data;
  std::vector<uint8_t*> parity;
  for (int i = 0; i < k; ++i) data.push_back(c.fragments[i].data());
  for (int i = 0; i < p; ++i) parity.push_back(c.fragments[k + i].data());
  rs.encode(len, data.data(), parity.data());

  plain::ReedSolomon reference(k, p);
  std::vector<Bytes> want(p, Bytes(len, 0x11));
  std::vector<uint8_t*> want_ptr = pointers(want);
  reference.encode(len, data.data(), want_ptr.data());
  for (int i = 0; i < p; ++i) {
    EXPECT_TRUE(bytes_equal(c.fragments[k + i].data(), want[i].data(), len,
                            "parity " + std::to_string(i) + " vs plain, k=" + std::to_string(k) +
                                " p=" + std::to_string(p) + " len=" + std::to_string(len)));
  }
  return c;
}

// Drops `missing`, rebuilds it from the survivors (in the given order) and compares with the originals.
void check_reconstruct(const ReedSolomon& rs, const Coded& c, size_t len, const std::vector<int>& missing,
                       bool reverse_survivors) {
  std::vector<int> present_idx;
  for (int f = 0; f < rs.k() + rs.p(); ++f) {
    if (std::find(missing.begin(), missing.end(), f) == missing.end()) present_idx.push_back(f);
  }
  if (reverse_survivors) std::reverse(present_idx.begin(), present_idx.end());
  std::vector<const uint8_t*> present;
  for (int f : present_idx) present.push_back(c.fragments[f].data());
  std::vector<Bytes> out(missing.size(), Bytes(len, 0x5A));
  std::vector<uint8_t*> out_ptr = pointers(out);
  rs.reconstruct(len, present_idx, present.data(), missing, out_ptr.data());
  for (size_t m = 0; m < missing.size(); ++m) {
    EXPECT_TRUE(bytes_equal(out[m].data(), c.fragments[missing[m]].data(), len,
                            "k=" + std::to_string(rs.k()) + " p=" + std::to_string(rs.p()) + " missing " +
                                list(missing) + ", fragment " + std::to_string(missing[m])));
  }
}

TEST(ReedSolomon, GeneratorIsIsalCauchyAndMatchesPlain) {
  for (int k = 1; k <= 8; ++k) {
    for (int p = 0; p <= 3; ++p) {
      ReedSolomon rs(k, p);
      plain::ReedSolomon reference(k, p);
      EXPECT_EQ(rs.generator(), reference.generator()) << "k=" << k << " p=" << p;
      for (int i = 0; i < k; ++i) {
        for (int j = 0; j < k; ++j) EXPECT_EQ(rs.generator()[i * k + j], i == j ? 1 : 0);
      }
    }
  }
  EXPECT_EQ(plain::gf_mul(2, 0x80), 0x1d);  // x * x^7 = x^8 = x^4 + x^3 + x^2 + 1 modulo 0x11d
  int mul_mismatches = 0;
  for (int a = 0; a < 256; ++a) {
    if (a > 0) {
      EXPECT_EQ(plain::gf_mul(a, plain::gf_inv(a)), 1) << "a=" << a;
    }
    for (int b = 0; b < 256; ++b) mul_mismatches += plain::gf_mul(a, b) != ::gf_mul(a, b);
  }
  EXPECT_EQ(mul_mismatches, 0) << "plain GF(2^8) products that differ from ISA-L's gf_mul";
}

TEST(ReedSolomon, EncodeAndEverySingleErasure) {
  for (int k = 1; k <= 8; ++k) {
    for (int p = 0; p <= 3; ++p) {
      ReedSolomon rs(k, p);
      for (size_t len : {size_t{1}, size_t{461}, size_t{4096}}) {
        Coded c = encode_random(rs, len, 1000 * k + 10 * p + len);
        check_reconstruct(rs, c, len, {}, false);
        for (int f = 0; p > 0 && f < k + p; ++f) check_reconstruct(rs, c, len, {f}, f % 2 == 1);
      }
    }
  }
}

TEST(ReedSolomon, EveryDoubleAndTripleErasure) {
  const size_t len = 1000;
  for (auto [k, p] : std::vector<std::pair<int, int>>{{2, 2}, {4, 2}, {8, 2}, {3, 3}, {6, 3}}) {
    ReedSolomon rs(k, p);
    plain::ReedSolomon reference(k, p);
    Coded c = encode_random(rs, len, 77 + k);
    for (const std::vector<int>& missing : subsets_up_to(k + p, p)) {
      if (missing.size() < 2) continue;
      check_reconstruct(rs, c, len, missing, missing[0] % 2 == 0);
    }
    // The plain decoder agrees on a mixed data + parity loss.
    std::vector<int> missing = {0, k};
    std::vector<int> present_idx;
    std::vector<const uint8_t*> present;
    for (int f = 1; f < k + p; ++f) {
      if (f == k) continue;
      present_idx.push_back(f);
      present.push_back(c.fragments[f].data());
    }
    std::vector<Bytes> out(2, Bytes(len, 0));
    std::vector<uint8_t*> out_ptr = pointers(out);
    reference.reconstruct(len, present_idx, present.data(), missing, out_ptr.data());
    EXPECT_TRUE(bytes_equal(out[0].data(), c.fragments[0].data(), len, "plain decode of data 0"));
    EXPECT_TRUE(bytes_equal(out[1].data(), c.fragments[k].data(), len, "plain decode of parity 0"));
  }
}

TEST(ReedSolomon, ConcurrentReconstructShareTheCache) {
  const int k = 5, p = 3;
  const size_t len = 2048;
  ReedSolomon rs(k, p);
  Coded c = encode_random(rs, len, 9);
  std::vector<std::vector<int>> patterns = {{0, 1, 2}, {2, 5, 7}, {4, 6}, {1}, {0, 1, 2}, {3, 5, 6}};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 20; ++round) {
        check_reconstruct(rs, c, len, patterns[(t + round) % patterns.size()], round % 2 == 0);
      }
    });
  }
  for (std::thread& t : threads) t.join();
}

TEST(ReedSolomon, InvalidArguments) {
  expect_error([] { ReedSolomon(0, 2); }, ErrorKind::kConfig, "k = 0, p = 2");
  expect_error([] { ReedSolomon(3, -1); }, ErrorKind::kConfig, "k = 3, p = -1");
  expect_error([] { ReedSolomon(200, 56); }, ErrorKind::kConfig, "k = 200, p = 56");
  expect_error([] { plain::ReedSolomon(0, 1); }, ErrorKind::kConfig, "k = 0");
  ReedSolomon(254, 1);  // the largest shapes are accepted
  ReedSolomon(1, 254);

  const int k = 3, p = 2;
  const size_t len = 64;
  ReedSolomon rs(k, p);
  Coded c = encode_random(rs, len, 5);
  const uint8_t* present[5] = {c.fragments[0].data(), c.fragments[1].data(), c.fragments[2].data(),
                               c.fragments[3].data(), c.fragments[4].data()};
  Bytes out(len);
  uint8_t* out_ptr[2] = {out.data(), out.data()};
  auto call = [&](std::vector<int> present_idx, std::vector<int> missing) {
    return [&rs, &present, &out_ptr, present_idx, missing, len] {
      rs.reconstruct(len, present_idx, present, missing, out_ptr);
    };
  };
  expect_error(call({1, 2}, {0}), ErrorKind::kSnapshot, "2 fragments survive, k = 3");
  expect_error(call({1, 2, 5}, {0}), ErrorKind::kSnapshot, "present fragment index 5 is outside [0, 5)");
  expect_error(call({1, 2, -1}, {0}), ErrorKind::kSnapshot, "present fragment index -1");
  expect_error(call({1, 2, 2}, {0}), ErrorKind::kSnapshot, "present fragment index 2 is given twice");
  expect_error(call({1, 2, 3}, {7}), ErrorKind::kSnapshot, "missing fragment index 7 is outside");
  expect_error(call({1, 2, 3}, {0, 0}), ErrorKind::kSnapshot, "missing fragment index 0 is given twice");
  expect_error(call({1, 2, 3}, {2}), ErrorKind::kSnapshot, "fragment 2 is both present and missing");
  // More than k survivors: the first k are used.
  check_reconstruct(rs, c, len, {1}, false);
}

// ---- GroupLayout -----------------------------------------------------------------------------------------------

TEST(GroupLayout, InvariantsForSmallGroups) {
  const size_t blob = 12345;
  for (int g = 1; g <= 8; ++g) {
    for (int p = 0; p <= 3; ++p) {
      SCOPED_TRACE("G=" + std::to_string(g) + " p=" + std::to_string(p));
      GroupLayout layout(g, p);
      const bool mirror = p >= 1 && g <= p;
      ASSERT_EQ(layout.mirroring(), mirror);
      EXPECT_EQ(layout.group_size(), g);
      EXPECT_EQ(layout.parity(), p);
      const int k = layout.k(), slots = layout.parity_slots();
      EXPECT_EQ(k, mirror ? 1 : g - p);
      EXPECT_EQ(slots, mirror ? std::min(p, g - 1) : p);
      EXPECT_EQ(layout.code() == nullptr, mirror);

      const size_t padded = layout.padded_blob_bytes(blob);
      EXPECT_GE(padded, blob);
      EXPECT_LT(padded, blob + k * 64);
      EXPECT_EQ(padded % (k * 64), 0u);
      EXPECT_EQ(layout.chunk_bytes(blob) * k, padded);
      // Memory overhead: parity per node / padded blob == slots / k, i.e. p / (G - p) with parity.
      EXPECT_EQ(layout.parity_bytes_per_node(blob) * k, static_cast<size_t>(slots) * padded);

      std::set<std::pair<int, int>> chunks_seen;
      std::vector<int> parity_count(g, 0);
      for (int j = 0; j < g; ++j) {
        const auto& data = layout.stripe_data(j);
        const auto& holders = layout.stripe_parity_nodes(j);
        ASSERT_EQ(static_cast<int>(data.size()), k);
        ASSERT_EQ(static_cast<int>(holders.size()), slots);
        std::vector<int> nodes = layout.stripe_nodes(j);
        EXPECT_EQ(static_cast<int>(std::set<int>(nodes.begin(), nodes.end()).size()), k + slots)
            << "stripe " << j << " has a node twice: " << list(nodes);
        for (int i = 0; i < slots; ++i) {
          EXPECT_EQ(holders[i], mirror ? (j + 1 + i) % g : (j + i) % g) << "stripe " << j << " slot " << i;
          const int pos = layout.parity_position(j, i);
          ASSERT_LT(pos, static_cast<int>(layout.parity_held_by(holders[i]).size()));
          EXPECT_EQ(layout.parity_held_by(holders[i])[pos], std::make_pair(j, i));
          ++parity_count[holders[i]];
        }
        for (int f = 0; f < k; ++f) {
          if (f > 0) {
            EXPECT_LT(data[f - 1].node, data[f].node) << "stripe " << j << " data not in node order";
          }
          EXPECT_TRUE(data[f].chunk >= 0 && data[f].chunk < k);
          EXPECT_TRUE(chunks_seen.insert({data[f].node, data[f].chunk}).second)
              << "node " << data[f].node << " chunk " << data[f].chunk << " is in two stripes";
          // Chunks are handed out in stripe order: chunk c is in the c-th stripe the node is a data node of.
          int earlier = 0;
          for (int jj = 0; jj < j; ++jj) {
            for (const FragmentRef& r : layout.stripe_data(jj)) earlier += r.node == data[f].node;
          }
          EXPECT_EQ(data[f].chunk, earlier) << "stripe " << j << " node " << data[f].node;
        }
        if (mirror) {
          EXPECT_EQ(data[0], (FragmentRef{j, 0}));
        }
      }
      // Every chunk of every node is in exactly one stripe (k chunks per node; one, the whole blob, when mirroring).
      EXPECT_EQ(static_cast<int>(chunks_seen.size()), g * k);
      for (int n = 0; n < g; ++n) {
        EXPECT_EQ(parity_count[n], slots) << "node " << n;
        EXPECT_EQ(static_cast<int>(layout.parity_held_by(n).size()), slots) << "node " << n;
        std::vector<int> holders = layout.mirror_holders(n);
        if (mirror) {
          EXPECT_EQ(holders, layout.stripe_parity_nodes(n));
        } else {
          EXPECT_TRUE(holders.empty());
        }
      }
      // Any tolerated_losses() nodes are recoverable, one more never is.
      EXPECT_EQ(layout.tolerated_losses(), slots);
      for (const std::vector<int>& lost : subsets_up_to(g, g)) {
        EXPECT_EQ(layout.recoverable(lost), static_cast<int>(lost.size()) <= slots) << "lost " << list(lost);
      }
    }
  }
}

TEST(GroupLayout, InvalidArguments) {
  expect_error([] { GroupLayout(0, 1); }, ErrorKind::kConfig, "group size must be in [1, 255], got 0");
  expect_error([] { GroupLayout(256, 1); }, ErrorKind::kConfig, "got 256");
  expect_error([] { GroupLayout(4, -1); }, ErrorKind::kConfig, "parity count must be >= 0, got -1");
  GroupLayout layout(4, 1);
  expect_error([&] { layout.stripe_data(4); }, ErrorKind::kSnapshot, "stripe 4 is outside [0, 4)");
  expect_error([&] { layout.parity_position(0, 1); }, ErrorKind::kSnapshot, "parity slot 1 is outside [0, 1)");
  expect_error([&] { layout.parity_held_by(-1); }, ErrorKind::kSnapshot, "node -1 is outside the group");
  expect_error([&] { layout.recoverable({1, 1}); }, ErrorKind::kSnapshot, "lost node 1 is listed twice");
  expect_error([&] { layout.recoverable({4}); }, ErrorKind::kSnapshot, "lost node 4 is outside the group");
}

// ---- whole-group encode and rebuild ----------------------------------------------------------------------------

constexpr size_t kGuard = 64;
constexpr uint8_t kGuardByte = 0xC3;

struct Group {
  std::vector<Bytes> blobs;   // blob_bytes + kGuard each; the guard must never change
  std::vector<Bytes> parity;  // parity_bytes_per_node each
};

Group make_group(const GroupLayout& layout, size_t blob_bytes, uint64_t seed) {
  Group grp;
  for (int n = 0; n < layout.group_size(); ++n) {
    Bytes b = random_bytes(blob_bytes, seed, 10 + n);
    b.resize(blob_bytes + kGuard, kGuardByte);
    grp.blobs.push_back(std::move(b));
    grp.parity.emplace_back(layout.parity_bytes_per_node(blob_bytes), 0x77);
  }
  std::vector<uint8_t*> parity = pointers(grp.parity);
  std::vector<const uint8_t*> blobs = pointers(static_cast<const std::vector<Bytes>&>(grp.blobs));
  encode_group(layout, blob_bytes, blobs, parity);
  return grp;
}

// The parity areas encode_group must produce, computed stripe by stripe with the plain code on zero-padded copies.
void check_parity_areas(const GroupLayout& layout, size_t blob_bytes, const Group& grp, const std::string& what) {
  const size_t chunk = layout.chunk_bytes(blob_bytes);
  std::vector<Bytes> padded;
  for (const Bytes& b : grp.blobs) {
    Bytes p(b.begin(), b.begin() + blob_bytes);
    p.resize(layout.padded_blob_bytes(blob_bytes), 0);
    padded.push_back(std::move(p));
  }
  for (int j = 0; j < layout.group_size(); ++j) {
    std::vector<const uint8_t*> data;
    for (const FragmentRef& f : layout.stripe_data(j)) data.push_back(padded[f.node].data() + f.chunk * chunk);
    std::vector<Bytes> want(layout.parity_slots(), Bytes(chunk));
    std::vector<uint8_t*> want_ptr = pointers(want);
    if (layout.mirroring()) {
      for (Bytes& w : want) std::memcpy(w.data(), data[0], chunk);
    } else {
      plain::ReedSolomon(layout.k(), layout.parity_slots()).encode(chunk, data.data(), want_ptr.data());
    }
    for (int i = 0; i < layout.parity_slots(); ++i) {
      const int holder = layout.stripe_parity_nodes(j)[i];
      const uint8_t* got = grp.parity[holder].data() + layout.parity_position(j, i) * chunk;
      EXPECT_TRUE(bytes_equal(got, want[i].data(), chunk,
                              what + " stripe " + std::to_string(j) + " slot " + std::to_string(i)));
    }
  }
}

void check_rebuild_all_losses(int g, int p, size_t blob_bytes) {
  GroupLayout layout(g, p);
  const std::string config = "G=" + std::to_string(g) + " p=" + std::to_string(p) + " S=" + std::to_string(blob_bytes);
  const Group original = make_group(layout, blob_bytes, 31 * g + p);
  check_parity_areas(layout, blob_bytes, original, config);
  int cases = 0;
  for (const std::vector<int>& lost : subsets_up_to(g, layout.tolerated_losses())) {
    Group grp = original;
    for (int n : lost) {
      Bytes junk = random_bytes(blob_bytes, 999, n);
      std::copy(junk.begin(), junk.end(), grp.blobs[n].begin());
      std::fill(grp.parity[n].begin(), grp.parity[n].end(), static_cast<uint8_t>(0x3C + n));
    }
    rebuild_group(layout, blob_bytes, lost, pointers(grp.blobs), pointers(grp.parity));
    for (int n = 0; n < g; ++n) {
      const std::string where = config + " lost " + list(lost) + " node " + std::to_string(n);
      EXPECT_TRUE(bytes_equal(grp.blobs[n].data(), original.blobs[n].data(), blob_bytes + kGuard, where + " blob"));
      EXPECT_TRUE(
          bytes_equal(grp.parity[n].data(), original.parity[n].data(), grp.parity[n].size(), where + " parity area"));
    }
    ++cases;
  }
  EXPECT_GT(cases, 1) << config;
  // One loss more than tolerated is refused, and says why.
  if (layout.tolerated_losses() < g) {
    std::vector<int> too_many;
    for (int n = 0; n <= layout.tolerated_losses(); ++n) too_many.push_back(n);
    EXPECT_FALSE(layout.recoverable(too_many));
    Group grp = original;
    expect_error([&] { rebuild_group(layout, blob_bytes, too_many, pointers(grp.blobs), pointers(grp.parity)); },
                 ErrorKind::kSnapshot, "cannot rebuild lost nodes " + list(too_many));
  }
}

TEST(GroupCoding, RebuildEveryToleratedLoss) {
  // Blob sizes: odd (padded tail inside the last chunk), an exact multiple of k * 64, and tiny (whole chunks of
  // padding).
  for (size_t blob : {size_t{10007}, size_t{3 * 64 * 4}, size_t{5}}) {
    check_rebuild_all_losses(4, 1, blob);
    check_rebuild_all_losses(4, 2, blob);
    check_rebuild_all_losses(3, 1, blob);
    check_rebuild_all_losses(5, 3, blob);
    check_rebuild_all_losses(2, 1, blob);  // mirroring: each blob on the other node
    check_rebuild_all_losses(3, 4, blob);  // mirroring: each blob on both other nodes
  }
}

TEST(GroupCoding, UnprotectedGroups) {
  for (auto [g, p] : std::vector<std::pair<int, int>>{{4, 0}, {1, 0}, {1, 2}}) {
    GroupLayout layout(g, p);
    const size_t blob = 1000;
    EXPECT_EQ(layout.tolerated_losses(), 0);
    EXPECT_EQ(layout.parity_bytes_per_node(blob), 0u);
    Group grp = make_group(layout, blob, 3);
    rebuild_group(layout, blob, {}, pointers(grp.blobs), pointers(grp.parity));  // nothing lost: nothing to do
    EXPECT_FALSE(layout.recoverable({0}));
    expect_error([&] { rebuild_group(layout, blob, {0}, pointers(grp.blobs), pointers(grp.parity)); },
                 ErrorKind::kSnapshot, "tolerates 0 lost node(s)");
  }
}

TEST(GroupCoding, WrongBufferCount) {
  GroupLayout layout(4, 1);
  std::vector<const uint8_t*> blobs(3, nullptr);
  std::vector<uint8_t*> parity(3, nullptr);
  expect_error([&] { encode_group(layout, 100, blobs, parity); }, ErrorKind::kSnapshot,
               "expected 4 blobs and parity areas, got 3 and 3");
}

}  // namespace
}  // namespace loom::ec
