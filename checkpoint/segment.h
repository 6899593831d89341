// SnapshotSegment: one rank's snapshot memory, a POSIX shared-memory object owned by the node's snapshot daemon
// and mapped by the trainer. It outlives trainer crashes (the daemon holds it), so a restarted trainer finds its
// last snapshots where it left them.
//
// Layout (all offsets 4 KiB aligned):
//   [SegmentHeader][buffer 0][buffer 1][buffer 2]
// Each buffer holds one staged version of the rank's data-parallel slice of the arena's master, Adam m and Adam v
// regions (3 x slice_floats f32, in that order). Three buffers, not two: while rank A already stages v+2 over its
// oldest buffer, a rank B that dies before finishing v+1 must still find a version that every rank has; the rule
// "staging of v completes before the optimizer of step v+1" plus the step's collectives bound how far ranks drift,
// and three buffers always leave a common version (docs/snapshots.md has the argument).
//
// Buffer states move empty -> staging (trainer copying) -> staged (copy complete; written by the trainer) ->
// committed (CRC computed and recorded by the daemon). Only staged and committed buffers are restorable; a
// buffer caught in `staging` by a crash is garbage and is never used.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace loom::snap {

inline constexpr int kBuffers = 3;
inline constexpr uint64_t kSegmentMagic = 0x314745534d4f4f4cull;  // "LOOMSEG1"

enum class BufferState : uint32_t { kEmpty = 0, kStaging = 1, kStaged = 2, kCommitted = 3 };
const char* buffer_state_name(BufferState s);

struct BufferHeader {
  std::atomic<uint32_t> state;  // BufferState
  uint32_t crc;                 // CRC-32 of the buffer's bytes, valid when committed
  int64_t version;              // the optimizer step this state is after
  uint64_t bytes;               // bytes of data in the buffer
  uint64_t reserved[4];
};

// Fixed at creation; a restarted trainer must match it to re-attach.
struct SegmentIdentity {
  int32_t rank = 0, world_size = 1, tp_rank = 0, tp_size = 1, dp_rank = 0, dp_size = 1;
  int64_t slice_begin = 0, slice_end = 0;  // element range of each arena region
  int64_t padded_numel = 0;
  uint64_t layout_hash = 0;
  uint64_t seed = 0;
  uint64_t slice_floats() const { return static_cast<uint64_t>(slice_end - slice_begin); }
  uint64_t buffer_bytes() const { return 3 * slice_floats() * sizeof(float); }
  bool same_as(const SegmentIdentity& o) const;
  std::string describe() const;
};

struct SegmentHeader {
  uint64_t magic;
  uint32_t format_version;
  uint32_t header_bytes;
  SegmentIdentity identity;
  uint64_t buffer_stride;  // bytes between buffers (>= identity.buffer_bytes(), 4 KiB multiple)
  BufferHeader buffers[kBuffers];
};

class SnapshotSegment {
 public:
  // Creates (daemon) the shared-memory object `name` ("/loom-...") sized for `id`, mode 0600. Throws kSnapshot
  // when it cannot (the message names the size and errno).
  static SnapshotSegment create(const std::string& name, const SegmentIdentity& id);
  // Maps an existing segment (trainer, or daemon after its own restart); validates magic and sizes.
  static SnapshotSegment open(const std::string& name);
  static size_t bytes_for(const SegmentIdentity& id);
  // Removes the shared-memory name (the mapping stays valid until unmapped).
  static void unlink(const std::string& name);

  SnapshotSegment(SnapshotSegment&& o) noexcept;
  SnapshotSegment& operator=(SnapshotSegment&& o) noexcept;
  SnapshotSegment(const SnapshotSegment&) = delete;
  SnapshotSegment& operator=(const SnapshotSegment&) = delete;
  ~SnapshotSegment();

  const std::string& name() const { return name_; }
  const SegmentIdentity& identity() const { return header()->identity; }
  SegmentHeader* header() const { return static_cast<SegmentHeader*>(base_); }
  BufferHeader& buffer_header(int i) const { return header()->buffers[i]; }
  // Data of buffer i: master, adam_m, adam_v slices back to back.
  float* buffer_data(int i) const;
  void* base() const { return base_; }
  size_t size() const { return size_; }

  // Trainer side. The buffer to stage `version` into: the one not holding either of the two newest staged or
  // committed versions (never the newest, which may be all that another rank can fall back to).
  int begin_staging(int64_t version);
  void mark_staged(int buffer);  // after the copy is complete
  // Daemon side: computes the CRC of a staged buffer and commits it. Returns false (and leaves the state) when
  // the buffer is not staged.
  bool commit(int buffer);
  // Restorable versions (staged or committed), newest first, with their buffer index.
  std::vector<std::pair<int64_t, int>> restorable() const;
  // Recomputes the CRC of a committed buffer and compares it with the recorded one.
  bool verify(int buffer) const;
  uint32_t compute_crc(int buffer) const;

 private:
  SnapshotSegment() = default;
  std::string name_;
  void* base_ = nullptr;
  size_t size_ = 0;
};

// The job's shared-memory object for a rank.
std::string segment_name(const std::string& job, int rank);

}  // namespace loom::snap
