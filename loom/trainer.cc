#include "loom/trainer.h"

#include <mpi.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <algorithm>
#include <map>
#include <set>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <thread>

#include "checkpoint/erasure.h"
#include "checkpoint/hdf5_format.h"
#include "core/error.h"
#include "core/log.h"
#include "parallel/link_probe.h"
#include "parallel/link_trace.h"

namespace loom {
namespace {

std::string format_duration(double s) {
  char buf[32];
  if (s < 120) {
    std::snprintf(buf, sizeof buf, "%.0fs", s);
  } else if (s < 7200) {
    std::snprintf(buf, sizeof buf, "%.0fm%02.0fs", std::floor(s / 60), std::fmod(s, 60));
  } else {
    std::snprintf(buf, sizeof buf, "%.0fh%02.0fm", std::floor(s / 3600), std::fmod(s / 60, 60));
  }
  return buf;
}

std::string format_rate(double tokens_per_s) {
  char buf[32];
  if (tokens_per_s >= 1e6) {
    std::snprintf(buf, sizeof buf, "%.2fM", tokens_per_s / 1e6);
  } else if (tokens_per_s >= 1e3) {
    std::snprintf(buf, sizeof buf, "%.1fk", tokens_per_s / 1e3);
  } else {
    std::snprintf(buf, sizeof buf, "%.0f", tokens_per_s);
  }
  return buf;
}

}  // namespace

Trainer::Trainer(Session& session, LanguageModel& model) : s_(session), cfg_(session.train_config()), model_(model) {
  ProcessGroups& g = s_.groups();
  local_batch_ = cfg_.batch_size / g.dp_size();
  micro_batch_ = cfg_.micro_batch > 0 ? cfg_.micro_batch : local_batch_;
  schedule_ = LrSchedule{cfg_.lr, cfg_.min_lr, cfg_.warmup_steps, cfg_.steps};
  faults_ = cfg_.fault_specs();
  fault_hit_step_.assign(faults_.size(), -1);

  open_data();

  Backend& be = s_.backend();
  s_.agree([&] {
    ParamArenaOptions po;
    po.grad_dtype = DType::kF32;
    po.dp_size = g.dp_size();
    po.seed = static_cast<uint64_t>(cfg_.seed);
    params_ = std::make_unique<ParameterArena>(be, po);
    params_->finalize(model_);
    AdamWConfig ac{cfg_.beta1, cfg_.beta2, cfg_.adam_eps, cfg_.weight_decay, cfg_.grad_clip};
    optimizer_ = std::make_unique<AdamW>(*params_, ac);
  });
  arena_ = std::make_unique<ActivationArena>(be);
  loss_buf_ = be.allocate(sizeof(float));
  loss_sum_ = Tensor(loss_buf_, Shape{1}, DType::kF32, be.device());
  LOOM_INFO0("model: " << model_.num_parameters_global() << " parameters (" << params_->numel() << " on this rank, "
                       << params_->layout().size() << " tensors, " << params_->total_bytes() / (1 << 20)
                       << " MiB of weights, gradients and AdamW state)");
  setup_snapshots();
  const auto restore_t0 = std::chrono::steady_clock::now();
  restore();
  if (resumed_from_ != "fresh") {  // read by bench/snapshot_bench.sh
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - restore_t0).count();
    LOOM_INFO0("restore: resumed from " << resumed_from_ << " in " << s
                                        << " s (the whole ladder, CRC checks included)");
  }
  LOOM_INFO0("batch: " << cfg_.batch_size << " sequences x " << model_.seq_len() << " tokens per step; " << local_batch_
                       << " per data-parallel rank in micro-batches of " << micro_batch_);
  setup_link_probes();
}

void Trainer::setup_link_probes() {
  // Decided from the configuration and the groups' backends (agreed per group at start-up), so every rank of a
  // group probes or none does; TP first, then DP, everywhere.
  if (cfg_.monitor.empty()) return;
  ProcessGroups& g = s_.groups();
  LinkProbeOptions opt;
  opt.bytes = cfg_.probe_bytes;
  opt.rounds = static_cast<int>(cfg_.probe_rounds);
  std::string which;
  for (Communicator* c : {&g.tp(), &g.dp()}) {
    if (!link_probe_wanted(cfg_.link_probe, *c)) continue;
    probes_.push_back(std::make_unique<LinkProbe>(*c, s_.backend(), opt));
    which += (which.empty() ? "" : ", ") + c->name() + " (" + c->backend_name() + ")";
  }
  if (!which.empty())
    LOOM_INFO0("link probes on " << which << ": " << cfg_.probe_bytes << " bytes, "
                                 << (cfg_.probe_rounds > 0 ? std::to_string(cfg_.probe_rounds) + " round(s)" : "every pair")
                                 << " every " << cfg_.probe_every << " step(s)");
}

Trainer::~Trainer() {
  snap_.reset();  // joins its staging thread before the arena goes
  if (loss_buf_) s_.backend().deallocate(loss_buf_);
}

void Trainer::setup_snapshots() {
  if (!s_.snapshots_enabled()) return;
  ProcessGroups& g = s_.groups();
  const int64_t P = params_->padded_numel(), D = g.dp_size(), d = g.dp_rank();
  snap::SegmentIdentity id;
  id.rank = g.rank();
  id.world_size = g.world_size();
  id.tp_rank = g.tp_rank();
  id.tp_size = g.tp_size();
  id.dp_rank = g.dp_rank();
  id.dp_size = g.dp_size();
  id.slice_begin = d * P / D;
  id.slice_end = (d + 1) * P / D;
  id.padded_numel = P;
  id.layout_hash = params_->layout_hash();
  id.seed = static_cast<uint64_t>(cfg_.seed);
  bool ok = true;
  try {
    snap_ = std::make_unique<snap::SnapshotClient>(s_.snapshot_options(), g.node_id(), s_.backend());
    snap_->attach(id, params_->layout(), s_.config_hash(), g.num_nodes(), g.local_size());
  } catch (const std::exception& e) {
    LOOM_WARN("snapshots disabled: " << e.what());
    ok = false;
  }
  if (!s_.all_ok(ok)) {
    if (ok) LOOM_WARN0("snapshots disabled: another rank could not attach to its snapshot daemon");
    snap_.reset();
    return;
  }
  setup_erasure_coding();
}

Trainer::EcSpan Trainer::ec_span(int node) const {
  const int nodes = s_.groups().num_nodes();
  const int g = static_cast<int>(std::min<int64_t>(cfg_.ec_group, nodes));
  const int first = node / g * g;
  return EcSpan{first, std::min(g, nodes - first), node - first};
}

// Every daemon learns its EC group's members (their TCP endpoints travel over MPI from the trainers).
void Trainer::setup_erasure_coding() {
  ProcessGroups& g = s_.groups();
  if (cfg_.ec_parity <= 0 || g.num_nodes() < 2) return;
  struct Endpoint {
    int32_t node, port;
    char host[120];
  };
  Endpoint mine{g.node_id(), snap_->ec_port(), {}};
  std::snprintf(mine.host, sizeof mine.host, "%s", g.emulated_nodes() ? "127.0.0.1" : snap_->ec_host().c_str());
  std::vector<Endpoint> all(static_cast<size_t>(g.world_size()));
  MPI_Allgather(&mine, sizeof(Endpoint), MPI_BYTE, all.data(), sizeof(Endpoint), MPI_BYTE, MPI_COMM_WORLD);
  std::map<int, std::string> by_node;
  for (const Endpoint& e : all) by_node[e.node] = std::string(e.host) + ":" + std::to_string(e.port);
  const EcSpan span = ec_span(g.node_id());
  bool ok = true;
  if (g.local_rank() == 0 && span.size >= 2) {
    std::vector<std::string> peers;
    for (int n = span.first; n < span.first + span.size; ++n) peers.push_back(by_node[n]);
    try {
      snap_->configure_ec(span.size, static_cast<int>(cfg_.ec_parity), span.index, peers, cfg_.ec_every);
    } catch (const std::exception& e) {
      LOOM_WARN("erasure coding disabled on node " << g.node_id() << ": " << e.what());
      ok = false;
    }
  }
  if (s_.all_ok(ok))
    LOOM_INFO0("erasure coding: groups of " << std::min<int64_t>(cfg_.ec_group, g.num_nodes()) << " nodes, parity "
                                            << cfg_.ec_parity << ", every " << cfg_.ec_every << " version(s)");
}

bool Trainer::rebuild_from_ec() {
  ProcessGroups& g = s_.groups();
  if (!snap_ || cfg_.ec_parity <= 0 || g.num_nodes() < 2) return false;
  constexpr int kSlots = 4;
  // Per rank: node, intact in-memory versions; per node (its first rank): versions with complete parity.
  std::vector<int64_t> mine(2 + 2 * kSlots, -1);
  mine[0] = g.node_id();
  mine[1] = g.local_rank();
  bool ok = true;
  try {
    auto avail = snap_->query();
    int i = 0;
    for (auto& a : avail)
      if (a.crc_ok && i < kSlots) mine[static_cast<size_t>(2 + i++)] = a.version;
    if (g.local_rank() == 0) {
      auto parity = snap_->ec_versions();
      for (size_t j = 0; j < parity.size() && j < static_cast<size_t>(kSlots); ++j) mine[2 + kSlots + j] = parity[j];
    }
  } catch (const std::exception& e) {
    LOOM_WARN("cannot ask the snapshot daemon about erasure coding: " << e.what());
    ok = false;
  }
  if (!s_.all_ok(ok)) return false;
  const size_t row = mine.size();
  std::vector<int64_t> all(row * static_cast<size_t>(g.world_size()));
  MPI_Allgather(mine.data(), static_cast<int>(row), MPI_INT64_T, all.data(), static_cast<int>(row), MPI_INT64_T,
                MPI_COMM_WORLD);
  // node -> versions held intact by every rank of the node; node -> versions with complete parity.
  std::map<int, std::set<int64_t>> held, parity;
  std::map<int, int> ranks_seen;
  std::set<int64_t> candidates;
  for (int r = 0; r < g.world_size(); ++r) {
    const int64_t* x = all.data() + row * static_cast<size_t>(r);
    const int node = static_cast<int>(x[0]);
    std::set<int64_t> vs;
    for (int i = 0; i < kSlots; ++i)
      if (x[2 + i] >= 0) vs.insert(x[2 + i]);
    candidates.insert(vs.begin(), vs.end());
    if (ranks_seen[node]++ == 0) {
      held[node] = vs;
    } else {
      std::set<int64_t> both;
      for (int64_t v : vs)
        if (held[node].count(v)) both.insert(v);
      held[node] = both;
    }
    if (x[1] == 0)
      for (int i = 0; i < kSlots; ++i)
        if (x[2 + kSlots + i] >= 0) parity[node].insert(x[2 + kSlots + i]);
  }
  if (candidates.empty()) return false;  // nothing in memory anywhere: a fresh job
  std::string why = "no lost node can be rebuilt";
  for (auto it = candidates.rbegin(); it != candidates.rend(); ++it) {
    const int64_t v = *it;
    std::vector<int> lost;
    for (int n = 0; n < g.num_nodes(); ++n)
      if (!held[n].count(v)) lost.push_back(n);
    if (lost.empty()) continue;
    bool recoverable = true;
    for (int first = 0; first < g.num_nodes() && recoverable;) {
      const EcSpan span = ec_span(first);
      std::vector<int> lost_here;
      for (int n : lost)
        if (n >= span.first && n < span.first + span.size) lost_here.push_back(n - span.first);
      if (!lost_here.empty()) {
        const ec::GroupLayout layout(span.size, static_cast<int>(cfg_.ec_parity));
        if (span.size < 2 || !layout.recoverable(lost_here)) {
          recoverable = false;
          why = std::to_string(lost_here.size()) + " of the " + std::to_string(span.size) + " nodes of EC group " +
                std::to_string(span.first / std::max(1, span.size)) + " lost their snapshots of step " +
                std::to_string(v) + "; parity covers " + std::to_string(layout.tolerated_losses());
        }
        for (int n = span.first; n < span.first + span.size && recoverable; ++n)
          if (!std::count(lost.begin(), lost.end(), n) && !parity[n].count(v)) {
            recoverable = false;
            why = "node " + std::to_string(n) + " has no complete parity of step " + std::to_string(v);
          }
      }
      first = span.first + span.size;
    }
    if (!recoverable) continue;
    std::string names;
    for (int n : lost) names += (names.empty() ? "" : ", ") + std::to_string(n);
    LOOM_INFO0("node(s) " << names << " lost their snapshots: rebuilding step " << v << " from the erasure-coded group");
    bool rebuilt = true;
    if (g.local_rank() == 0 && std::count(lost.begin(), lost.end(), g.node_id())) {
      try {
        snap_->rebuild(v);
      } catch (const std::exception& e) {
        LOOM_WARN("rebuild of node " << g.node_id() << " from the EC group failed: " << e.what());
        rebuilt = false;
      }
    }
    if (s_.all_ok(rebuilt)) return true;
    why = "the rebuild failed";
  }
  LOOM_WARN0("cannot rebuild from erasure coding: " << why << "; falling back to HDF5");
  return false;
}

void Trainer::restore() {
  if (restore_from_memory()) return;
  if (rebuild_from_ec() && restore_from_memory()) return;
  if (restore_from_hdf5()) return;
  LOOM_INFO0("no snapshot to resume from: starting at step 0");
}

bool Trainer::restore_from_memory() {
  // Each rank offers up to three (version, CRC ok) pairs; the newest version every rank holds intact wins.
  constexpr int kSlots = snap::kBuffers;
  std::vector<int64_t> mine(2 * kSlots, -1);
  std::vector<snap::SnapshotClient::Available> avail;
  bool query_ok = true;
  if (snap_) {
    try {
      avail = snap_->query();
    } catch (const std::exception& e) {
      LOOM_WARN("cannot list in-memory snapshots: " << e.what());
      query_ok = false;
    }
  }
  for (size_t i = 0; i < avail.size() && i < static_cast<size_t>(kSlots); ++i) {
    mine[2 * i] = avail[i].version;
    mine[2 * i + 1] = avail[i].crc_ok ? 1 : 0;
    if (!avail[i].crc_ok)
      LOOM_WARN("in-memory snapshot of step " << avail[i].version << " of rank " << s_.rank() << " (tp "
                                              << s_.groups().tp_rank() << ", dp " << s_.groups().dp_rank()
                                              << ") fails its CRC check; falling back");
  }
  if (!s_.all_ok(snap_ != nullptr && query_ok)) return false;
  const int world = s_.world_size();
  std::vector<int64_t> all(static_cast<size_t>(2 * kSlots * world));
  MPI_Allgather(mine.data(), 2 * kSlots, MPI_INT64_T, all.data(), 2 * kSlots, MPI_INT64_T, MPI_COMM_WORLD);
  std::map<int64_t, int> intact;  // version -> ranks holding it intact
  for (int r = 0; r < world; ++r)
    for (int i = 0; i < kSlots; ++i) {
      const int64_t v = all[static_cast<size_t>(2 * kSlots * r + 2 * i)];
      if (v >= 0 && all[static_cast<size_t>(2 * kSlots * r + 2 * i + 1)] == 1) ++intact[v];
    }
  for (auto it = intact.rbegin(); it != intact.rend(); ++it) {
    if (it->second != world) continue;
    const int64_t v = it->first;
    int buffer = -1;
    for (auto& a : avail)
      if (a.version == v) buffer = a.buffer;
    const int64_t b = snap_->identity().slice_begin, e = snap_->identity().slice_end;
    bool ok = buffer >= 0 && snap_->load(buffer, params_->master().flat_range(b, e), params_->adam_m().flat_range(b, e),
                                         params_->adam_v().flat_range(b, e));
    if (!ok) LOOM_WARN("in-memory snapshot of step " << v << " of rank " << s_.rank() << " changed since its CRC was taken");
    if (!s_.all_ok(ok)) continue;  // an older version then
    finish_restore(v);
    resumed_from_ = "memory";
    LOOM_INFO0("resumed from the in-memory snapshot of step " << v << " (every rank's shared memory)");
    return true;
  }
  if (!intact.empty())
    LOOM_WARN0("in-memory snapshots exist but no step is intact on every rank (a node was lost or memory is corrupt)");
  return false;
}

bool Trainer::restore_from_hdf5() {
  const std::string& dir = s_.snapshot_options().dir;
  if (dir.empty()) return false;
  std::vector<int64_t> versions;
  if (s_.is_root()) {
    try {
      versions = snap::complete_versions(dir);
    } catch (const std::exception& e) {
      LOOM_WARN("cannot list HDF5 snapshots in " << dir << ": " << e.what());
    }
  }
  int64_t count = static_cast<int64_t>(versions.size());
  MPI_Bcast(&count, 1, MPI_INT64_T, 0, MPI_COMM_WORLD);
  versions.resize(static_cast<size_t>(count));
  MPI_Bcast(versions.data(), static_cast<int>(count), MPI_INT64_T, 0, MPI_COMM_WORLD);
  // Newest first; a version of another model (other parameters or shapes) in the same folder is passed over.
  // Every rank assembles the global tensors and takes its own shard: this also loads a snapshot written at
  // another TP or DP size (resharding).
  for (int64_t version : versions) {
    bool ok = true, incompatible = false;
    try {
      snap::GlobalState state = snap::load_global(dir, version);
      const int64_t P = params_->padded_numel();
      std::vector<float> master(static_cast<size_t>(P), 0.0f), m(master.size(), 0.0f), v(master.size(), 0.0f);
      snap::fill_slice(state, params_->layout(), 0, P, master.data(), m.data(), v.data());
      Backend& be = s_.backend();
      be.upload(params_->master(), master.data());
      be.upload(params_->adam_m(), m.data());
      be.upload(params_->adam_v(), v.data());
    } catch (const Error& e) {
      ok = false;
      incompatible = e.kind() == ErrorKind::kSnapshot;
      if (!incompatible) LOOM_WARN("cannot load HDF5 snapshot " << version << " from " << dir << ": " << e.what());
    }
    if (!s_.all_ok(ok)) {
      if (incompatible) LOOM_INFO0("HDF5 snapshot " << version << " in " << dir << " is of another model; passed over");
      continue;
    }
    params_->sync_compute_from_master();
    optimizer_->set_steps_taken(version);
    step_ = version;
    resumed_from_ = "hdf5";
    LOOM_INFO0("resumed from the HDF5 snapshot of step " << version << " in " << dir);
    return true;
  }
  return false;
}

void Trainer::finish_restore(int64_t version) {
  ProcessGroups& g = s_.groups();
  if (g.dp_size() > 1) {
    const int64_t b = snap_->identity().slice_begin, e = snap_->identity().slice_end;
    for (const Tensor& region : {params_->master(), params_->adam_m(), params_->adam_v()})
      g.dp().all_gather(region, region.flat_range(b, e));
  }
  params_->sync_compute_from_master();
  optimizer_->set_steps_taken(version);
  step_ = version;
}

void Trainer::end_step(const StepStats& last) {
  if (snap_ && step_ % cfg_.snapshot_every == 0) {
    const int64_t b = snap_->identity().slice_begin, e = snap_->identity().slice_end;
    snap_->stage(step_, params_->master().flat_range(b, e), params_->adam_m().flat_range(b, e),
                 params_->adam_v().flat_range(b, e));
  }
  if (step_ % cfg_.probe_every == 0)
    for (auto& p : probes_) p->run();
  if (mon::MonitorClient* m = s_.monitor()) {
    m->set_progress(step_, last.loss, last.tokens_per_s);
    if (snap_ && step_ % cfg_.snapshot_every == 0) m->set_snapshot(step_);
  }
  inject_fault(last.step_time_s);
}

void Trainer::inject_fault(double step_time_s) {
  const int64_t epoch = cfg_.epoch;
  const double since_start = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  for (size_t i = 0; i < faults_.size(); ++i) {
    const TrainConfig::FaultSpec& f = faults_[i];
    if (s_.rank() != f.rank || (f.epoch >= 0 && f.epoch != epoch) || step_ < f.step) continue;
    // The step it hits at: fault_step itself (a step before it resumed past it: never), or with fault_after_s
    // the first step from fault_step on that ends late enough.
    int64_t& hit = fault_hit_step_[i];
    if (hit < 0 && (cfg_.fault_after_s > 0 ? since_start >= cfg_.fault_after_s : step_ == f.step)) hit = step_;
    if (hit < 0) continue;
    if (f.kind == "slow") {  // every step from the hit on
      if (step_ == hit) LOOM_WARN("fault injection: rank " << s_.rank() << " slows down by " << cfg_.fault_slowdown * 100
                                                         << " % from step " << step_ << " at unix time " << fault_clock());
      std::this_thread::sleep_for(std::chrono::duration<double>(cfg_.fault_slowdown * step_time_s));
      continue;
    }
    if (step_ != hit) continue;
    if (f.kind == "crash") {
      LOOM_WARN("fault injection: rank " << s_.rank() << " crashes (SIGKILL) after step " << step_ << " at unix time "
                                         << fault_clock());
      ::kill(::getpid(), SIGKILL);
    }
    if (f.kind == "kill_daemon") {
      const int pid = snap::daemon_pid(snap::daemon_socket_path(s_.snapshot_options().job, s_.groups().node_id()));
      LOOM_WARN("fault injection: killing the snapshot daemon of node " << s_.groups().node_id() << " (pid " << pid
                                                                         << ") after step " << step_);
      if (pid > 0) ::kill(pid, SIGKILL);
    }
    if (f.kind == "hang") {
      LOOM_WARN("fault injection: rank " << s_.rank() << " hangs outside communication after step " << step_
                                         << " at unix time " << fault_clock());
      for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    if (f.kind == "hang_comm") {
      LOOM_WARN("fault injection: rank " << s_.rank() << " will hang inside its next collective after step " << step_
                                         << " at unix time " << fault_clock());
      process_comm_faults().arm_hang();
    }
    if (f.kind == "slow_link") {
      const int peer = slow_link_peer();
      LOOM_WARN("fault injection: transfers from rank " << s_.rank() << " to rank " << peer << " are delayed by "
                                                        << cfg_.fault_delay_ms << " ms from step " << step_
                                                        << " at unix time " << fault_clock());
      process_comm_faults().set_slow_link(peer, cfg_.fault_delay_ms * 1e-3);
    }
  }
}

int Trainer::slow_link_peer() const {
  if (cfg_.fault_peer >= 0) return static_cast<int>(cfg_.fault_peer);
  const ProcessGroups& g = s_.groups();
  const int r = s_.rank(), tp = g.tp_size();
  if (tp > 1) return r - g.tp_rank() + (g.tp_rank() + 1) % tp;
  return (r + tp) % s_.world_size();
}

std::string Trainer::fault_clock() {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f", wall_clock_s());
  return buf;
}

void Trainer::open_data() {
  ProcessGroups& g = s_.groups();
  const std::string cache = cfg_.cache_dir.empty() ? default_cache_dir() : cfg_.cache_dir;
  const bool is_bin = cfg_.dataset.size() > 4 && cfg_.dataset.compare(cfg_.dataset.size() - 4, 4, ".bin") == 0;
  std::string path;
  // The default corpus and text files are tokenized once per node (by its first rank) into the cache; the
  // other ranks then open the cached token file.
  auto resolve = [&] {
    if (cfg_.dataset == "fortunes") {
      path = default_corpus_path(cache);
    } else if (is_bin) {
      path = cfg_.dataset;
    } else {
      path = cached_text_corpus_path(cfg_.dataset, cache);
    }
  };
  s_.agree([&] {
    if (g.local_rank() == 0) resolve();
  });
  g.node().barrier();
  s_.agree([&] {
    if (g.local_rank() != 0) resolve();
    data_.emplace(TokenFile::open(path, static_cast<int>(cfg_.token_bytes)));
    sampler_ = std::make_unique<BatchSampler>(*data_, model_.seq_len(), cfg_.batch_size,
                                              static_cast<uint64_t>(cfg_.seed), cfg_.val_fraction);
    sampler_->check_vocab(model_.vocab_size());
  });
  LOOM_INFO0("data: " << path << " (" << data_->size() << " tokens, vocab " << data_->vocab_size() << ")");
}

Tensor Trainer::run_batch(Split split, int64_t step, bool train) {
  Backend& be = s_.backend();
  const int64_t T = model_.seq_len();
  const int64_t accum = local_batch_ / micro_batch_;
  const int64_t first = s_.groups().dp_rank() * local_batch_;
  std::vector<int32_t> inputs(static_cast<size_t>(micro_batch_ * T)), targets(inputs.size());
  be.fill(loss_sum_, 0.0f);
  for (int64_t m = 0; m < accum; ++m) {
    arena_->reset();
    sampler_->fill(split, step, first + m * micro_batch_, micro_batch_, inputs.data(), targets.data());
    Tensor tok = arena_->allocate(Shape{micro_batch_, T}, DType::kI32);
    Tensor tgt = arena_->allocate(Shape{micro_batch_, T}, DType::kI32);
    be.upload(tok, inputs.data());
    be.upload(tgt, targets.data());
    std::optional<Tape> tape;
    if (train) tape.emplace(*arena_, params_.get());
    Ctx c(be, *arena_, train ? &*tape : nullptr);
    Tensor loss = model_.loss(c, tok, tgt);
    LOOM_CHECK(loss.numel() == 1 && loss.dtype() == DType::kF32, kShape,
               "LanguageModel::loss must return a one-element f32 tensor, got " << loss.describe());
    if (train) tape->backward(loss, 1.0f / static_cast<float>(accum));
    be.axpy(loss_sum_, loss.detach(), 1.0f / static_cast<float>(accum), true);
  }
  // Mean over data-parallel ranks (TP ranks hold the same loss).
  if (s_.groups().dp_size() > 1) s_.groups().dp().all_reduce(loss_sum_, ReduceOp::kSum);
  be.axpy(loss_sum_, loss_sum_, 1.0f / static_cast<float>(s_.groups().dp_size()), false);
  return loss_sum_;
}

StepStats Trainer::train_step() {
  auto t0 = std::chrono::steady_clock::now();
  ProcessGroups& g = s_.groups();
  Backend& be = s_.backend();
  params_->zero_grads();
  Tensor loss = run_batch(Split::kTrain, step_, true);
  if (g.dp_size() > 1) g.dp().all_reduce(params_->grads(), ReduceOp::kSum);
  if (g.tp_size() > 1) {
    // Replicated parameters (norm weights) must stay identical on every TP rank: average their gradients.
    for (const ParamGroup& pg : params_->groups()) {
      if (!pg.tp_replicated) continue;
      Tensor r = params_->grads().flat_range(pg.offset, pg.offset + pg.count);
      g.tp().all_reduce(r, ReduceOp::kSum);
      be.axpy(r, r, 1.0f / static_cast<float>(g.tp_size()), false);
    }
  }
  const double lr = schedule_.at(step_);
  std::optional<CommReducer> tp_reduce;
  if (g.tp_size() > 1) tp_reduce.emplace(g.tp());
  // The optimizer overwrites master/m/v: it must come after the copy of the last snapshot (the stall, if any).
  if (snap_) snapshot_stall_s_ += snap_->fence();
  optimizer_->step(lr, 1.0 / static_cast<double>(g.dp_size()), tp_reduce ? &*tp_reduce : nullptr);
  StepStats st;
  ++step_;
  st.loss = be.read_scalar(loss);
  st.grad_norm = optimizer_->last_grad_norm();
  st.step = step_;
  st.lr = lr;
  st.step_time_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  st.tokens_per_s = static_cast<double>(cfg_.batch_size * model_.seq_len()) / st.step_time_s;
  LOOM_CHECK(std::isfinite(st.loss), kData,
             "the training loss became " << st.loss << " at step " << step_ << "; lower train.lr or check the data");
  return st;
}

double Trainer::evaluate(int64_t batches) {
  double total = 0;
  for (int64_t b = 0; b < batches; ++b) total += s_.backend().read_scalar(run_batch(Split::kVal, b, false));
  arena_->reset();
  return batches > 0 ? total / static_cast<double>(batches) : 0.0;
}

void Trainer::write_metrics(const StepStats& s) {
  if (!metrics_.is_open()) return;
  char line[256];
  std::snprintf(line, sizeof line,
                "{\"step\":%lld,\"loss\":%.9g,\"lr\":%.6g,\"grad_norm\":%.6g,\"step_time_s\":%.6f,"
                "\"tokens_per_s\":%.1f,\"elapsed_s\":%.3f}\n",
                static_cast<long long>(s.step), s.loss, s.lr, s.grad_norm, s.step_time_s, s.tokens_per_s,
                log::uptime_s());
  metrics_ << line << std::flush;
}

double Trainer::fit() {
  if (s_.is_root() && !cfg_.metrics_file.empty()) {
    // A resumed run appends, so the file holds the whole run (steps after the snapshot appear twice; the later
    // line is the one that counts).
    metrics_.open(cfg_.metrics_file, std::ios::out | (step_ > 0 ? std::ios::app : std::ios::trunc));
    LOOM_CHECK(metrics_.is_open(), kIo, "cannot open train.metrics_file '" << cfg_.metrics_file << "' for writing");
  }
  LOOM_INFO0("training for " << cfg_.steps - step_ << " steps");
  if (mon::MonitorClient* m = s_.monitor()) m->set_start_step(step_);
  const auto start = std::chrono::steady_clock::now();
  const int64_t first = step_;
  StepStats last;
  while (step_ < cfg_.steps) {
    last = train_step();
    // The step's metrics line is written before its snapshot is staged: a run resumed from that snapshot never
    // repeats the step, so its line must already be in the file.
    write_metrics(last);
    end_step(last);
    const bool log_now = last.step % cfg_.log_every == 0 || last.step == cfg_.steps || last.step == first + 1;
    if (s_.is_root() && log_now) {
      double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      double avg = elapsed / static_cast<double>(last.step - first);
      char buf[256];
      std::snprintf(buf, sizeof buf,
                    "step %lld/%lld | loss %.4f | lr %.2e | grad norm %.3f | %s tok/s | %.3f s/step | ETA %s",
                    static_cast<long long>(last.step), static_cast<long long>(cfg_.steps), last.loss, last.lr,
                    last.grad_norm, format_rate(last.tokens_per_s).c_str(), last.step_time_s,
                    format_duration(avg * static_cast<double>(cfg_.steps - last.step)).c_str());
      LOOM_INFO(buf);
    }
    if (cfg_.eval_every > 0 && last.step % cfg_.eval_every == 0 && last.step != cfg_.steps) {
      double v = evaluate(cfg_.eval_batches);
      LOOM_INFO0("step " << last.step << " | validation loss " << v);
      if (metrics_.is_open()) {
        char line[96];
        std::snprintf(line, sizeof line, "{\"event\":\"eval\",\"step\":%lld,\"val_loss\":%.6f}\n",
                      static_cast<long long>(last.step), v);
        metrics_ << line << std::flush;
      }
    }
  }
  if (snap_) {
    snap_->finish();
    LOOM_INFO0("snapshots: " << snap_->staged_versions() << " staged; optimizer waited " << snapshot_stall_s_
                             << " s for them in total");
    if (snap_->staged_versions() > 0) {  // read by bench/snapshot_bench.sh
      const double gb = static_cast<double>(snap_->identity().buffer_bytes()) / 1e9;
      const double per_version_s = snap_->copy_seconds() / static_cast<double>(snap_->staged_versions());
      LOOM_INFO0("snapshots: " << gb << " GB per version, copied in " << per_version_s << " s on average ("
                               << gb / per_version_s << " GB/s, rank 0)");
    }
  }
  std::string val;
  if (cfg_.eval_batches > 0) {
    double v = evaluate(cfg_.eval_batches);
    LOOM_INFO0("final validation loss " << v << " over " << cfg_.eval_batches << " batches");
    char buf[48];
    std::snprintf(buf, sizeof buf, ",\"val_loss\":%.6f", v);
    val = buf;
  }
  if (s_.is_root()) {
    char done[200];
    std::snprintf(done, sizeof done, "{\"event\":\"done\",\"steps\":%lld,\"final_loss\":%.6f%s}",
                  static_cast<long long>(step_), last.loss, val.c_str());
    std::cout << done << std::endl;
  }
  return last.loss;
}

}  // namespace loom
