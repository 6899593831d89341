#include "parallel/link_probe.h"

#include <algorithm>

#include "core/error.h"
#include "parallel/link_trace.h"

namespace loom {

int LinkProbe::cycle_rounds(int n) {
  if (n < 2) return 1;
  if (n <= kAllPairsMax) return n % 2 == 0 ? n - 1 : n;  // circle method over n (+1 idle seat when odd)
  return n % 2 == 0 ? 2 : 3;                            // colours of the ring's edges
}

std::vector<std::pair<int, int>> LinkProbe::pairs(int n, int64_t round) {
  std::vector<std::pair<int, int>> out;
  if (n < 2) return out;
  const int k = static_cast<int>(round % cycle_rounds(n));
  auto add = [&](int a, int b) {
    if (a == b || a >= n || b >= n) return;  // the idle seat of an odd group
    out.emplace_back(std::min(a, b), std::max(a, b));
  };
  if (n <= kAllPairsMax) {
    // Seat m-1 stays, the others rotate: over m-1 rounds every two seats face each other once.
    const int m = n + n % 2;
    add(m - 1, k);
    for (int i = 1; i < m / 2; ++i) add((k + i) % (m - 1), (k - i + (m - 1)) % (m - 1));
  } else {
    // Ring edge (i, i+1 mod n) has colour i % 2, except the closing edge of an odd ring, colour 2.
    for (int i = 0; i < n; ++i) {
      const int colour = (n % 2 == 1 && i == n - 1) ? 2 : i % 2;
      if (colour == k) add(i, (i + 1) % n);
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

LinkProbe::LinkProbe(Communicator& comm, Backend& backend, LinkProbeOptions opt)
    : comm_(comm), backend_(backend), opt_(opt) {
  LOOM_CHECK(backend.device() == comm.device(), kInternal,
             "link probe on '" << comm.name() << "': the backend's device differs from the communicator's");
  LOOM_CHECK(opt_.bytes >= 4 && opt_.rounds >= 0, kConfig,
             "link probe: bytes must be >= 4 and rounds >= 0 (got " << opt_.bytes << ", " << opt_.rounds << ")");
  const int64_t elems = opt_.bytes / 4;
  buffer_ = backend_.allocate(static_cast<size_t>(elems + 1) * 4);
  const Tensor all(buffer_, Shape{elems + 1}, DType::kF32, backend_.device());
  backend_.fill(all, 0.0f);
  token_ = Tensor(buffer_, Shape{1}, DType::kF32, backend_.device());
  data_ = Tensor(static_cast<char*>(buffer_) + 4, Shape{elems}, DType::kF32, backend_.device());
}

LinkProbe::~LinkProbe() {
  // A device probe may still be using the buffer: the CUDA backend's deallocate (cudaFree) waits for the device.
  backend_.deallocate(buffer_);
}

void LinkProbe::send_to(int peer) {
  comm_.send(token_, peer);
  comm_.send(data_, peer);
}

void LinkProbe::recv_from(int peer) {
  std::unique_ptr<TransferTimer> timer;
  if (free_.empty()) {
    timer = comm_.make_transfer_timer();
  } else {
    timer = std::move(free_.back());
    free_.pop_back();
  }
  comm_.recv(token_, peer);
  timer->start();
  comm_.recv(data_, peer);
  timer->stop();
  pending_.push_back({comm_.world_rank(peer), std::move(timer)});
  // A stream that never gets there (a stalled device): the oldest timings are given up rather than piling up.
  if (pending_.size() > kMaxPending) pending_.pop_front();
}

void LinkProbe::run() {
  const Communicator::SideTraffic side(comm_);
  const int me = comm_.rank();
  const int rounds = opt_.rounds > 0 ? opt_.rounds : cycle_rounds(comm_.size());
  for (int r = 0; r < rounds; ++r) {
    for (const auto& [lo, hi] : pairs(comm_.size(), next_round_)) {
      if (me == lo) {
        send_to(hi);
        recv_from(hi);
      } else if (me == hi) {
        recv_from(lo);
        send_to(lo);
      }
    }
    ++next_round_;
  }
  collect();
}

void LinkProbe::collect() {
  while (!pending_.empty()) {
    const std::optional<double> s = pending_.front().timer->seconds();
    if (!s) break;
    process_link_trace().record(pending_.front().src, *s, static_cast<uint64_t>(data_.nbytes()), true);
    free_.push_back(std::move(pending_.front().timer));
    pending_.pop_front();
  }
}

bool link_probe_wanted(const std::string& mode, const Communicator& comm) {
  if (comm.size() < 2 || mode == "off") return false;
  if (mode == "on") return true;
  LOOM_CHECK(mode == "auto", kConfig, "monitor.link_probe must be auto, on or off, got '" << mode << "'");
  return !comm.traces_links();
}

}  // namespace loom
