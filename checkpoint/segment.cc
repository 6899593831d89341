#include "checkpoint/segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sstream>

#include "checkpoint/crc.h"
#include "core/error.h"

namespace loom::snap {
namespace {

constexpr size_t kPage = 4096;
size_t round_page(size_t b) { return (b + kPage - 1) / kPage * kPage; }

}  // namespace

const char* buffer_state_name(BufferState s) {
  switch (s) {
    case BufferState::kEmpty: return "empty";
    case BufferState::kStaging: return "staging";
    case BufferState::kStaged: return "staged";
    case BufferState::kCommitted: return "committed";
  }
  return "?";
}

bool SegmentIdentity::same_as(const SegmentIdentity& o) const {
  return rank == o.rank && world_size == o.world_size && tp_rank == o.tp_rank && tp_size == o.tp_size &&
         dp_rank == o.dp_rank && dp_size == o.dp_size && slice_begin == o.slice_begin && slice_end == o.slice_end &&
         padded_numel == o.padded_numel && layout_hash == o.layout_hash && seed == o.seed;
}

std::string SegmentIdentity::describe() const {
  std::ostringstream os;
  os << "rank " << rank << "/" << world_size << " (tp " << tp_rank << "/" << tp_size << ", dp " << dp_rank << "/"
     << dp_size << "), slice [" << slice_begin << ", " << slice_end << ") of " << padded_numel << ", layout "
     << std::hex << layout_hash << std::dec;
  return os.str();
}

std::string segment_name(const std::string& job, int rank) {
  return "/loom-" + std::to_string(::getuid()) + "-" + job + "-r" + std::to_string(rank);
}

size_t SnapshotSegment::bytes_for(const SegmentIdentity& id) {
  return round_page(sizeof(SegmentHeader)) + kBuffers * round_page(id.buffer_bytes());
}

SnapshotSegment SnapshotSegment::create(const std::string& name, const SegmentIdentity& id) {
  const size_t bytes = bytes_for(id);
  ::shm_unlink(name.c_str());  // a stale object of an earlier, dead daemon
  int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  LOOM_CHECK(fd >= 0, kSnapshot, "cannot create shared memory '" << name << "': " << std::strerror(errno));
  if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    int e = errno;
    ::close(fd);
    ::shm_unlink(name.c_str());
    LOOM_THROW(kSnapshot, "cannot size shared memory '" << name << "' to " << bytes << " bytes: " << std::strerror(e));
  }
  void* base = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int e = errno;
  ::close(fd);
  if (base == MAP_FAILED) {
    ::shm_unlink(name.c_str());
    LOOM_THROW(kSnapshot, "cannot map shared memory '" << name << "' (" << bytes << " bytes): " << std::strerror(e));
  }
  SnapshotSegment s;
  s.name_ = name;
  s.base_ = base;
  s.size_ = bytes;
  SegmentHeader* h = s.header();
  std::memset(static_cast<void*>(h), 0, sizeof(SegmentHeader));
  h->format_version = 1;
  h->header_bytes = static_cast<uint32_t>(round_page(sizeof(SegmentHeader)));
  h->identity = id;
  h->buffer_stride = round_page(id.buffer_bytes());
  for (int i = 0; i < kBuffers; ++i) {
    h->buffers[i].state.store(static_cast<uint32_t>(BufferState::kEmpty));
    h->buffers[i].version = -1;
  }
  std::atomic_thread_fence(std::memory_order_release);
  h->magic = kSegmentMagic;
  return s;
}

SnapshotSegment SnapshotSegment::open(const std::string& name) {
  int fd = ::shm_open(name.c_str(), O_RDWR, 0600);
  LOOM_CHECK(fd >= 0, kSnapshot, "no snapshot memory '" << name << "': " << std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) < sizeof(SegmentHeader)) {
    ::close(fd);
    LOOM_THROW(kSnapshot, "snapshot memory '" << name << "' is too small to hold a header");
  }
  const size_t bytes = static_cast<size_t>(st.st_size);
  void* base = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int e = errno;
  ::close(fd);
  LOOM_CHECK(base != MAP_FAILED, kSnapshot, "cannot map snapshot memory '" << name << "': " << std::strerror(e));
  SnapshotSegment s;
  s.name_ = name;
  s.base_ = base;
  s.size_ = bytes;
  const SegmentHeader* h = s.header();
  LOOM_CHECK(h->magic == kSegmentMagic && h->format_version == 1, kSnapshot,
             "snapshot memory '" << name << "' has no valid Loom header");
  LOOM_CHECK(bytes >= bytes_for(h->identity), kSnapshot,
             "snapshot memory '" << name << "' is " << bytes << " bytes, its header needs " << bytes_for(h->identity));
  return s;
}

void SnapshotSegment::unlink(const std::string& name) { ::shm_unlink(name.c_str()); }

SnapshotSegment::SnapshotSegment(SnapshotSegment&& o) noexcept : name_(std::move(o.name_)), base_(o.base_), size_(o.size_) {
  o.base_ = nullptr;
  o.size_ = 0;
}

SnapshotSegment& SnapshotSegment::operator=(SnapshotSegment&& o) noexcept {
  if (this != &o) {
    if (base_) ::munmap(base_, size_);
    name_ = std::move(o.name_);
    base_ = o.base_;
    size_ = o.size_;
    o.base_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

SnapshotSegment::~SnapshotSegment() {
  if (base_) ::munmap(base_, size_);
}

float* SnapshotSegment::buffer_data(int i) const {
  char* p = static_cast<char*>(base_) + header()->header_bytes + static_cast<size_t>(i) * header()->buffer_stride;
  return reinterpret_cast<float*>(p);
}

int SnapshotSegment::begin_staging(int64_t version) {
  // Keep the two newest restorable versions; stage over anything else (oldest first).
  int target = -1;
  int64_t oldest = INT64_MAX;
  std::vector<std::pair<int64_t, int>> keep = restorable();
  for (int i = 0; i < kBuffers; ++i) {
    bool kept = false;
    for (size_t k = 0; k < keep.size() && k < 2; ++k) kept = kept || keep[k].second == i;
    if (kept) continue;
    const BufferHeader& b = buffer_header(i);
    const auto st = static_cast<BufferState>(b.state.load());
    const int64_t v = (st == BufferState::kStaged || st == BufferState::kCommitted) ? b.version : INT64_MIN;
    if (target < 0 || v < oldest) {
      target = i;
      oldest = v;
    }
  }
  LOOM_ASSERT(target >= 0);
  BufferHeader& b = buffer_header(target);
  b.state.store(static_cast<uint32_t>(BufferState::kStaging), std::memory_order_release);
  b.version = version;
  b.bytes = identity().buffer_bytes();
  b.crc = 0;
  return target;
}

void SnapshotSegment::mark_staged(int buffer) {
  std::atomic_thread_fence(std::memory_order_release);
  buffer_header(buffer).state.store(static_cast<uint32_t>(BufferState::kStaged), std::memory_order_release);
}

uint32_t SnapshotSegment::compute_crc(int buffer) const {
  return crc32(buffer_data(buffer), buffer_header(buffer).bytes);
}

bool SnapshotSegment::commit(int buffer) {
  BufferHeader& b = buffer_header(buffer);
  if (static_cast<BufferState>(b.state.load(std::memory_order_acquire)) != BufferState::kStaged) return false;
  b.crc = compute_crc(buffer);
  b.state.store(static_cast<uint32_t>(BufferState::kCommitted), std::memory_order_release);
  return true;
}

std::vector<std::pair<int64_t, int>> SnapshotSegment::restorable() const {
  std::vector<std::pair<int64_t, int>> out;
  for (int i = 0; i < kBuffers; ++i) {
    const BufferHeader& b = buffer_header(i);
    const auto st = static_cast<BufferState>(b.state.load(std::memory_order_acquire));
    if (st == BufferState::kStaged || st == BufferState::kCommitted) out.emplace_back(b.version, i);
  }
  std::sort(out.begin(), out.end(), [](auto& a, auto& b) { return a.first > b.first; });
  return out;
}

bool SnapshotSegment::verify(int buffer) const {
  const BufferHeader& b = buffer_header(buffer);
  if (static_cast<BufferState>(b.state.load(std::memory_order_acquire)) != BufferState::kCommitted) return false;
  return compute_crc(buffer) == b.crc;
}

}  // namespace loom::snap
