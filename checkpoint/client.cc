#include "checkpoint/client.h"

#include <spawn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "checkpoint/layout_codec.h"
#include "core/error.h"
#include "core/log.h"

extern char** environ;

namespace loom::snap {
namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

bool try_connect(boost::asio::io_context& io, const std::string& path, std::unique_ptr<Socket>* out) {
  auto s = std::make_unique<Socket>(io);
  boost::system::error_code ec;
  s->connect(boost::asio::local::stream_protocol::endpoint(path), ec);
  if (ec) return false;
  *out = std::move(s);
  return true;
}

uint64_t half_of_memory() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  uint64_t kb = 0;
  while (f >> key >> kb) {
    if (key == "MemTotal:") return kb * 1024 / 2;
    f.ignore(256, '\n');
  }
  return uint64_t{8} << 30;
}

std::string loom_tool(const SnapshotOptions& o) {
  if (!o.loom_path.empty()) return o.loom_path;
  std::error_code ec;
  auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  return (self.parent_path() / "loom").string();
}

}  // namespace

void ensure_daemon(const SnapshotOptions& o, int node) {
  const std::string path = daemon_socket_path(o.job, node);
  boost::asio::io_context io;
  std::unique_ptr<Socket> probe;
  if (try_connect(io, path, &probe)) return;
  const std::string tool = loom_tool(o);
  LOOM_CHECK(::access(tool.c_str(), X_OK) == 0, kSnapshot,
             "cannot start the snapshot daemon: '" << tool << "' is not an executable (set snapshot.loom_path)");
  const uint64_t budget = o.memory_budget > 0 ? o.memory_budget : half_of_memory();
  std::vector<std::string> args = {tool,
                                   "snapshotd",
                                   "--job",
                                   o.job,
                                   "--node",
                                   std::to_string(node),
                                   "--socket",
                                   path,
                                   "--budget",
                                   std::to_string(budget),
                                   "--dir",
                                   o.dir,
                                   "--persist-every",
                                   std::to_string(o.persist_every),
                                   "--idle-timeout",
                                   std::to_string(o.idle_timeout_s)};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string log_path = path.substr(0, path.size() - 5) + ".log";  // beside the socket
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID);  // its own session: it outlives us and mpirun
  pid_t pid = 0;
  int rc = posix_spawn(&pid, tool.c_str(), &fa, &attr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  LOOM_CHECK(rc == 0, kSnapshot, "cannot start the snapshot daemon '" << tool << "': " << std::strerror(rc));
  for (int i = 0; i < 200; ++i) {  // up to 10 s
    if (try_connect(io, path, &probe)) {
      LOOM_INFO("started snapshot daemon for node " << node << " (pid " << pid << ", log " << log_path << ")");
      return;
    }
    ::usleep(50000);
  }
  LOOM_THROW(kSnapshot, "the snapshot daemon did not open " << path << " within 10 s; see " << log_path);
}

SnapshotClient::SnapshotClient(const SnapshotOptions& options, int node, Backend& backend)
    : options_(options), node_(node), backend_(backend), socket_path_(daemon_socket_path(options.job, node)) {
  worker_ = std::thread([this] { worker(); });
}

SnapshotClient::~SnapshotClient() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    cv_.notify_all();
  }
  worker_.join();
  pending_.clear();
  segment_.reset();
}

std::shared_ptr<SnapshotSegment> SnapshotClient::current_segment() {
  std::lock_guard<std::mutex> lock(segment_mu_);
  return segment_;
}

void SnapshotClient::connect_and_hello() {
  socket_.reset();
  if (!try_connect(io_, socket_path_, &socket_)) {
    ensure_daemon(options_, node_);  // the daemon died: start a new one, which adopts our segment
    LOOM_CHECK(try_connect(io_, socket_path_, &socket_), kSnapshot, "cannot reach the snapshot daemon at " << socket_path_);
  }
  write_message(*socket_, hello_);
  Message reply = read_message(*socket_);
  if (reply.type == MsgType::kError) LOOM_THROW(kSnapshot, reply.str("message"));
  LOOM_CHECK(reply.type == MsgType::kHelloOk, kSnapshot, "snapshot daemon answered HELLO with " << msg_type_name(reply.type));
  ec_host_ = reply.has("ec_host") ? reply.str("ec_host") : "";
  ec_port_ = reply.has("ec_port") ? static_cast<int>(reply.i64("ec_port")) : 0;
  Backend* be = &backend_;
  auto seg = std::shared_ptr<SnapshotSegment>(new SnapshotSegment(SnapshotSegment::open(reply.str("segment"))),
                                              [be](SnapshotSegment* p) {
                                                be->unpin_host_memory(p->base());
                                                delete p;
                                              });
  be->pin_host_memory(seg->base(), seg->size());
  std::lock_guard<std::mutex> lock(segment_mu_);
  segment_ = std::move(seg);
}

void SnapshotClient::attach(const SegmentIdentity& id, const std::vector<LayoutEntry>& layout, uint64_t config_hash,
                            int num_nodes, int local_size) {
  hello_ = Message(MsgType::kHello);
  hello_.set("job", options_.job).set("rank", id.rank).set("world_size", id.world_size);
  hello_.set("tp_rank", id.tp_rank).set("tp_size", id.tp_size).set("dp_rank", id.dp_rank).set("dp_size", id.dp_size);
  hello_.set("slice_begin", id.slice_begin).set("slice_end", id.slice_end).set("padded_numel", id.padded_numel);
  hello_.set("layout_hash", std::to_string(id.layout_hash)).set("seed", std::to_string(id.seed));
  hello_.set("config_hash", std::to_string(config_hash)).set("num_nodes", num_nodes).set("local_size", local_size);
  encode_layout(layout, hello_);
  identity_ = id;
  std::lock_guard<std::mutex> lock(socket_mu_);
  connect_and_hello();
  LOOM_CHECK(current_segment()->identity().same_as(id), kSnapshot, "the daemon mapped a segment of another rank");
}

Message SnapshotClient::request(const Message& m, bool expect_reply) {
  std::lock_guard<std::mutex> lock(socket_mu_);
  for (int attempt = 0;; ++attempt) {
    try {
      if (!socket_) connect_and_hello();
      write_message(*socket_, m);
      return expect_reply ? read_message(*socket_) : Message(MsgType::kOk);
    } catch (const Error& e) {
      socket_.reset();
      if (attempt >= 2) throw;
      LOOM_WARN("snapshot daemon connection lost (" << e.what() << "); reconnecting");
    }
  }
}

void SnapshotClient::stage(int64_t version, const Tensor& master, const Tensor& adam_m, const Tensor& adam_v) {
  std::shared_ptr<SnapshotSegment> segment = current_segment();
  LOOM_CHECK(segment != nullptr, kInternal, "SnapshotClient::stage before attach");
  {
    // The buffer of the previous version must be marked staged before a buffer is chosen for this one, or the
    // still-unmarked buffer would look free. Its copy is complete by now (fence() ran before the optimizer), so
    // this waits, if at all, for the worker to flip a flag.
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return unmarked_ == 0; });
  }
  const uint64_t n = identity_.slice_floats();
  for (const Tensor* t : {&master, &adam_m, &adam_v})
    LOOM_CHECK(static_cast<uint64_t>(t->numel()) == n && t->dtype() == DType::kF32, kSnapshot,
               "stage: slice " << t->describe() << " does not match the segment's " << n << " f32 elements");
  const int buffer = segment->begin_staging(version);
  float* dst = segment->buffer_data(buffer);
  Job job{segment, version, buffer, {}, now_s()};
  job.copies.push_back(backend_.copy_to_host_async(dst, master));
  job.copies.push_back(backend_.copy_to_host_async(dst + n, adam_m));
  job.copies.push_back(backend_.copy_to_host_async(dst + 2 * n, adam_v));
  pending_ = job.copies;
  std::lock_guard<std::mutex> lock(mu_);
  jobs_.push_back(std::move(job));
  ++in_flight_;
  ++unmarked_;
  cv_.notify_all();
}

double SnapshotClient::fence() {
  const double t0 = now_s();
  for (auto& c : pending_) c->fence();
  pending_.clear();
  return now_s() - t0;
}

void SnapshotClient::drain() {
  fence();
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return in_flight_ == 0; });
}

void SnapshotClient::worker() {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
      if (jobs_.empty()) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    bool marked = false;
    try {
      for (auto& c : job.copies) c->wait();
      job.segment->mark_staged(job.buffer);
      marked = true;
      {
        std::lock_guard<std::mutex> lock(mu_);
        --unmarked_;
        cv_.notify_all();
      }
      copy_seconds_ += now_s() - job.started;
      ++staged_versions_;
      Message m(MsgType::kStaged);
      m.set("buffer", job.buffer).set("version", job.version);
      request(m, false);
    } catch (const std::exception& e) {
      LOOM_WARN("snapshot of version " << job.version << " not handed to the daemon: " << e.what()
                                       << " (training goes on)");
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (!marked) --unmarked_;
    --in_flight_;
    cv_.notify_all();
  }
}

std::vector<SnapshotClient::Available> SnapshotClient::query() {
  Message reply = request(Message(MsgType::kQuery), true);
  LOOM_CHECK(reply.type == MsgType::kVersions, kSnapshot, "snapshot daemon answered QUERY with " << msg_type_name(reply.type));
  std::vector<Available> out;
  const int64_t count = reply.i64("count");
  for (int64_t i = 0; i < count; ++i) {
    const std::string& f = reply.str("v" + std::to_string(i));
    Available a{};
    char ok = '0';
    LOOM_CHECK(std::sscanf(f.c_str(), "%ld:%d:%c", &a.version, &a.buffer, &ok) == 3, kSnapshot,
               "malformed VERSIONS entry '" << f << "'");
    a.crc_ok = ok == '1';
    out.push_back(a);
  }
  return out;
}

bool SnapshotClient::load(int buffer, const Tensor& master, const Tensor& adam_m, const Tensor& adam_v) {
  std::shared_ptr<SnapshotSegment> segment = current_segment();
  if (!segment->verify(buffer)) return false;
  const uint64_t n = identity_.slice_floats();
  const float* src = segment->buffer_data(buffer);
  const Tensor* dst[3] = {&master, &adam_m, &adam_v};
  for (int i = 0; i < 3; ++i)
    backend_.copy(*dst[i], Tensor(const_cast<float*>(src + i * n), Shape{static_cast<int64_t>(n)}, DType::kF32,
                                  Device::kCpu));
  backend_.synchronize();
  return true;
}

void SnapshotClient::configure_ec(int group_size, int parity, int index, const std::vector<std::string>& peers,
                                  int64_t every) {
  Message m(MsgType::kPeers);
  m.set("group_size", group_size).set("parity", parity).set("index", index).set("every", every);
  for (size_t i = 0; i < peers.size(); ++i) m.set("peer" + std::to_string(i), peers[i]);
  Message reply = request(m, true);
  if (reply.type == MsgType::kError) LOOM_THROW(kSnapshot, reply.str("message"));
}

std::vector<int64_t> SnapshotClient::ec_versions() {
  Message reply = request(Message(MsgType::kEcQuery), true);
  std::vector<int64_t> out;
  for (int64_t i = 0; i < reply.i64("count"); ++i) out.push_back(reply.i64("v" + std::to_string(i)));
  return out;
}

void SnapshotClient::rebuild(int64_t version) {
  Message m(MsgType::kRebuild);
  m.set("version", version);
  Message reply = request(m, true);
  if (reply.type == MsgType::kError) LOOM_THROW(kSnapshot, reply.str("message"));
}

void SnapshotClient::finish() {
  drain();
  try {
    request(Message(MsgType::kFinish), true);
  } catch (const std::exception& e) {
    LOOM_WARN("could not tell the snapshot daemon this rank finished: " << e.what());
  }
}

}  // namespace loom::snap
