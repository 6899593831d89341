#include "parallel/link_trace.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "core/log.h"
#include "parallel/trace.h"

namespace loom {

void LinkTrace::record(int src, double transfer_s, uint64_t bytes, bool probe) {
  std::lock_guard<std::mutex> lock(mutex_);
  LinkStats& s = (probe ? probe_stats_ : stats_)[src];
  s.src = src;
  s.transfers += 1;
  s.bytes += bytes;
  s.sum_s += transfer_s;
  s.max_s = std::max(s.max_s, transfer_s);
}

namespace {
std::vector<LinkStats> drain(std::map<int, LinkStats>& stats) {
  std::vector<LinkStats> out;
  out.reserve(stats.size());
  for (auto& [src, s] : stats) out.push_back(s);
  stats.clear();
  return out;
}
}  // namespace

std::vector<LinkStats> LinkTrace::take() {
  std::lock_guard<std::mutex> lock(mutex_);
  return drain(stats_);
}

std::vector<LinkStats> LinkTrace::take_probes() {
  std::lock_guard<std::mutex> lock(mutex_);
  return drain(probe_stats_);
}

void LinkTrace::begin_transfer(uint32_t group_id, uint64_t seq, int step, int recv_src, int send_dst) {
  std::lock_guard<std::mutex> lock(mutex_);
  state_ = TransferState{true, group_id, seq, step, recv_src, send_dst, false, wall_clock_s()};
}

void LinkTrace::recv_done() {
  std::lock_guard<std::mutex> lock(mutex_);
  state_.recv_done = true;
}

void LinkTrace::end_transfer() {
  std::lock_guard<std::mutex> lock(mutex_);
  state_.active = false;
}

TransferState LinkTrace::state() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return state_;
}

LinkTrace& process_link_trace() {
  static LinkTrace t;
  return t;
}

void CommFaults::set_slow_link(int dst, double delay_s) {
  slow_delay_s_.store(delay_s);
  slow_dst_.store(delay_s > 0 ? dst : -1);
}

void CommFaults::hang_forever(int dst) {
  LOOM_WARN("fault injection: the transfer to rank " << dst << " hangs inside a collective");
  process_link_trace().recv_done();
  for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
}

void CommFaults::sleep_for_slow_link() {
  std::this_thread::sleep_for(std::chrono::duration<double>(slow_delay_s_.load(std::memory_order_relaxed)));
}

CommFaults& process_comm_faults() {
  static CommFaults f;
  return f;
}

namespace detail {
std::mutex& trace_registry_mutex() {
  static std::mutex m;
  return m;
}
std::vector<const TraceRing*>& trace_registry() {
  static std::vector<const TraceRing*> rings;
  return rings;
}
}  // namespace detail

void register_trace_ring(const TraceRing* ring) {
  std::lock_guard<std::mutex> lock(detail::trace_registry_mutex());
  detail::trace_registry().push_back(ring);
}

void unregister_trace_ring(const TraceRing* ring) {
  std::lock_guard<std::mutex> lock(detail::trace_registry_mutex());
  auto& v = detail::trace_registry();
  v.erase(std::remove(v.begin(), v.end(), ring), v.end());
}

}  // namespace loom
