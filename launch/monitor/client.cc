#include "launch/monitor/client.h"

#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>
#include <algorithm>
#include <chrono>
#include <map>

#include "core/error.h"
#include "core/log.h"
#include "launch/monitor/protocol.h"

namespace loom::mon {

using boost::asio::ip::tcp;

RunQueueMeter::Mode RunQueueMeter::parse(const std::string& mode) {
  if (mode == "auto") return Mode::kAuto;
  if (mode == "on") return Mode::kOn;
  if (mode == "off") return Mode::kOff;
  LOOM_THROW(kConfig, "monitor.run_queue must be auto, on or off, got '" << mode << "'");
}

RunQueueMeter::RunQueueMeter(Mode mode) : mode_(mode), accounting_(mode != Mode::kOff) {}

std::optional<double> RunQueueMeter::update(const std::vector<Writer>& writers, double interval_s,
                                            bool mixed_writers) {
  if (mode_ == Mode::kOff) return std::nullopt;
  bool ok = !writers.empty() && !mixed_writers;
  double share = -1;  // the largest share of the interval a writer waited for a CPU (-1: none measured)
  for (const Writer& w : writers) {
    if (w.total_s < 0) {
      ok = false;
      continue;
    }
    auto it = last_.find(w.tid);
    if (it == last_.end()) {
      // First sight: the thread's outside wait so far is the origin (what it waited before this job's first
      // window; the engine uses differences only, and a positive origin keeps the sum from dipping below 0).
      outside_s_ += std::max(0.0, w.total_s - w.inside_s);
    } else {
      const double grew = w.total_s - it->second.total_s;
      // A collective open at the last heartbeat brings its whole inside wait into this one: a window may go
      // negative; the sum stays right.
      outside_s_ += grew - (w.inside_s - it->second.inside_s);
      if (interval_s > 0) share = std::max(share, grew / interval_s);
    }
    last_[w.tid] = w;
  }
  if (mode_ == Mode::kAuto && share >= 0) {
    if (share > kOnShare) accounting_ = true;
    else if (share < kOffShare) accounting_ = false;
  }
  if (!ok) return std::nullopt;
  return outside_s_;
}

MonitorClient::MonitorClient(ClientOptions options) : opt_(std::move(options)) {
  LOOM_CHECK(opt_.address.rfind(':') != std::string::npos, kConfig,
             "monitor address '" << opt_.address << "' is not host:port");
  LOOM_CHECK(opt_.heartbeat_s > 0, kConfig, "monitor.heartbeat_s must be positive, got " << opt_.heartbeat_s);
  set_run_delay_accounting(opt_.run_queue != RunQueueMeter::Mode::kOff);  // the heartbeat's runq_s
  thread_ = std::thread([this] {
    ::pthread_setname_np(::pthread_self(), "loom-monitor");  // how top -H, gdb and the benchmark find it
    run();
  });
}

MonitorClient::~MonitorClient() {
  stop();
}

void MonitorClient::set_progress(int64_t step, double loss, double tokens_per_s) {
  step_.store(step, std::memory_order_relaxed);
  loss_.store(loss, std::memory_order_relaxed);
  tokens_per_s_.store(tokens_per_s, std::memory_order_relaxed);
}

void MonitorClient::stop(const std::string& reason, const std::string& message) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    bye_reason_ = reason;
    bye_message_ = message;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void MonitorClient::run() {
  const size_t colon = opt_.address.rfind(':');
  const std::string host = opt_.address.substr(0, colon), port = opt_.address.substr(colon + 1);
  char hostname[256] = {0};
  ::gethostname(hostname, sizeof hostname - 1);
  boost::asio::io_context io;
  tcp::socket sock(io);
  std::map<const void*, uint64_t> sent_until;  // per trace ring: the next seq to ship
  bool warned = false;
  RunQueueMeter runq(opt_.run_queue);
  double last_beat = -1;
  auto base = [&](MonType t) {
    MonMessage m(t);
    m.set("job", opt_.job).set("token", opt_.token).set("epoch", opt_.epoch).set("rank", opt_.rank);
    return m;
  };
  auto send = [&](const MonMessage& m) {
    boost::system::error_code ec;
    boost::asio::write(sock, boost::asio::buffer(encode_frame(m)), ec);
    if (ec) {
      connected_.store(false);
      sock.close(ec);
    }
  };
  auto heartbeat = [&] {
    uint64_t launched = 0, completed = 0, side_open = 0;
    double busy = 0;
    std::map<int, double> inside;  // writer thread -> its run-queue delay inside collectives (so far)
    bool mixed_writers = false;
    std::vector<TraceRecord> done;
    for_each_trace_ring([&](const TraceRing& ring) {
      // Side traffic (the link probe) is not the same on every rank; the monitor compares these counts.
      launched += ring.launched() - ring.side_launched();
      completed += ring.completed() - ring.side_completed();
      side_open += ring.side_launched() - ring.side_completed();
      busy += ring.busy_s();
      if (ring.writer_tid() == -1) mixed_writers = true;
      if (ring.writer_tid() > 0) inside[ring.writer_tid()] += ring.run_delay_inside_s();
      uint64_t& next = sent_until[&ring];
      for (const TraceRecord& r : ring.snapshot(next)) {
        if (r.end_s == 0) break;  // in flight: shipped once it completes
        if (!r.side) done.push_back(r);
        next = r.seq + 1;
      }
    });
    MonMessage hb = base(MonType::kHeartbeat);
    hb.set("step", step_.load()).set("start", start_step_.load()).set("snapshot", snapshot_.load()).set_f("loss", loss_.load());
    hb.set_f("tokens_per_s", tokens_per_s_.load());
    hb.set("launched", static_cast<int64_t>(launched)).set("completed", static_cast<int64_t>(completed));
    hb.set("side_open", static_cast<int64_t>(side_open));  // inside side traffic (a probe) now
    // busy_s and wall_s on the trace clock (both differences matter, not the origin).
    hb.set_f("busy_s", busy).set_f("wall_s", trace_clock_s());
    // runq_s: how long the threads that issue collectives waited for a CPU outside them (RunQueueMeter).
    std::vector<RunQueueMeter::Writer> writers;
    if (opt_.run_queue != RunQueueMeter::Mode::kOff)
      for (const auto& [tid, in] : inside) writers.push_back({tid, thread_run_delay_s(tid), in});
    const double now = trace_clock_s();
    const std::optional<double> runq_s = runq.update(writers, last_beat < 0 ? 0 : now - last_beat, mixed_writers);
    last_beat = now;
    if (runq.accounting() != run_delay_accounting())
      LOOM_DEBUG("monitor: run-queue reads around each collective " << (runq.accounting() ? "on" : "off"));
    set_run_delay_accounting(runq.accounting());
    if (runq_s) hb.set_f("runq_s", *runq_s);
    hb.set("xfer", encode_transfer(process_link_trace().state()));
    hb.set("links", encode_links(process_link_trace().take()));
    hb.set("probes", encode_links(process_link_trace().take_probes()));
    send(hb);
    // At most kMaxRecords newest records per heartbeat: the monitor needs the recent timing, not every call of
    // a job that runs thousands of collectives a second (shipping them all cost ~3 % of a small model's step).
    constexpr size_t kMaxRecords = 256;
    bool truncated = false;
    if (done.size() > kMaxRecords) {
      std::sort(done.begin(), done.end(), [](const TraceRecord& a, const TraceRecord& b) { return a.end_s < b.end_s; });
      done.erase(done.begin(), done.end() - static_cast<std::ptrdiff_t>(kMaxRecords));
      truncated = true;
    }
    if (!done.empty()) {
      // Trace times go out on the wall clock.
      const double offset = wall_clock_s() - trace_clock_s();
      for (TraceRecord& r : done) {
        r.start_s += offset;
        r.end_s += offset;
      }
      MonMessage tr = base(MonType::kTrace);
      tr.set("recs", encode_records(done)).set("truncated", truncated ? 1 : 0);
      send(tr);
    }
  };
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    if (!connected_.load()) {
      lock.unlock();
      boost::system::error_code ec;
      tcp::resolver resolver(io);
      auto eps = resolver.resolve(host, port, ec);
      if (!ec) boost::asio::connect(sock, eps, ec);
      if (!ec) {
        sock.set_option(tcp::no_delay(true), ec);
        // Children (the snapshot daemon this rank may start) must not inherit the socket: the monitor learns
        // of this process's death from the connection closing, which an inherited copy would prevent.
        ::fcntl(sock.native_handle(), F_SETFD, FD_CLOEXEC);
        MonMessage hello = base(MonType::kHello);
        hello.set("node", opt_.node).set("host", hostname).set("pid", static_cast<int64_t>(::getpid()));
        hello.set("tp_rank", opt_.tp_rank).set("dp_rank", opt_.dp_rank);
        hello.set("world", opt_.world).set("local_size", opt_.local_size);
        connected_.store(true);
        send(hello);
      } else if (!warned) {
        LOOM_WARN("monitor at " << opt_.address << " not reachable (" << ec.message() << "); retrying");
        warned = true;
      }
      lock.lock();
    }
    if (connected_.load()) {
      lock.unlock();
      heartbeat();
      lock.lock();
    }
    cv_.wait_for(lock, std::chrono::duration<double>(opt_.heartbeat_s), [&] { return stopping_; });
  }
  if (connected_.load()) {
    lock.unlock();
    heartbeat();
    MonMessage bye = base(MonType::kBye);
    bye.set("reason", bye_reason_);
    std::string msg = bye_message_;
    for (char& ch : msg)
      if (ch == '\n') ch = ' ';
    bye.set("message", msg.substr(0, 2000));
    send(bye);
    boost::system::error_code ec;
    sock.shutdown(tcp::socket::shutdown_both, ec);
    sock.close(ec);
  }
  // Nobody reads the run-queue figures any more: collectives after this need not pay for the reads.
  set_run_delay_accounting(false);
}

}  // namespace loom::mon
