#include "launch/monitor/server.h"

#include <array>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/streambuf.hpp>
#include <boost/asio/write.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/log.h"
#include "launch/monitor/json.h"

namespace loom::mon {

using boost::asio::ip::tcp;

struct MonitorServer::Impl {
  boost::asio::io_context io;
  tcp::acceptor acceptor{io};
  boost::asio::steady_timer timer{io};
};

// One peer connection: either a rank's frame stream or one HTTP request.
class MonitorServer::Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(MonitorServer& s, tcp::socket sock) : server_(s), sock_(std::move(sock)) {}
  void start() {
    auto self = shared_from_this();
    boost::asio::async_read(sock_, boost::asio::buffer(head_.data(), 4), [self](auto ec, size_t) {
      if (ec) return;
      if (!std::memcmp(self->head_.data(), "GET ", 4) || !std::memcmp(self->head_.data(), "HEAD", 4))
        self->read_http();
      else
        self->read_header_rest();
    });
  }
  int rank = -1;
  int64_t epoch = -1;

 private:
  void read_header_rest() {
    auto self = shared_from_this();
    boost::asio::async_read(sock_, boost::asio::buffer(head_.data() + 4, kMonHeaderBytes - 4), [self](auto ec, size_t) {
      if (ec) return self->closed();
      std::string why;
      auto h = decode_header(self->head_.data(), &why);
      if (!h) return self->refuse_malformed(why);
      self->payload_.assign(h->payload_bytes, '\0');
      self->type_ = h->type;
      boost::asio::async_read(self->sock_, boost::asio::buffer(self->payload_.data(), self->payload_.size()),
                              [self](auto ec2, size_t) {
                                if (ec2) return self->closed();
                                std::string why2;
                                auto m = decode_payload(self->type_, self->payload_, &why2);
                                if (!m) return self->refuse_malformed(why2);
                                if (!self->server_.handle(*self, *m)) return self->drop();
                                self->next();
                              });
    });
  }
  void next() {
    auto self = shared_from_this();
    boost::asio::async_read(sock_, boost::asio::buffer(head_.data(), 4), [self](auto ec, size_t) {
      if (ec) return self->closed();
      self->read_header_rest();
    });
  }
  void refuse_malformed(const std::string& why) {
    {
      std::lock_guard<std::mutex> lock(server_.mu_);
      server_.counters_.malformed += 1;
    }
    LOOM_WARN("monitor: malformed frame from " << peer() << " dropped: " << why);
    drop();
  }
  void drop() {
    boost::system::error_code ec;
    sock_.close(ec);
    closed();
  }
  void closed() {
    if (!lost_reported_) {
      lost_reported_ = true;
      server_.lost(*this);
    }
  }
  void read_http() {
    auto self = shared_from_this();
    http_.prepare(0);
    std::ostream(&http_) << std::string(reinterpret_cast<const char*>(head_.data()), 4);
    boost::asio::async_read_until(sock_, http_, "\r\n\r\n", [self](auto ec, size_t) {
      if (ec) return;
      std::istream is(&self->http_);
      std::string line;
      std::getline(is, line);
      self->reply_ = self->server_.http_response(line);
      boost::asio::async_write(self->sock_, boost::asio::buffer(self->reply_), [self](auto, size_t) {
        boost::system::error_code ignored;
        self->sock_.shutdown(tcp::socket::shutdown_both, ignored);
      });
    });
  }
  std::string peer() const {
    boost::system::error_code ec;
    auto ep = sock_.remote_endpoint(ec);
    return ec ? std::string("?") : ep.address().to_string() + ":" + std::to_string(ep.port());
  }

  MonitorServer& server_;
  tcp::socket sock_;
  std::array<unsigned char, kMonHeaderBytes> head_{};
  MonType type_ = MonType::kHeartbeat;
  std::string payload_;
  boost::asio::streambuf http_{16384};
  std::string reply_;
  bool lost_reported_ = false;
};

MonitorServer::MonitorServer(MonitorOptions options)
    : opt_(std::move(options)), impl_(std::make_unique<Impl>()), engine_(std::make_unique<VerdictEngine>(opt_.engine)) {}

MonitorServer::~MonitorServer() {
  stop();
}

void MonitorServer::start() {
  boost::system::error_code ec;
  tcp::endpoint ep(boost::asio::ip::make_address(opt_.bind, ec), static_cast<unsigned short>(opt_.port));
  LOOM_CHECK(!ec, kConfig, "monitor: bad bind address '" << opt_.bind << "': " << ec.message());
  impl_->acceptor.open(ep.protocol(), ec);
  if (!ec) impl_->acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) impl_->acceptor.bind(ep, ec);
  if (!ec) impl_->acceptor.listen(128, ec);
  LOOM_CHECK(!ec, kComm, "monitor: cannot listen on " << opt_.bind << ":" << opt_.port << ": " << ec.message());
  port_ = impl_->acceptor.local_endpoint().port();
  if (!opt_.verdict_dir.empty()) std::filesystem::create_directories(opt_.verdict_dir);
  started_at_ = wall_now_s();
  accept();
  tick();
  thread_ = std::thread([this] { impl_->io.run(); });
}

void MonitorServer::stop() {
  if (!thread_.joinable()) return;
  impl_->io.stop();
  thread_.join();
}

void MonitorServer::accept() {
  impl_->acceptor.async_accept([this](boost::system::error_code ec, tcp::socket sock) {
    if (ec) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      counters_.connections += 1;
    }
    sock.set_option(tcp::no_delay(true), ec);
    std::make_shared<Connection>(*this, std::move(sock))->start();
    accept();
  });
}

void MonitorServer::tick() {
  impl_->timer.expires_after(std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(opt_.tick_s)));
  impl_->timer.async_wait([this](boost::system::error_code ec) {
    if (ec) return;
    std::optional<Verdict> v;
    std::function<void(const Verdict&)> cb;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const double now = wall_now_s();
      // A tick much later than scheduled means this process did not run (an overloaded machine): frames may be
      // waiting unread, so the ranks get that time back. The frames are read before the next tick.
      const double late = last_tick_ > 0 ? now - last_tick_ - opt_.tick_s : 0;
      last_tick_ = now;
      if (late > 0.25) {
        stalls_ += 1;
        LOOM_INFO("monitor: this process did not run for " << late << " s; not counted against the ranks");
        engine_->monitor_stalled(late);
        tick();
        return;
      }
      v = engine_->tick(now);
      if (v) {
        verdicts_.push_back(*v);
        cb = on_verdict_;
      }
    }
    if (v) {
      LOOM_WARN("monitor verdict (" << v->kind << "): " << v->summary);
      if (!opt_.verdict_dir.empty()) {
        namespace fs = std::filesystem;
        const fs::path path = fs::path(opt_.verdict_dir) / ("verdict-e" + std::to_string(opt_.epoch) + ".json");
        const fs::path tmp = path.string() + ".tmp";
        {
          std::ofstream f(tmp);
          f << v->to_json(opt_.job, opt_.epoch) << "\n";
        }
        std::error_code fec;
        fs::rename(tmp, path, fec);
        if (fec) LOOM_WARN("monitor: cannot write " << path << ": " << fec.message());
      }
      cv_.notify_all();
      if (cb) cb(*v);
    }
    tick();
  });
}

bool MonitorServer::handle(Connection& c, const MonMessage& m) {
  std::lock_guard<std::mutex> lock(mu_);
  counters_.frames += 1;
  const double now = wall_now_s();
  try {
    if (!opt_.token.empty() && m.get("token") != opt_.token) {
      counters_.refused_token += 1;
      LOOM_WARN("monitor: " << mon_type_name(m.type) << " with a wrong job token refused");
      return false;
    }
    if (m.get("job") != opt_.job) {
      counters_.refused_job += 1;
      LOOM_WARN("monitor: " << mon_type_name(m.type) << " for job '" << m.get("job") << "' refused (this is '"
                            << opt_.job << "')");
      return false;
    }
    const int64_t epoch = m.i64("epoch");
    if (epoch != opt_.epoch) {
      counters_.refused_epoch += 1;
      LOOM_INFO("monitor: rank " << m.get("rank") << " of epoch " << epoch << " refused (current epoch " << opt_.epoch
                                 << ")");
      return false;
    }
    const int rank = static_cast<int>(m.i64("rank"));
    if (m.type == MonType::kHello) {
      RankView info;
      info.rank = rank;
      info.node = static_cast<int>(m.i64("node"));
      info.host = m.get("host");
      info.pid = m.i64("pid");
      info.tp_rank = static_cast<int>(m.i64("tp_rank"));
      info.dp_rank = static_cast<int>(m.i64("dp_rank"));
      info.world = m.has("world") ? static_cast<int>(m.i64("world")) : 0;
      info.local_size = m.has("local_size") ? static_cast<int>(m.i64("local_size")) : 0;
      engine_->hello(info, now);
      c.rank = rank;
      c.epoch = epoch;
      return true;
    }
    if (c.rank != rank) {
      counters_.malformed += 1;
      LOOM_WARN("monitor: " << mon_type_name(m.type) << " for rank " << rank << " on a connection without its HELLO");
      return false;
    }
    if (m.type == MonType::kHeartbeat) engine_->heartbeat(rank, m, now);
    if (m.type == MonType::kTrace) engine_->trace(rank, decode_records(m.get("recs")), now, m.get("truncated") == "1");
    if (m.type == MonType::kBye) engine_->bye(rank, m.get("reason", "done"), m.get("message"), now);
    return true;
  } catch (const Error& e) {
    counters_.malformed += 1;
    LOOM_WARN("monitor: bad " << mon_type_name(m.type) << " dropped: " << e.what());
    return false;
  }
}

void MonitorServer::lost(Connection& c) {
  if (c.rank < 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (c.epoch == opt_.epoch) engine_->disconnect(c.rank, wall_now_s());
}

void MonitorServer::begin_epoch(int64_t epoch) {
  std::lock_guard<std::mutex> lock(mu_);
  opt_.epoch = epoch;
  engine_ = std::make_unique<VerdictEngine>(opt_.engine);
}

std::optional<Verdict> MonitorServer::wait_verdict(double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), [&] { return engine_->verdict().has_value(); });
  return engine_->verdict();
}

std::vector<Verdict> MonitorServer::verdicts() const {
  std::lock_guard<std::mutex> lock(mu_);
  return verdicts_;
}

void MonitorServer::on_verdict(std::function<void(const Verdict&)> fn) {
  std::lock_guard<std::mutex> lock(mu_);
  on_verdict_ = std::move(fn);
}

MonitorCounters MonitorServer::counters() const {
  std::lock_guard<std::mutex> lock(mu_);
  return counters_;
}

MonitorServer::Progress MonitorServer::progress() const {
  std::lock_guard<std::mutex> lock(mu_);
  Progress p;
  bool first = true, starts_known = true;
  for (const auto& [r, v] : engine_->ranks()) {
    p.ranks += 1;
    p.alive += v.connected && !v.bye;
    p.min_step = first ? v.step : std::min(p.min_step, v.step);
    p.max_step = first ? v.step : std::max(p.max_step, v.step);
    if (v.start_step < 0) starts_known = false;
    p.start_step = first ? v.start_step : std::min(p.start_step, v.start_step);
    first = false;
  }
  if (!starts_known) p.start_step = -1;
  return p;
}

std::string MonitorServer::status_json() const {
  std::lock_guard<std::mutex> lock(mu_);
  return status_json_locked();
}

std::string MonitorServer::status_json_locked() const {
  const double now = wall_now_s();
  const double silence = opt_.engine.silence_factor * opt_.engine.heartbeat_s;
  std::vector<std::string> ranks;
  for (const auto& [r, v] : engine_->ranks()) {
    std::string state = "alive";
    if (v.bye) state = v.bye_reason == "error" ? "error" : "done";
    else if (!v.connected) state = "lost";
    else if (now - v.last_heartbeat > silence) state = "silent";
    ranks.push_back(JsonObject()
                        .num("rank", r).num("node", v.node).str("host", v.host).num("pid", v.pid)
                        .num("tp_rank", v.tp_rank).num("dp_rank", v.dp_rank).str("state", state)
                        .num("step", v.step).num("loss", v.loss).num("tokens_per_s", v.tokens_per_s)
                        .num("snapshot", v.snapshot).num("launched", static_cast<double>(v.launched))
                        .num("completed", static_cast<double>(v.completed))
                        .num("heartbeat_age_s", now - v.last_heartbeat).done());
  }
  JsonObject latency;
  for (const auto& [name, per_rank] : engine_->latency()) {
    JsonObject row;
    for (const auto& [r, cell] : per_rank)
      row.num(std::to_string(r), cell.count ? 1e3 * cell.sum_s / static_cast<double>(cell.count) : 0.0);
    latency.raw(name, row.done());
  }
  std::vector<std::string> links;
  for (const auto& [pair, mean] : engine_->last_link_means())
    links.push_back(JsonObject().num("src", pair.first).num("dst", pair.second).num("mean_ms", mean * 1e3).done());
  JsonObject frac, runq, dev, base;
  for (const auto& [r, f] : engine_->last_comm_fraction()) frac.num(std::to_string(r), f);
  for (const auto& [r, f] : engine_->last_run_queue()) runq.num(std::to_string(r), f);
  for (const auto& [r, d] : engine_->last_deviation()) dev.num(std::to_string(r), d);
  for (const auto& [r, d] : engine_->baseline_deviation()) base.num(std::to_string(r), d);
  std::vector<std::string> verdicts;
  for (const Verdict& v : verdicts_) verdicts.push_back(v.to_json(opt_.job, opt_.epoch));
  const MonitorCounters& c = counters_;
  return JsonObject()
      .str("job", opt_.job).num("epoch", opt_.epoch).num("now", now).num("uptime_s", now - started_at_)
      .num("hang_threshold_s", engine_->hang_threshold_s()).num("p99_gap_s", engine_->p99_gap_s())
      .raw("counters", JsonObject()
                           .num("frames", static_cast<double>(c.frames))
                           .num("connections", static_cast<double>(c.connections))
                           .num("refused_token", static_cast<double>(c.refused_token))
                           .num("refused_epoch", static_cast<double>(c.refused_epoch))
                           .num("refused_job", static_cast<double>(c.refused_job))
                           .num("malformed", static_cast<double>(c.malformed))
                           .num("http_requests", static_cast<double>(c.http_requests))
                           .num("monitor_stalls", static_cast<double>(stalls_)).done())
      .raw("ranks", json_array(ranks)).raw("latency", latency.done()).raw("links", json_array(links))
      .raw("comm_fraction", JsonObject()
                                .raw("fraction", frac.done())
                                .raw("run_queue", runq.done())
                                .raw("deviation", dev.done())
                                .raw("baseline", base.done())
                                .num("noise", engine_->slow_noise())
                                .num("threshold", engine_->slow_rank_threshold()).done())
      .raw("verdicts", json_array(verdicts)).done();
}

std::string MonitorServer::metrics_text() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::ostringstream os;
  const std::string job = "job=\"" + opt_.job + "\"";
  os << "# HELP loom_epoch Incarnation of the job (restarts so far).\n# TYPE loom_epoch gauge\n"
     << "loom_epoch{" << job << "} " << opt_.epoch << "\n";
  os << "# HELP loom_rank_step Last completed training step per rank.\n# TYPE loom_rank_step gauge\n";
  for (const auto& [r, v] : engine_->ranks())
    os << "loom_rank_step{" << job << ",rank=\"" << r << "\",node=\"" << v.node << "\"} " << v.step << "\n";
  os << "# HELP loom_rank_tokens_per_second Training throughput per rank.\n# TYPE loom_rank_tokens_per_second gauge\n";
  for (const auto& [r, v] : engine_->ranks())
    os << "loom_rank_tokens_per_second{" << job << ",rank=\"" << r << "\"} " << json_number(v.tokens_per_s) << "\n";
  os << "# HELP loom_rank_alive 1 while the rank is connected and heartbeating.\n# TYPE loom_rank_alive gauge\n";
  for (const auto& [r, v] : engine_->ranks())
    os << "loom_rank_alive{" << job << ",rank=\"" << r << "\"} " << (v.connected && !v.bye ? 1 : 0) << "\n";
  os << "# HELP loom_rank_collectives_completed Collectives completed per rank.\n"
        "# TYPE loom_rank_collectives_completed counter\n";
  for (const auto& [r, v] : engine_->ranks())
    os << "loom_rank_collectives_completed{" << job << ",rank=\"" << r << "\"} " << v.completed << "\n";
  os << "# HELP loom_rank_snapshot_version Newest snapshot staged per rank.\n# TYPE loom_rank_snapshot_version gauge\n";
  for (const auto& [r, v] : engine_->ranks())
    os << "loom_rank_snapshot_version{" << job << ",rank=\"" << r << "\"} " << v.snapshot << "\n";
  os << "# HELP loom_collective_latency_seconds Mean collective latency per rank.\n"
        "# TYPE loom_collective_latency_seconds gauge\n";
  for (const auto& [name, per_rank] : engine_->latency()) {
    const std::string group = name.substr(0, name.find(' ')), op = name.substr(name.find(' ') + 1);
    for (const auto& [r, cell] : per_rank)
      os << "loom_collective_latency_seconds{" << job << ",group=\"" << group << "\",op=\"" << op << "\",rank=\"" << r
         << "\"} " << json_number(cell.count ? cell.sum_s / static_cast<double>(cell.count) : 0.0) << "\n";
  }
  os << "# HELP loom_monitor_frames_refused_total Frames refused, by reason.\n"
        "# TYPE loom_monitor_frames_refused_total counter\n";
  os << "loom_monitor_frames_refused_total{" << job << ",reason=\"token\"} " << counters_.refused_token << "\n";
  os << "loom_monitor_frames_refused_total{" << job << ",reason=\"epoch\"} " << counters_.refused_epoch << "\n";
  os << "loom_monitor_frames_refused_total{" << job << ",reason=\"job\"} " << counters_.refused_job << "\n";
  os << "loom_monitor_frames_refused_total{" << job << ",reason=\"malformed\"} " << counters_.malformed << "\n";
  os << "# HELP loom_verdicts_total Verdicts reached.\n# TYPE loom_verdicts_total counter\n";
  os << "loom_verdicts_total{" << job << "} " << verdicts_.size() << "\n";
  return os.str();
}

std::string MonitorServer::http_response(const std::string& request_line) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    counters_.http_requests += 1;
  }
  std::istringstream is(request_line);
  std::string method, path;
  is >> method >> path;
  std::string body, type = "text/plain; charset=utf-8", status = "200 OK";
  if (path == "/" || path == "/index.html") {
    body = status_page_html();
    type = "text/html; charset=utf-8";
  } else if (path == "/status.json") {
    body = status_json();
    type = "application/json";
  } else if (path == "/metrics") {
    body = metrics_text();
    type = "text/plain; version=0.0.4; charset=utf-8";
  } else {
    status = "404 Not Found";
    body = "not found: " + path + "\n";
  }
  std::ostringstream os;
  os << "HTTP/1.1 " << status << "\r\nContent-Type: " << type << "\r\nContent-Length: " << body.size()
     << "\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n";
  if (method != "HEAD") os << body;
  return os.str();
}

}  // namespace loom::mon
