#include "parallel/trace.h"

#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <string>

#include "core/error.h"
#include "core/log.h"
#include "parallel/link_trace.h"

namespace loom {

const char* collective_op_name(CollectiveOp op) {
  switch (op) {
    case CollectiveOp::kAllReduce: return "all_reduce";
    case CollectiveOp::kReduceScatter: return "reduce_scatter";
    case CollectiveOp::kAllGather: return "all_gather";
    case CollectiveOp::kBroadcast: return "broadcast";
    case CollectiveOp::kSend: return "send";
    case CollectiveOp::kRecv: return "recv";
    case CollectiveOp::kBarrier: return "barrier";
  }
  return "?";
}

double trace_clock_s() {
  return log::uptime_s();
}

double wall_clock_s() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

namespace {

// The second field of a schedstat file (run-queue delay, ns), or -1.
double read_run_delay(int fd) {
  if (fd < 0) return -1;
  char buf[128];
  const ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
  if (n <= 0) return -1;
  buf[n] = 0;
  char* end = nullptr;
  std::strtoull(buf, &end, 10);  // time on a CPU
  char* after = nullptr;
  const unsigned long long delay = std::strtoull(end, &after, 10);
  return after == end ? -1 : static_cast<double>(delay) * 1e-9;
}

std::atomic<bool> g_run_delay_accounting{false};

// The calling thread's kernel id (read once per thread).
int this_tid() {
  thread_local const int tid = static_cast<int>(::syscall(SYS_gettid));
  return tid;
}

}  // namespace

double thread_run_delay_s() {
  // Opened once per thread and kept: the schedstat file of the thread that opened it.
  struct Fd {
    int fd = ::open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
    ~Fd() {
      if (fd >= 0) ::close(fd);
    }
  };
  thread_local Fd f;
  return read_run_delay(f.fd);
}

double thread_run_delay_s(int tid) {
  const std::string path = "/proc/self/task/" + std::to_string(tid) + "/schedstat";
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  const double d = read_run_delay(fd);
  if (fd >= 0) ::close(fd);
  return d;
}

void set_run_delay_accounting(bool on) {
  g_run_delay_accounting.store(on, std::memory_order_relaxed);
}

bool run_delay_accounting() {
  return g_run_delay_accounting.load(std::memory_order_relaxed);
}

TraceRing::TraceRing(size_t capacity) {
  LOOM_CHECK(capacity > 0, kConfig, "trace ring capacity must be positive, got " << capacity);
  records_.resize(capacity);
  register_trace_ring(this);
}

TraceRing::~TraceRing() {
  unregister_trace_ring(this);
}

uint64_t TraceRing::begin(CollectiveOp op, uint32_t group_id, int32_t peer, uint64_t bytes, bool side) {
  const double run_delay = run_delay_accounting() ? thread_run_delay_s() : -1;
  double now = trace_clock_s();
  std::lock_guard<std::mutex> lock(mutex_);
  uint64_t seq = launched_.load(std::memory_order_relaxed);
  records_[seq % records_.size()] = TraceRecord{seq, op, group_id, peer, bytes, now, 0.0, side};
  if (side) side_launched_.fetch_add(1, std::memory_order_release);
  launched_.store(seq + 1, std::memory_order_release);
  open_seq_ = seq;
  open_run_delay_ = run_delay;
  open_tid_ = this_tid();
  if (device_timed_) {  // the beginning thread is the writer; it never waits inside these calls
    const int writer = writer_tid_.load(std::memory_order_relaxed);
    if (writer != -1) writer_tid_.store(writer == 0 || writer == open_tid_ ? open_tid_ : -1, std::memory_order_release);
  }
  return seq;
}

void TraceRing::set_device_timed(bool on) {
  std::lock_guard<std::mutex> lock(mutex_);
  device_timed_ = on;
}

void TraceRing::end(uint64_t seq) {
  finish(seq, -1, trace_clock_s(), true);
}

void TraceRing::end(uint64_t seq, double end_s) {
  finish(seq, -1, end_s, false);
}

void TraceRing::end(uint64_t seq, double start_s, double end_s) {
  finish(seq, start_s, end_s, false);
}

void TraceRing::finish(uint64_t seq, double start_s, double end_s, bool host_timed) {
  std::lock_guard<std::mutex> lock(mutex_);
  uint64_t launched = launched_.load(std::memory_order_relaxed);
  LOOM_CHECK(seq < launched, kInternal, "trace: end() of record " << seq << ", but only " << launched << " began");
  TraceRecord& r = records_[seq % records_.size()];
  if (r.seq == seq) {
    LOOM_CHECK(r.end_s == 0, kInternal, "trace: record " << seq << " ended twice");
    if (start_s > r.start_s) r.start_s = start_s;
    // A record must not end before it started, even if a backend hands in a time from a coarser clock.
    r.end_s = end_s > r.start_s ? end_s : r.start_s;
    busy_s_.store(busy_s_.load(std::memory_order_relaxed) + (r.end_s - r.start_s), std::memory_order_release);
    if (r.side) side_completed_.fetch_add(1, std::memory_order_release);
  }
  completed_.fetch_add(1, std::memory_order_release);
  // The writer: the one thread that begins and ends the host-timed calls (known with or without accounting). A
  // ring used by two threads has no writer (-1), and the monitor client then reports no run-queue figure for the
  // rank. Run-queue delay: only for a call whose begin() read the counter (accounting may be switched on and off
  // in between), ended on the thread that began it (the counters of two threads do not subtract).
  const int writer = writer_tid_.load(std::memory_order_relaxed);
  if (host_timed && open_seq_ == seq && writer != -1) {
    const int tid = this_tid();
    bool ok = open_tid_ == tid && (writer == 0 || writer == tid);
    if (ok && open_run_delay_ >= 0) {
      const double run_delay = thread_run_delay_s();
      ok = run_delay >= open_run_delay_;  // else a failed read
      if (ok)
        run_delay_inside_s_.store(run_delay_inside_s_.load(std::memory_order_relaxed) + (run_delay - open_run_delay_),
                                  std::memory_order_release);
    }
    writer_tid_.store(ok ? tid : -1, std::memory_order_release);
  }
  if (open_seq_ == seq) open_run_delay_ = -1;
}

std::vector<TraceRecord> TraceRing::snapshot(uint64_t since_seq) const {
  std::lock_guard<std::mutex> lock(mutex_);
  uint64_t launched = launched_.load(std::memory_order_relaxed);
  uint64_t oldest = launched > records_.size() ? launched - records_.size() : 0;
  uint64_t first = since_seq > oldest ? since_seq : oldest;
  std::vector<TraceRecord> out;
  if (first >= launched) return out;
  out.reserve(static_cast<size_t>(launched - first));
  for (uint64_t s = first; s < launched; ++s) out.push_back(records_[s % records_.size()]);
  return out;
}

}  // namespace loom
