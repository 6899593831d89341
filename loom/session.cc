#include "loom/session.h"

#include <mpi.h>

#include <unistd.h>

#include <algorithm>
#include <climits>
#include <filesystem>
#include <cstdio>
#include <iostream>
#include <thread>

#include "core/error.h"
#include "core/log.h"
#include "core/rng.h"
#ifdef LOOM_HAVE_CUDA
#include "core/cuda/cuda_backend.h"
#include "core/cuda/device.h"
#include "parallel/cuda/host_staged_communicator.h"
#endif
#ifdef LOOM_HAVE_NCCL
#include "parallel/nccl/nccl_communicator.h"
#endif

namespace loom {

Session::Session(int& argc, char**& argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    owns_mpi_ = true;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size_);
  log::set_identity(rank_, -1);
}

Session::~Session() {
  // The monitor's last heartbeat and BYE go out while the communicators (whose trace rings it counts) still exist,
  // after the device-timed records of completed collectives are closed (at most 1 s per group): a finished rank
  // reports its collectives, all completed. (After an error path's stop("error") nothing changes what it saw.)
  if (monitor_) {
    if (groups_) {
      groups_->tp().flush_trace(1.0);
      groups_->dp().flush_trace(1.0);
    }
    monitor_->stop();
  }
  // Communicators must be freed before MPI_Finalize, and before the backend whose streams they use.
  groups_.reset();
  backend_.reset();
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owns_mpi_ && !finalized) MPI_Finalize();
}

void Session::agree(const std::function<void()>& fn) {
  std::string message;
  bool reported_elsewhere = false;
  try {
    fn();
  } catch (const ReportedElsewhere&) {
    reported_elsewhere = true;
  } catch (const std::exception& e) {
    message = e.what();
  }
  const int mine = (!message.empty() || reported_elsewhere) ? rank_ : INT_MAX;
  int lowest = INT_MAX;
  MPI_Allreduce(&mine, &lowest, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (lowest == INT_MAX) return;
  if (lowest == rank_ && !message.empty()) LOOM_ERROR(message);
  throw ReportedElsewhere(lowest);
}

bool Session::start(Config& cfg, TrainConfig& train, int argc, char** argv,
                    const std::function<void(const TrainConfig&)>& validate) {
  train.declare(cfg);
  bool help = false;
  agree([&] {
    cfg.parse(argc, argv);
    help = cfg.help_requested();
    if (help) return;
    log::set_level(log::parse_level(train.log_level));
    train.validate(world_size_);
    if (validate) validate(train);
  });
  if (help) {
    if (is_root()) std::cout << cfg.help() << std::flush;
    return false;
  }
  for (const auto& name : cfg.unknown_env())
    LOOM_WARN0("environment variable " << name << " is not a Loom setting; ignored");

  // Every rank must run the same configuration: a differing file or LOOM_* variable on one node is a bug
  // that would otherwise show up as a hang or silent divergence.
  uint64_t hash = cfg.hash();
  std::vector<uint64_t> all(static_cast<size_t>(world_size_));
  MPI_Allgather(&hash, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, MPI_COMM_WORLD);
  agree([&] {
    for (int r = 0; r < world_size_; ++r)
      LOOM_CHECK(all[static_cast<size_t>(r)] == all[0], kConfig,
                 "rank " << r << " has a different configuration from rank 0 (hash " << std::hex
                         << all[static_cast<size_t>(r)] << " vs " << all[0] << std::dec
                         << "): make config files and LOOM_* variables the same on every node");
  });
  if (is_root()) std::cout << cfg.table() << std::flush;
  train_ = train;

  // Layout errors are detected identically on every rank inside create(); report once.
  std::string layout_error;
  try {
    ParallelConfig pc;
    pc.tp = static_cast<int>(train.tp);
    pc.ranks_per_node = static_cast<int>(train.ranks_per_node);
    groups_ = ProcessGroups::create(MPI_COMM_WORLD, pc);
  } catch (const Error& e) {
    layout_error = e.what();
  }
  agree([&] {
    if (!layout_error.empty()) throw Error(ErrorKind::kConfig, layout_error);
  });
  log::set_identity(rank_, groups_->node_id());
  LOOM_INFO0("layout: " << groups_->describe());
  // The snapshots' configuration hash leaves out what may change between incarnations of one run (how long
  // it runs, logging, fault injection, the monitor's epoch, snapshot settings): a restart with more steps or
  // another fault plan must find the same snapshots.
  static const char* kVolatile[] = {"train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                                    "train.metrics_file", "runtime.log_level", "runtime.threads", "fault.",
                                    "monitor.", "snapshot."};
  config_hash_ = cfg.hash_if([](const std::string& key) {
    for (const char* v : kVolatile)
      if (key.rfind(v, 0) == 0) return false;
    return true;
  });
  config_toml_ = cfg.to_toml();
  if (!train_.monitor.empty()) {
    mon::ClientOptions mo;
    mo.address = train_.monitor;
    mo.job = train_.monitor_job;
    mo.token = train_.monitor_token;
    mo.epoch = train_.epoch;
    mo.heartbeat_s = train_.heartbeat_s;
    mo.run_queue = mon::RunQueueMeter::parse(train_.run_queue);
    mo.rank = rank_;
    mo.node = groups_->node_id();
    mo.tp_rank = groups_->tp_rank();
    mo.dp_rank = groups_->dp_rank();
    mo.world = world_size_;
    mo.local_size = groups_->local_size();
    monitor_ = std::make_unique<mon::MonitorClient>(mo);
    LOOM_INFO0("monitor: heartbeats every " << train_.heartbeat_s << " s to " << train_.monitor << " (job "
                                           << train_.monitor_job << ", epoch " << train_.epoch << ")");
  }
  start_snapshot_daemons();  // before CUDA starts: it forks
  agree([&] { make_backend(); });
  make_device_communicators();
  LOOM_INFO0("backend: " << backend_->name());
  return true;
}

bool Session::all_ok(bool ok) {
  int mine = ok ? 1 : 0, all = 0;
  MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all == 1;
}

// One daemon per node, started by the node's first rank. The job id names the daemons' memory, so a restart of
// the same run (same folder, same settings apart from how long it runs and how much it logs) finds it again.
void Session::start_snapshot_daemons() {
  if (train_.snapshot_every <= 0) return;
  snap::SnapshotOptions& o = snapshot_options_;
  o.every = train_.snapshot_every;
  o.memory_budget = static_cast<uint64_t>(train_.snapshot_budget_mb) << 20;
  o.dir = train_.snapshot_dir.empty() ? "" : std::filesystem::absolute(train_.snapshot_dir).string();
  o.persist_every = train_.persist_every;
  o.idle_timeout_s = static_cast<int>(train_.snapshot_idle_timeout);
  o.loom_path = train_.loom_path;
  o.job = train_.snapshot_job;
  if (o.job.empty()) {
    uint64_t h = config_hash_;
    h = fnv1a64(std::filesystem::current_path().string(), h);
    char id[24];
    std::snprintf(id, sizeof id, "j%012llx", static_cast<unsigned long long>(h & 0xffffffffffffull));
    o.job = id;
  }
  bool ok = true;
  if (groups_->local_rank() == 0) {
    try {
      snap::ensure_daemon(o, groups_->node_id());
    } catch (const std::exception& e) {
      LOOM_WARN("snapshots disabled: " << e.what());
      ok = false;
    }
  }
  snapshots_enabled_ = all_ok(ok);
  groups_->node().barrier();
  if (snapshots_enabled_) LOOM_INFO0("snapshots: every " << o.every << " step(s), job " << o.job);
}

void Session::make_backend() {
  std::string reason;
  const bool gpu = cuda_available(&reason);
  LOOM_CHECK(train_.device != "cuda" || gpu, kConfig, "runtime.device is 'cuda' but " << reason);
  if (train_.device == "cuda" || (train_.device == "auto" && gpu)) {
#ifdef LOOM_HAVE_CUDA
    // One GPU per rank, by the rank's place on its real node (emulated nodes share the machine's GPUs).
    int local = detect_local_rank();
    if (local < 0) local = groups_->local_rank();
    const int count = cuda::device_count();
    if (groups_->local_size() > count && local == 0)
      LOOM_WARN(groups_->local_size() << " ranks share " << count << " GPU(s) on this node; expect them to run slowly");
    backend_ = make_cuda_backend(local % count);
    return;
#endif
  }
  CpuBackendOptions opt;
  int threads = static_cast<int>(train_.threads);
  if (threads == 0) {
    // The machine's cores shared by the ranks on it (not by those of an emulated node: emulated nodes of one
    // machine would each take all of its cores).
    int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    threads = std::max(1, cores / groups_->host_size());
  }
  opt.threads = threads;
  backend_ = make_cpu_backend(opt);
}

// Collective: the TP and DP groups get device communicators on the backend's stream: NCCL's, or the host-staged
// MPI one (parallel.device_comm; 'auto' takes it where NCCL cannot serve a group: its ranks share a GPU, or the
// build has no NCCL). A failure inside NCCL's initialisation is reported by the failing rank and aborts the job
// (peers are inside it with it).
void Session::make_device_communicators() {
  if (backend_->device() != Device::kCuda || world_size_ == 1) return;
#ifdef LOOM_HAVE_CUDA
  auto* cuda_backend = &static_cast<cuda::CudaBackend&>(*backend_);
  const bool fused_kernel = train_.fused_kernel;
  if (!fused_kernel && !train_.fused_tuning.empty() && rank_ == 0)
    LOOM_WARN("parallel.fused_tuning is set but parallel.fused_kernel is off: the table is not used");
  const FusedTuning tuning = FusedTuning::load(fused_kernel ? train_.fused_tuning : std::string());
  // Why NCCL cannot serve each group (the same answer on every rank of a group); then every rank agrees on
  // whether 'nccl' can be honoured, so no rank enters NCCL's initialisation with peers that will not.
  auto why_not_nccl = [&](MpiCommunicator& group) -> std::string {
#ifndef LOOM_HAVE_NCCL
    (void)group;
    return "this build of Loom has no NCCL";
#else
    return HostStagedCommunicator::nccl_unusable_reason(group.comm());
#endif
  };
  const std::string mode = train_.device_comm;
  const std::string tp_why = mode == "mpi" ? "parallel.device_comm is 'mpi'" : why_not_nccl(groups_->host_tp());
  const std::string dp_why = mode == "mpi" ? "parallel.device_comm is 'mpi'" : why_not_nccl(groups_->host_dp());
  if (mode == "nccl")
    agree([&] {
      const std::string& mine = !tp_why.empty() ? tp_why : dp_why;
      LOOM_CHECK(mine.empty(), kConfig,
                 "parallel.device_comm is 'nccl' but NCCL cannot serve this rank's groups: " << mine
                                                                                             << " (use 'auto' or 'mpi')");
    });
  // One warning per kind of group, by the lowest world rank whose group is staged (not necessarily rank 0's:
  // on an uneven layout only some groups share a GPU), with how many of the groups are.
  auto warn_staged = [&](const char* name, const std::string& why, int group_size, int group_rank, int groups) {
    const bool staged = !why.empty() && group_size > 1;
    const int mine = staged && group_rank == 0 ? 1 : 0, lowest = staged ? rank_ : INT_MAX;
    int count = 0, first = INT_MAX;
    MPI_Allreduce(&mine, &count, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(&lowest, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (first != rank_) return;
    std::string which;
    if (groups > 1) which = " (" + std::to_string(count) + " of " + std::to_string(groups) + " such groups)";
    LOOM_WARN("group '" << name << "'" << which << ": host-staged MPI communicator instead of NCCL (" << why
                        << "); expect it to run slowly");
  };
  warn_staged("tp", tp_why, groups_->tp_size(), groups_->tp_rank(), world_size_ / groups_->tp_size());
  warn_staged("dp", dp_why, groups_->dp_size(), groups_->dp_rank(), groups_->tp_size());
  groups_->use_device_communicators([&](MpiCommunicator& group, const std::string& name,
                                        uint32_t id) -> std::unique_ptr<Communicator> {
    const bool fused = fused_kernel && name == "tp";
    const std::string& why = name == "tp" ? tp_why : dp_why;
#ifdef LOOM_HAVE_NCCL
    if (why.empty()) return std::make_unique<NcclCommunicator>(group.comm(), name, id, *cuda_backend, fused, tuning);
#endif
    (void)why;
    return std::make_unique<HostStagedCommunicator>(group.comm(), name, id, *cuda_backend, fused, tuning);
  });
#endif
}

ProcessGroups& Session::groups() const {
  LOOM_CHECK(groups_ != nullptr, kInternal, "Session::groups() before start()");
  return *groups_;
}

Backend& Session::backend() const {
  LOOM_CHECK(backend_ != nullptr, kInternal, "Session::backend() before start()");
  return *backend_;
}

TpGroup Session::tp() const {
  Communicator& c = groups().tp();
  return c.size() > 1 ? TpGroup::of(c) : TpGroup::none();
}

int run_main(int argc, char** argv, const std::function<void(Session&)>& body) {
  std::unique_ptr<Session> session;
  try {
    session = std::make_unique<Session>(argc, argv);
    body(*session);
  } catch (const ReportedElsewhere&) {
    if (session && session->monitor()) session->monitor()->stop("error", "failed (the lowest failing rank printed why)");
    return 1;  // the failing rank printed the reason; ~Session finalizes MPI
  } catch (const std::exception& e) {
    LOOM_ERROR(e.what());
    // Tell the monitor first: an error is not a crash, and restarting would only repeat it.
    if (session && session->monitor()) session->monitor()->stop("error", e.what());
    int size = session ? session->world_size() : 1;
    if (size > 1) MPI_Abort(MPI_COMM_WORLD, 1);  // peers may be blocked in a collective with us
    return 1;
  }
  return 0;
}

}  // namespace loom
