#include "checkpoint/daemon.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <tuple>
#include <sstream>
#include <thread>
#include <vector>

#include "checkpoint/crc.h"
#include "checkpoint/ec_group.h"
#include "checkpoint/hdf5_format.h"
#include "checkpoint/layout_codec.h"
#include "checkpoint/protocol.h"
#include "checkpoint/segment.h"
#include "core/env.h"
#include "core/error.h"
#include "core/log.h"

namespace loom::snap {

std::string daemon_socket_path(const std::string& job, int node) {
  std::string base = env::get_string("XDG_RUNTIME_DIR", "");
  if (base.empty() || base[0] != '/') base = "/tmp";
  const std::string dir = base + "/loom-" + std::to_string(::getuid());
  ::mkdir(dir.c_str(), 0700);
  ::chmod(dir.c_str(), 0700);
  return dir + "/" + job + "-node" + std::to_string(node) + ".sock";
}

int daemon_pid(const std::string& socket_path) {
  FILE* f = std::fopen((socket_path + ".lock").c_str(), "r");
  if (!f) return -1;
  int pid = -1;
  if (std::fscanf(f, "%d", &pid) != 1) pid = -1;
  std::fclose(f);
  return pid;
}

namespace {

using Clock = std::chrono::steady_clock;

struct RankEntry {
  std::unique_ptr<SnapshotSegment> segment;
  std::vector<LayoutEntry> layout;
  uint64_t config_hash = 0;
  int num_nodes = 1;
  std::string config_toml;
  bool connected = false;
  bool finished = false;
};

// The node blob (every local rank's snapshot buffer of one version, in rank order) as the EC group sees it.
class NodeBlobs : public BlobStore {
 public:
  NodeBlobs(std::mutex& mu, std::map<int, RankEntry>& ranks) : mu_(mu), ranks_(ranks) {}
  size_t blob_bytes() override;
  bool read(int64_t version, size_t offset, size_t len, uint8_t* out) override;
  void begin_write(int64_t version) override;
  void write(size_t offset, size_t len, const uint8_t* data) override;
  void commit_write() override;

 private:
  // (segment, buffer, bytes) of each rank for a version, in rank order; empty when a rank lacks it.
  struct Piece {
    SnapshotSegment* seg;
    int buffer;
    size_t bytes;
  };
  std::vector<Piece> pieces(int64_t version, bool need_committed);
  std::mutex& mu_;
  std::map<int, RankEntry>& ranks_;
  std::set<std::tuple<int, int, int64_t>> verified_;  // (rank, buffer, version) whose CRC was checked
  std::vector<Piece> writing_;
};

class Daemon {
 public:
  explicit Daemon(const DaemonConfig& c) : cfg_(c), acceptor_(io_), blobs_(mu_, ranks_), ec_(blobs_) {}
  int run();

 private:
  void accept_next();
  void serve(std::shared_ptr<Socket> sock);
  Message handle_hello(const Message& m, int* rank_out);
  void handle_staged(int rank, const Message& m);
  Message handle_query(int rank);
  Message handle_status();
  void commit_worker();
  bool should_persist(int64_t version);
  void prune_persisted(int64_t newest);
  void persist(int64_t version);
  uint64_t bytes_in_use() const;

  DaemonConfig cfg_;
  boost::asio::io_context io_;
  boost::asio::local::stream_protocol::acceptor acceptor_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int, RankEntry> ranks_;
  std::deque<std::pair<int, int>> commits_;  // (rank, buffer)
  int busy_ = 0;                              // commits taken off the queue whose CRC/EC/HDF5 work is running
  int live_connections_ = 0;
  Clock::time_point last_activity_ = Clock::now();
  bool stopping_ = false;
  int64_t last_persisted_ = -1;
  int64_t last_complete_ = -1;  // newest version committed by every local rank (for should_persist)
  int expected_ranks_ = 0;  // ranks on this node, as the trainers announce it
  std::vector<std::thread> connection_threads_;
  NodeBlobs blobs_;
  EcGroup ec_;
};

std::vector<NodeBlobs::Piece> NodeBlobs::pieces(int64_t version, bool need_committed) {
  std::vector<Piece> out;
  for (auto& [rank, e] : ranks_) {
    if (!e.segment) return {};
    int buffer = -1;
    for (auto [v, b] : e.segment->restorable())
      if (v == version) buffer = b;
    if (buffer < 0) return {};
    if (need_committed && !verified_.count({rank, buffer, version})) {
      e.segment->commit(buffer);
      if (!e.segment->verify(buffer)) return {};
      verified_.insert({rank, buffer, version});
    }
    out.push_back(Piece{e.segment.get(), buffer, e.segment->identity().buffer_bytes()});
  }
  return out;
}

size_t NodeBlobs::blob_bytes() {
  std::lock_guard<std::mutex> lock(mu_);
  size_t total = 0;
  for (auto& [rank, e] : ranks_)
    if (e.segment) total += e.segment->identity().buffer_bytes();
  return total;
}

bool NodeBlobs::read(int64_t version, size_t offset, size_t len, uint8_t* out) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Piece> ps = pieces(version, true);
  if (ps.empty()) return false;
  size_t base = 0;
  std::memset(out, 0, len);
  for (const Piece& p : ps) {
    const size_t lo = std::max(offset, base), hi = std::min(offset + len, base + p.bytes);
    if (lo < hi)
      std::memcpy(out + (lo - offset), reinterpret_cast<const uint8_t*>(p.seg->buffer_data(p.buffer)) + (lo - base), hi - lo);
    base += p.bytes;
  }
  return true;
}

void NodeBlobs::begin_write(int64_t version) {
  std::lock_guard<std::mutex> lock(mu_);
  writing_.clear();
  for (auto& [rank, e] : ranks_) {
    LOOM_CHECK(e.segment != nullptr, kSnapshot, "rank " << rank << " has no snapshot memory to rebuild into");
    writing_.push_back(Piece{e.segment.get(), e.segment->begin_staging(version), e.segment->identity().buffer_bytes()});
  }
}

void NodeBlobs::write(size_t offset, size_t len, const uint8_t* data) {
  size_t base = 0;
  for (const Piece& p : writing_) {
    const size_t lo = std::max(offset, base), hi = std::min(offset + len, base + p.bytes);
    if (lo < hi)
      std::memcpy(reinterpret_cast<uint8_t*>(p.seg->buffer_data(p.buffer)) + (lo - base), data + (lo - offset), hi - lo);
    base += p.bytes;
  }
}

void NodeBlobs::commit_write() {
  std::lock_guard<std::mutex> lock(mu_);
  for (const Piece& p : writing_) {
    p.seg->mark_staged(p.buffer);
    p.seg->commit(p.buffer);
  }
  writing_.clear();
}

uint64_t Daemon::bytes_in_use() const {
  uint64_t total = 0;
  for (const auto& [r, e] : ranks_)
    if (e.segment) total += e.segment->size();
  return total;
}

Message Daemon::handle_hello(const Message& m, int* rank_out) {
  LOOM_CHECK(m.str("job") == cfg_.job, kSnapshot,
             "this daemon serves job '" << cfg_.job << "', not '" << m.str("job") << "'");
  SegmentIdentity id;
  id.rank = static_cast<int32_t>(m.i64("rank"));
  id.world_size = static_cast<int32_t>(m.i64("world_size"));
  id.tp_rank = static_cast<int32_t>(m.i64("tp_rank"));
  id.tp_size = static_cast<int32_t>(m.i64("tp_size"));
  id.dp_rank = static_cast<int32_t>(m.i64("dp_rank"));
  id.dp_size = static_cast<int32_t>(m.i64("dp_size"));
  id.slice_begin = m.i64("slice_begin");
  id.slice_end = m.i64("slice_end");
  id.padded_numel = m.i64("padded_numel");
  id.layout_hash = m.u64("layout_hash");
  id.seed = m.u64("seed");
  std::vector<LayoutEntry> layout = decode_layout(m);
  std::lock_guard<std::mutex> lock(mu_);
  RankEntry& e = ranks_[id.rank];
  const std::string name = segment_name(cfg_.job, id.rank);
  if (!e.segment) {
    // After a restart of this daemon, the segment of the previous one may still be there: adopt it.
    try {
      auto seg = std::make_unique<SnapshotSegment>(SnapshotSegment::open(name));
      if (seg->identity().same_as(id)) e.segment = std::move(seg);
    } catch (const Error&) {
    }
  }
  if (e.segment && !e.segment->identity().same_as(id)) {
    LOOM_WARN("rank " << id.rank << " re-attached with a different model or layout; its old snapshots are dropped");
    e.segment.reset();
    SnapshotSegment::unlink(name);
  }
  if (!e.segment) {
    const uint64_t need = SnapshotSegment::bytes_for(id);
    const uint64_t used = bytes_in_use();
    LOOM_CHECK(used + need <= cfg_.memory_budget, kSnapshot,
               "the snapshot memory budget of node " << cfg_.node << " (" << (cfg_.memory_budget >> 20)
                                                     << " MiB) cannot hold rank " << id.rank << "'s "
                                                     << (need >> 20) << " MiB (" << (used >> 20)
                                                     << " MiB already in use); raise snapshot.memory_budget");
    e.segment = std::make_unique<SnapshotSegment>(SnapshotSegment::create(name, id));
  }
  e.layout = std::move(layout);
  e.config_hash = m.u64("config_hash");
  e.num_nodes = static_cast<int>(m.i64("num_nodes"));
  expected_ranks_ = std::max(expected_ranks_, static_cast<int>(m.i64("local_size")));
  e.config_toml = m.has("config_toml_hex") ? m.str("config_toml_hex") : "";
  e.connected = true;
  e.finished = false;
  *rank_out = id.rank;
  Message ok(MsgType::kHelloOk);
  ok.set("segment", name);
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  ok.set("ec_host", host).set("ec_port", ec_.port());
  return ok;
}

void Daemon::handle_staged(int rank, const Message& m) {
  const int buffer = static_cast<int>(m.i64("buffer"));
  LOOM_CHECK(buffer >= 0 && buffer < kBuffers, kSnapshot, "STAGED with buffer " << buffer);
  std::lock_guard<std::mutex> lock(mu_);
  commits_.emplace_back(rank, buffer);
  cv_.notify_all();
}

Message Daemon::handle_query(int rank) {
  Message reply(MsgType::kVersions);
  std::lock_guard<std::mutex> lock(mu_);
  RankEntry& e = ranks_.at(rank);
  int i = 0;
  for (auto [version, buffer] : e.segment->restorable()) {
    e.segment->commit(buffer);  // a copy staged just before the trainer died still needs its CRC
    const bool ok = e.segment->verify(buffer);
    if (!ok) LOOM_WARN("snapshot of rank " << rank << " version " << version << " (buffer " << buffer
                                           << ") fails its CRC check: " << e.segment->identity().describe());
    reply.set("v" + std::to_string(i++),
              std::to_string(version) + ":" + std::to_string(buffer) + ":" + (ok ? "1" : "0"));
  }
  reply.set("count", i);
  return reply;
}

Message Daemon::handle_status() {
  std::lock_guard<std::mutex> lock(mu_);
  Message r(MsgType::kStatusReply);
  r.set("job", cfg_.job).set("node", cfg_.node).set("ranks", static_cast<int64_t>(ranks_.size()));
  r.set("bytes", static_cast<int64_t>(bytes_in_use())).set("budget", static_cast<int64_t>(cfg_.memory_budget));
  r.set("persisted", last_persisted_).set("connections", live_connections_);
  r.set("ec", ec_.describe());
  for (auto& [rank, e] : ranks_) {
    if (!e.segment) continue;
    std::string s;
    for (int b = 0; b < kBuffers; ++b) {
      const BufferHeader& h = e.segment->buffer_header(b);
      s += (b ? "," : "") + std::to_string(h.version) + "/" + buffer_state_name(static_cast<BufferState>(h.state.load()));
    }
    r.set("rank" + std::to_string(rank), s);
    // Where the buffers start, for tools (and the corruption test) that look at the raw memory.
    r.set("rank" + std::to_string(rank) + "_memory",
          e.segment->name() + "," + std::to_string(e.segment->header()->header_bytes) + "," +
              std::to_string(e.segment->header()->buffer_stride));
  }
  return r;
}

void Daemon::serve(std::shared_ptr<Socket> sock) {
  int rank = -1;
  try {
    for (;;) {
      Message m = read_message(*sock);
      {
        std::lock_guard<std::mutex> lock(mu_);
        last_activity_ = Clock::now();
      }
      switch (m.type) {
        case MsgType::kHello: {
          Message reply;
          try {
            reply = handle_hello(m, &rank);
          } catch (const Error& e) {
            reply = Message(MsgType::kError);
            reply.set("message", e.what());
          }
          write_message(*sock, reply);
          break;
        }
        case MsgType::kStaged: handle_staged(rank, m); break;
        case MsgType::kQuery: write_message(*sock, handle_query(rank)); break;
        case MsgType::kStatus: write_message(*sock, handle_status()); break;
        case MsgType::kPeers: {
          Message reply(MsgType::kOk);
          try {
            std::vector<EcPeer> peers;
            const int g = static_cast<int>(m.i64("group_size"));
            for (int i = 0; i < g; ++i) {
              const std::string& hp = m.str("peer" + std::to_string(i));
              const auto colon = hp.rfind(':');
              peers.push_back(EcPeer{hp.substr(0, colon), std::atoi(hp.c_str() + colon + 1)});
            }
            ec_.configure(g, static_cast<int>(m.i64("parity")), static_cast<int>(m.i64("index")), peers, m.i64("every"));
          } catch (const Error& e) {
            reply = Message(MsgType::kError);
            reply.set("message", e.what());
          }
          write_message(*sock, reply);
          break;
        }
        case MsgType::kEcQuery: {
          Message reply(MsgType::kEcVersions);
          auto versions = ec_.complete_versions();
          reply.set("count", static_cast<int64_t>(versions.size()));
          for (size_t i = 0; i < versions.size(); ++i) reply.set("v" + std::to_string(i), versions[i]);
          write_message(*sock, reply);
          break;
        }
        case MsgType::kRebuild: {
          Message reply(MsgType::kOk);
          try {
            ec_.rebuild(m.i64("version"));
            LOOM_INFO("snapshot daemon node " << cfg_.node << ": rebuilt version " << m.i64("version") << " from the EC group");
          } catch (const Error& e) {
            reply = Message(MsgType::kError);
            reply.set("message", e.what());
          }
          write_message(*sock, reply);
          break;
        }
        case MsgType::kFinish: {
          {
            std::lock_guard<std::mutex> lock(mu_);
            if (ranks_.count(rank)) ranks_[rank].finished = true;
            cv_.notify_all();
          }
          write_message(*sock, Message(MsgType::kOk));
          break;
        }
        default: LOOM_THROW(kSnapshot, "unexpected " << msg_type_name(m.type) << " from a trainer");
      }
    }
  } catch (const std::exception& e) {
    // A closed connection is how a crashed trainer looks: its snapshots stay.
    LOOM_DEBUG("connection of rank " << rank << " ended: " << e.what());
  }
  std::lock_guard<std::mutex> lock(mu_);
  --live_connections_;
  if (ranks_.count(rank)) ranks_[rank].connected = false;
  last_activity_ = Clock::now();
  cv_.notify_all();
}

void Daemon::accept_next() {
  auto sock = std::make_shared<Socket>(io_);
  acceptor_.async_accept(*sock, [this, sock](const boost::system::error_code& ec) {
    if (ec) return;  // stopped
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++live_connections_;
      last_activity_ = Clock::now();
      connection_threads_.emplace_back([this, sock] { serve(sock); });
    }
    accept_next();
  });
}

void Daemon::commit_worker() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return stopping_ || !commits_.empty(); });
    if (commits_.empty() && stopping_) return;
    auto [rank, buffer] = commits_.front();
    commits_.pop_front();
    ++busy_;
    RankEntry& e = ranks_.at(rank);
    SnapshotSegment* seg = e.segment.get();
    const int64_t version = seg->buffer_header(buffer).version;
    lock.unlock();
    seg->commit(buffer);  // CRC over the buffer, outside the lock
    lock.lock();
    bool all_committed = true;
    for (auto& [r, e2] : ranks_) {
      bool has = false;
      for (auto [v, b] : e2.segment->restorable())
        has = has || (v == version &&
                      static_cast<BufferState>(e2.segment->buffer_header(b).state.load()) == BufferState::kCommitted);
      all_committed = all_committed && has;
    }
    const bool persist_now = all_committed && should_persist(version);
    if (all_committed) last_complete_ = std::max(last_complete_, version);
    lock.unlock();
    if (all_committed && static_cast<int>(ranks_.size()) >= expected_ranks_) ec_.on_committed(version);
    if (persist_now) persist(version);
    lock.lock();
    --busy_;
    cv_.notify_all();
  }
}

// Called with mu_ held: whether every rank of this node has committed `version` and it is due for HDF5: the first
// version at or past each multiple of persist_every (when the daemon falls behind, the trainers may already have
// staged over the multiple itself, so the next committed version stands in for it).
bool Daemon::should_persist(int64_t version) {
  if (cfg_.persist_dir.empty() || cfg_.persist_every <= 0 || version <= last_persisted_) return false;
  const int64_t M = cfg_.persist_every, multiple = version / M * M;
  // Due: a multiple itself, or the first version after a multiple this daemon saw skipped (it committed a
  // version before the multiple, and has persisted nothing at or after it).
  const bool crossed = last_complete_ >= 0 && last_complete_ < multiple && last_persisted_ < multiple;
  if (version % M != 0 && !crossed) return false;
  for (auto& [rank, e] : ranks_) {
    bool has = false;
    for (auto [v, b] : e.segment->restorable())
      has = has || (v == version && static_cast<BufferState>(e.segment->buffer_header(b).state.load()) ==
                                        BufferState::kCommitted);
    if (!has) return false;
  }
  last_persisted_ = version;
  return true;
}

// Copies the node's buffers of `version` (verifying their CRC after the copy, since a trainer may stage over a
// buffer meanwhile) and writes them as one HDF5 file. A failure is reported and training is not affected.
void Daemon::persist(int64_t version) {
  try {
    std::vector<std::vector<float>> copies;
    std::vector<SliceData> slices;
    SnapshotMeta meta;
    std::vector<LayoutEntry> layout;
    std::unique_lock<std::mutex> lock(mu_);  // held for the copy only, not for the file
    copies.reserve(ranks_.size());
    for (auto& [rank, e] : ranks_) {
      SnapshotSegment& seg = *e.segment;
      int buffer = -1;
      for (auto [v, b] : seg.restorable())
        if (v == version) buffer = b;
      if (buffer < 0) return;
      const SegmentIdentity& id = seg.identity();
      const size_t n = id.slice_floats();
      copies.emplace_back(seg.buffer_data(buffer), seg.buffer_data(buffer) + 3 * n);
      const uint32_t crc = seg.buffer_header(buffer).crc;
      if (seg.buffer_header(buffer).version != version ||
          crc32(copies.back().data(), copies.back().size() * sizeof(float)) != crc) {
        LOOM_WARN("version " << version << " changed while it was copied for HDF5; not persisted");
        return;
      }
      const float* base = copies.back().data();
      slices.push_back(SliceData{rank, id.tp_rank, id.dp_rank, id.slice_begin, id.slice_end, base, base + n, base + 2 * n});
      meta.tp_size = id.tp_size;
      meta.dp_size = id.dp_size;
      meta.layout_hash = id.layout_hash;
      meta.seed = id.seed;
      meta.padded_numel = id.padded_numel;
      meta.config_hash = e.config_hash;
      meta.num_nodes = e.num_nodes;
      layout = e.layout;
    }
    lock.unlock();
    if (slices.empty()) return;
    meta.version = version;
    meta.node = cfg_.node;
    std::error_code mkdir_error;
    std::filesystem::create_directories(cfg_.persist_dir, mkdir_error);  // write_node_file reports a failure
    std::string path = write_node_file(cfg_.persist_dir, meta, layout, slices);
    LOOM_INFO("snapshot daemon node " << cfg_.node << ": version " << version << " written to " << path);
    prune_persisted(version);
  } catch (const std::exception& e) {
    LOOM_WARN("snapshot daemon node " << cfg_.node << ": could not persist version " << version << ": " << e.what()
                                      << " (training goes on)");
  }
}

// Keeps this node's two newest HDF5 versions (the newest may be incomplete on other nodes for a while).
void Daemon::prune_persisted(int64_t newest) {
  namespace fs = std::filesystem;
  std::error_code ec;
  char suffix[32];
  std::snprintf(suffix, sizeof suffix, "-node%04d.h5", cfg_.node);
  std::vector<std::pair<int64_t, fs::path>> mine;
  for (const auto& entry : fs::directory_iterator(cfg_.persist_dir, ec)) {
    const std::string name = entry.path().filename().string();
    long long v = 0;
    if (name.size() > std::strlen(suffix) && name.compare(name.size() - std::strlen(suffix), std::string::npos, suffix) == 0 &&
        std::sscanf(name.c_str(), "snapshot-v%lld-", &v) == 1 && v < newest)
      mine.emplace_back(v, entry.path());
  }
  std::sort(mine.begin(), mine.end());
  for (size_t i = 0; i + 1 < mine.size(); ++i) fs::remove(mine[i].second, ec);
}

int Daemon::run() {
  // One daemon per socket: the lock is held for the daemon's life.
  const std::string lock_path = cfg_.socket_path + ".lock";
  int lock_fd = ::open(lock_path.c_str(), O_CREAT | O_RDWR, 0600);
  LOOM_CHECK(lock_fd >= 0, kSnapshot, "cannot open " << lock_path << ": " << std::strerror(errno));
  if (::flock(lock_fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(lock_fd);
    return 0;  // another daemon serves this node
  }
  // The lock file names the daemon's pid (for `loom inspect` and fault injection).
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(lock_fd, 0) != 0 || ::pwrite(lock_fd, pid.data(), pid.size(), 0) < 0)
    LOOM_WARN("cannot record the daemon's pid in " << lock_path);
  ::unlink(cfg_.socket_path.c_str());
  boost::asio::local::stream_protocol::endpoint ep(cfg_.socket_path);
  acceptor_.open(ep.protocol());
  acceptor_.bind(ep);
  ::chmod(cfg_.socket_path.c_str(), 0600);
  acceptor_.listen();
  LOOM_INFO("snapshot daemon for job " << cfg_.job << " node " << cfg_.node << " listening on " << cfg_.socket_path
                                       << " (budget " << (cfg_.memory_budget >> 20) << " MiB)");
  ec_.listen();
  accept_next();
  std::thread io_thread([this] { io_.run(); });
  std::thread committer([this] { commit_worker(); });

  bool clean = false;
  {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait_for(lock, std::chrono::milliseconds(500));
      // Done when every rank of the node has said so; after a restart of this daemon some ranks may not have
      // registered again yet, so count against the node's size, not against the ranks seen.
      int finished = 0;
      for (auto& [r, e] : ranks_) finished += e.finished ? 1 : 0;
      const bool all_finished = expected_ranks_ > 0 && finished >= expected_ranks_;
      if (all_finished && commits_.empty() && busy_ == 0) {  // the last HDF5 file is written first
        clean = true;
        break;
      }
      const double idle = std::chrono::duration<double>(Clock::now() - last_activity_).count();
      if (live_connections_ == 0 && idle > cfg_.idle_timeout_s) {
        LOOM_INFO("snapshot daemon node " << cfg_.node << ": no trainer for " << cfg_.idle_timeout_s << " s; exiting");
        break;
      }
    }
    stopping_ = true;
    cv_.notify_all();
  }
  committer.join();
  boost::asio::post(io_, [this] { acceptor_.close(); });
  io_.stop();
  io_thread.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& t : connection_threads_) t.detach();  // blocked reads end with the process
    for (auto& [r, e] : ranks_) SnapshotSegment::unlink(segment_name(cfg_.job, r));
  }
  ::unlink(cfg_.socket_path.c_str());
  ::unlink(lock_path.c_str());
  ::close(lock_fd);
  LOOM_INFO("snapshot daemon node " << cfg_.node << (clean ? ": job finished" : ": idle") << "; memory released");
  return 0;
}

}  // namespace

int run_daemon(const DaemonConfig& config) {
  Daemon d(config);
  return d.run();
}

}  // namespace loom::snap
