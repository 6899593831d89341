#include "launch/monitor/engine.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "core/error.h"
#include "launch/monitor/json.h"

namespace loom::mon {
namespace {

const char* group_name(uint32_t id) {
  switch (id) {
    case 0: return "world";
    case 1: return "tp";
    case 2: return "dp";
    case 3: return "node";
  }
  return "group";
}

// The median of `sorted` with one element equal to x left out (x must be in it): the median of the others,
// without copying them.
double median_without(const std::vector<double>& sorted, double x) {
  const size_t skip = static_cast<size_t>(std::lower_bound(sorted.begin(), sorted.end(), x) - sorted.begin());
  const size_t m = sorted.size() - 1;
  if (m == 0) return 0;
  auto at = [&](size_t j) { return sorted[j < skip ? j : j + 1]; };
  return m % 2 ? at(m / 2) : 0.5 * (at(m / 2 - 1) + at(m / 2));
}

std::string ms(double s) {
  std::ostringstream os;
  os.precision(3);
  os << s * 1e3 << " ms";
  return os.str();
}

}  // namespace

std::string Verdict::to_json(const std::string& job, int64_t epoch) const {
  JsonObject o;
  o.str("kind", kind).str("summary", summary).str("job", job).num("epoch", epoch).raw("ranks", json_int_array(ranks));
  o.num("node", node).str("host", host);
  if (link_src >= 0) o.raw("link", JsonObject().num("src", link_src).num("dst", link_dst).done());
  o.num("onset", onset).num("detected_at", detected_at).num("detection_s", detected_at - onset);
  o.raw("evidence", evidence);
  return o.done();
}

VerdictEngine::VerdictEngine(EngineConfig cfg) : cfg_(cfg) {}

void VerdictEngine::hello(const RankView& info, double now) {
  RankView& r = ranks_[info.rank];
  r = info;
  r.connected = true;
  r.hello_at = r.last_heartbeat = r.last_progress = now;
}

void VerdictEngine::heartbeat(int rank, const MonMessage& m, double now) {
  auto it = ranks_.find(rank);
  LOOM_CHECK(it != ranks_.end(), kComm, "HEARTBEAT from rank " << rank << " before its HELLO");
  // Parse everything first, so a malformed message changes nothing.
  const int64_t step = m.i64("step"), snapshot = m.i64("snapshot");
  const int64_t start = m.has("start") ? m.i64("start") : -1;
  const double loss = m.f64("loss"), tps = m.f64("tokens_per_s"), busy = m.f64("busy_s"), wall = m.f64("wall_s");
  const double runq = m.has("runq_s") ? m.f64("runq_s") : std::numeric_limits<double>::quiet_NaN();
  const auto launched = static_cast<uint64_t>(m.i64("launched")), completed = static_cast<uint64_t>(m.i64("completed"));
  const TransferState xfer = decode_transfer(m.get("xfer"));
  const std::vector<LinkStats> links = decode_links(m.get("links"));
  const std::vector<LinkStats> probes = m.has("probes") ? decode_links(m.get("probes")) : std::vector<LinkStats>{};
  RankView& r = it->second;
  if (completed > r.completed) r.last_progress = now;
  r.step = step;
  r.start_step = start;
  r.snapshot = snapshot;
  r.loss = loss;
  r.tokens_per_s = tps;
  r.launched = launched;
  r.completed = completed;
  r.side_open = m.has("side_open") ? static_cast<uint64_t>(m.i64("side_open")) : 0;
  r.busy_s = busy;
  r.wall_s = wall;
  r.runq_s = runq;
  r.xfer = xfer;
  r.last_heartbeat = now;
  if (r.win_wall < 0) {
    r.win_busy = busy;
    r.win_wall = wall;
    r.win_runq = runq;
  }
  for (auto [in, window] : {std::pair{&links, &window_links_}, std::pair{&probes, &window_probes_}})
    for (const LinkStats& l : *in) {
      LinkStats& w = (*window)[{l.src, rank}];
      w.src = l.src;
      w.transfers += l.transfers;
      w.bytes += l.bytes;
      w.sum_s += l.sum_s;
      w.max_s = std::max(w.max_s, l.max_s);
    }
}

VerdictEngine::LinkPick VerdictEngine::pick_slow_link(const std::map<std::pair<int, int>, double>& means) const {
  auto node = [&](int r) {
    auto it = ranks_.find(r);
    return it == ranks_.end() ? -1 : it->second.node;
  };
  LinkPick best;
  double best_ratio = 0;
  for (const bool cross : {false, true}) {
    std::vector<double> times;  // of the class
    std::pair<int, int> top{-1, -1};
    double worst = 0;
    for (const auto& [p, m] : means) {
      if ((node(p.first) != node(p.second)) != cross) continue;
      times.push_back(m);
      if (top.first < 0 || m > worst) {
        top = p;
        worst = m;
      }
    }
    if (times.size() < 2) continue;
    std::sort(times.begin(), times.end());
    const double med = median_without(times, worst);
    if (worst < cfg_.slow_link_factor * med || worst - med < cfg_.slow_link_min_s) continue;
    const double ratio = med > 0 ? worst / med : std::numeric_limits<double>::infinity();
    if (ratio > best_ratio) {
      best_ratio = ratio;
      best = LinkPick{top, worst, med};
    }
  }
  return best;
}

void VerdictEngine::trace(int rank, const std::vector<TraceRecord>& recs, double now, bool truncated) {
  (void)now;
  auto it = ranks_.find(rank);
  LOOM_CHECK(it != ranks_.end(), kComm, "TRACE from rank " << rank << " before its HELLO");
  RankView& r = it->second;
  if (truncated) r.last_end = 0;
  std::vector<TraceRecord> done;
  for (const TraceRecord& t : recs)
    if (t.end_s > 0) done.push_back(t);
  std::sort(done.begin(), done.end(), [](const TraceRecord& a, const TraceRecord& b) { return a.end_s < b.end_s; });
  for (const TraceRecord& t : done) {
    if (r.last_end > 0 && t.end_s >= r.last_end) {
      gaps_.push_back(t.end_s - r.last_end);
      if (gaps_.size() > 4096) gaps_.pop_front();
    }
    r.last_end = std::max(r.last_end, t.end_s);
    LatencyCell& c = latency_[std::string(group_name(t.group_id)) + " " + collective_op_name(t.op)][rank];
    c.count += 1;
    c.sum_s += t.end_s - t.start_s;
  }
}

void VerdictEngine::bye(int rank, const std::string& reason, const std::string& message, double now) {
  auto it = ranks_.find(rank);
  if (it == ranks_.end()) return;
  it->second.bye = true;
  it->second.bye_reason = reason;
  it->second.bye_message = message;
  it->second.last_heartbeat = now;
}

void VerdictEngine::disconnect(int rank, double now) {
  auto it = ranks_.find(rank);
  if (it == ranks_.end() || !it->second.connected) return;
  it->second.connected = false;
  it->second.disconnected_at = now;
}

bool VerdictEngine::any_bye() const {
  for (const auto& [r, v] : ranks_)
    if (v.bye) return true;
  return false;
}

void VerdictEngine::monitor_stalled(double seconds) {
  if (seconds <= 0) return;
  for (auto& [r, info] : ranks_) {
    info.last_heartbeat += seconds;
    info.last_progress += seconds;
  }
}

double VerdictEngine::p99_gap_s() const {
  if (gaps_.empty()) return 0;
  std::vector<double> g(gaps_.begin(), gaps_.end());
  const size_t k = std::min(g.size() - 1, static_cast<size_t>(std::ceil(0.99 * static_cast<double>(g.size()))) - 1);
  std::nth_element(g.begin(), g.begin() + static_cast<std::ptrdiff_t>(k), g.end());
  return g[k];
}

double VerdictEngine::hang_threshold_s() const {
  return std::max(cfg_.hang_min_s, cfg_.hang_factor * p99_gap_s());
}

std::optional<Verdict> VerdictEngine::tick(double now) {
  if (verdict_) return std::nullopt;
  std::optional<Verdict> v = check_crash(now);
  if (!v) v = check_hang(now);
  if (!v) {
    if (window_start_ < 0) window_start_ = now;
    if (now - window_start_ >= cfg_.window_s) v = close_window(now);
  }
  if (v) {
    v->detected_at = now;
    if (v->node < 0 && v->ranks.size() == 1 && ranks_.count(v->ranks[0])) v->node = ranks_[v->ranks[0]].node;
    if (v->host.empty() && v->node >= 0)
      for (const auto& [r, info] : ranks_)
        if (info.node == v->node) v->host = info.host;
    verdict_ = v;
  }
  return v;
}

std::optional<Verdict> VerdictEngine::check_crash(double now) {
  // A rank that said BYE with an error: the job failed deterministically.
  for (const auto& [r, info] : ranks_) {
    if (info.bye && info.bye_reason == "error") {
      Verdict v;
      v.kind = "error";
      v.ranks = {r};
      v.onset = info.last_heartbeat;
      v.summary = "rank " + std::to_string(r) + " stopped with an error: " + info.bye_message;
      v.evidence = JsonObject().str("message", info.bye_message).done();
      return v;
    }
  }
  // Lost ranks: closed without BYE, or silent too long. A silent rank was lost when its next heartbeat was due.
  const double silence = cfg_.silence_factor * cfg_.heartbeat_s;
  double first = 0;
  int first_rank = -1;
  bool late = false;  // a rank whose heartbeat is overdue but not yet past the silence limit
  std::vector<std::string> lost;
  for (const auto& [r, info] : ranks_) {
    if (info.bye) continue;
    double at = 0;
    std::string how;
    if (!info.connected) {
      at = info.disconnected_at;
      how = "connection closed";
    } else if (now - info.last_heartbeat > silence) {
      at = info.last_heartbeat + cfg_.heartbeat_s;
      how = "heartbeats stopped";
    } else {
      late = late || now - info.last_heartbeat > 1.2 * cfg_.heartbeat_s;
      continue;
    }
    lost.push_back(JsonObject().num("rank", r).num("node", info.node).str("how", how).num("at", at)
                       .num("last_heartbeat", info.last_heartbeat).done());
    if (first_rank < 0 || at < first) {
      first = at;
      first_rank = r;
    }
  }
  // When one process dies, mpirun kills the others a moment later; a rank that went silent may have died first,
  // so the verdict waits until every overdue rank is either back or past the silence limit.
  if (late) return std::nullopt;
  // Every rank silent at once with every connection open: the machine or the network stalled, not one rank.
  bool any_closed = false, any_alive = false;
  for (const auto& [r, info] : ranks_) {
    if (info.bye) continue;
    any_closed = any_closed || !info.connected;
    any_alive = any_alive || (info.connected && now - info.last_heartbeat <= silence);
  }
  if (!lost.empty() && !any_closed && !any_alive) return std::nullopt;
  if (first_rank < 0 || now - first < cfg_.crash_grace_s) return std::nullopt;
  // A rank that never reached the monitor while others were lost died first (before its HELLO).
  int world = 0, local_size = 0;
  for (const auto& [r, info] : ranks_) {
    world = std::max(world, info.world);
    local_size = std::max(local_size, info.local_size);
  }
  for (int r = 0; r < world; ++r) {
    if (ranks_.count(r)) continue;
    Verdict v;
    v.kind = "crash";
    v.ranks = {r};
    // Nodes hold consecutive ranks (mpirun's default placement, emulated nodes).
    v.node = local_size > 0 ? r / local_size : -1;
    v.onset = first;
    v.summary = "rank " + std::to_string(r) + " never reached the monitor and the others were lost after it (node " +
                std::to_string(v.node) + ", assuming nodes of " + std::to_string(local_size) + " consecutive ranks)";
    v.evidence = JsonObject().raw("lost", json_array(lost)).num("never_connected", r).done();
    return v;
  }
  const RankView& info = ranks_[first_rank];
  Verdict v;
  v.kind = "crash";
  v.ranks = {first_rank};
  v.node = info.node;
  v.onset = info.connected ? info.last_heartbeat : info.disconnected_at;
  std::ostringstream s;
  s << "rank " << first_rank << " (node " << info.node << ", " << info.host << ") "
    << (info.connected ? "stopped sending heartbeats" : "exited (connection closed without BYE)") << "; "
    << lost.size() << " rank(s) lost in all";
  v.summary = s.str();
  v.evidence = JsonObject().raw("lost", json_array(lost)).num("grace_s", cfg_.crash_grace_s).done();
  return v;
}

std::optional<Verdict> VerdictEngine::check_hang(double now) {
  if (ranks_.empty() || any_bye() || static_cast<int>(gaps_.size()) < cfg_.hang_min_samples) return std::nullopt;
  for (const auto& [r, info] : ranks_)
    if (info.completed == 0) return std::nullopt;  // not all ranks past start-up yet
  const double threshold = hang_threshold_s();
  bool hung = false, stale = false;
  for (const auto& [r, info] : ranks_) {
    hung = hung || now - info.last_progress > threshold;
    // Localising needs every rank's current counters: a late heartbeat would name a rank by stale ones (a hung
    // rank's heartbeat thread goes on, so a real hang still gets fresh ones).
    stale = stale || now - info.last_heartbeat > 1.2 * cfg_.heartbeat_s;
  }
  if (!hung || stale) return std::nullopt;
  return localise_hang(now, threshold);
}

std::optional<Verdict> VerdictEngine::localise_hang(double now, double threshold) {
  uint64_t lo = UINT64_MAX, hi = 0;
  double onset = now;
  std::vector<std::string> states;
  for (const auto& [r, info] : ranks_) {
    lo = std::min(lo, info.launched);
    hi = std::max(hi, info.launched);
    onset = std::min(onset, info.last_progress);
    JsonObject st;
    st.num("rank", r).num("launched", static_cast<double>(info.launched))
        .num("completed", static_cast<double>(info.completed)).num("since_progress_s", now - info.last_progress);
    if (info.xfer.active)
      st.raw("transfer", JsonObject().str("group", group_name(info.xfer.group_id))
                             .num("seq", static_cast<double>(info.xfer.seq)).num("step", info.xfer.step)
                             .num("recv_src", info.xfer.recv_src).num("send_dst", info.xfer.send_dst)
                             .boolean("recv_done", info.xfer.recv_done).done());
    states.push_back(st.done());
  }
  Verdict v;
  v.kind = "hang";
  v.onset = onset;
  JsonObject ev;
  ev.num("threshold_s", threshold).num("p99_gap_s", p99_gap_s()).raw("ranks", json_array(states));
  // Stuck outside communication: fewest launched, nothing in flight.
  if (lo < hi) {
    for (const auto& [r, info] : ranks_)
      if (info.launched == lo && info.completed == info.launched && info.side_open == 0) v.ranks.push_back(r);
    if (!v.ranks.empty()) {
      std::ostringstream s;
      s << "rank(s) ";
      for (size_t i = 0; i < v.ranks.size(); ++i) s << (i ? "," : "") << v.ranks[i];
      s << " stopped outside communication: " << lo << " collectives launched against up to " << hi
        << " on the others, no progress for " << now - onset << " s (threshold " << threshold << " s)";
      v.summary = s.str();
      int node = ranks_[v.ranks[0]].node;
      for (int r : v.ranks)
        if (ranks_[r].node != node) node = -1;
      v.node = node;
      v.evidence = ev.str("where", "outside communication").done();
      return v;
    }
  }
  // Inside a collective: the stalled pair.
  const RankView* best_dst = nullptr;
  for (const auto& [d, dv] : ranks_) {
    if (!dv.xfer.active || dv.xfer.recv_done) continue;
    auto s = ranks_.find(dv.xfer.recv_src);
    if (s == ranks_.end()) continue;
    const TransferState& sx = s->second.xfer;
    if (sx.active && sx.group_id == dv.xfer.group_id && sx.seq == dv.xfer.seq && sx.step == dv.xfer.step &&
        sx.recv_done && (!best_dst || dv.xfer.since_s < best_dst->xfer.since_s))
      best_dst = &dv;
  }
  if (best_dst) {
    v.link_src = best_dst->xfer.recv_src;
    v.link_dst = best_dst->rank;
    v.ranks = {v.link_src, v.link_dst};
    const int ns = ranks_[v.link_src].node, nd = ranks_[v.link_dst].node;
    v.node = ns;  // the sending side is the one that stopped
    std::ostringstream s;
    s << "hang inside a " << group_name(best_dst->xfer.group_id) << " collective (seq " << best_dst->xfer.seq
      << ", ring step " << best_dst->xfer.step << "): link " << v.link_src << " -> " << v.link_dst << " (node " << ns
      << " -> node " << nd << ") stalled; rank " << v.link_src << " has its input but never sent";
    v.summary = s.str();
    v.evidence = ev.str("where", "inside a collective").done();
    return v;
  }
  // No transfer-level evidence (a device collective, or a barrier): every rank in flight is named.
  for (const auto& [r, info] : ranks_)
    if (info.completed < info.launched) v.ranks.push_back(r);
  v.summary = "the job stopped making progress inside collectives (no transfer-level evidence to name a link)";
  v.evidence = ev.str("where", "inside a collective, unlocalised").done();
  return v;
}

double VerdictEngine::slow_noise() const {
  return noise2_ > 0 ? std::sqrt(noise2_) : 0.0;
}

double VerdictEngine::slow_rank_threshold() const {
  // Without run-queue reports from every rank (another kernel, an older client) the scheduler's noise is in the
  // fractions: the floor measured for that case.
  const double floor = runq_reported_ ? cfg_.slow_rank_gap : cfg_.slow_rank_gap_without_runq;
  return std::max(floor, cfg_.slow_noise_factor * slow_noise());
}

std::optional<Verdict> VerdictEngine::close_window(double now) {
  const double span = now - window_start_;
  window_start_ = now;
  // Slow rank: the fraction of its time each rank spent waiting over the window: inside collectives, and
  // runnable outside them while the host ran something else — the latter only when every rank reported it for
  // the whole window (one definition of waiting for all, or none). The run-queue part may be negative: a
  // collective in flight at a heartbeat counted its wait so far as outside, and takes it back when it ends.
  std::map<int, double> frac, runq_frac;
  bool progressing = true, all_runq = true;
  for (auto& [r, info] : ranks_) {
    const double wall = info.wall_s - info.win_wall;
    if (info.win_wall >= 0 && wall > 0.5 * span) {
      frac[r] = (info.busy_s - info.win_busy) / wall;
      if (!std::isnan(info.runq_s) && !std::isnan(info.win_runq))
        runq_frac[r] = (info.runq_s - info.win_runq) / wall;
      else
        all_runq = false;
    }
    if (now - info.last_progress > span) progressing = false;
    info.win_busy = info.busy_s;
    info.win_wall = info.wall_s;
    info.win_runq = info.runq_s;
  }
  if (!all_runq) runq_frac.clear();
  for (auto& [r, f] : frac) f = std::clamp(f + (all_runq ? runq_frac[r] : 0.0), 0.0, 1.0);
  runq_reported_ = all_runq && !frac.empty();
  double threshold = 0;  // set below once the noise is known; a candidate exists only then
  std::optional<Verdict> out;
  int candidate = -1;
  double gap = 0, below_base = 0;
  std::map<int, double> dev;  // rank -> its fraction minus the median of the others'
  if (progressing && frac.size() >= 2 && frac.size() == ranks_.size()) {
    std::vector<double> sorted;
    for (auto& [r, f] : frac) sorted.push_back(f);
    std::sort(sorted.begin(), sorted.end());
    for (auto& [r, f] : frac) dev[r] = f - median_without(sorted, f);
    last_frac_ = frac;
    last_runq_ = runq_frac;
    last_dev_ = dev;
    ++rank_windows_seen_;
    const int learned = rank_windows_seen_ - 1;  // baseline windows so far (the first window is start-up)
    const bool have_base = learned > cfg_.slow_baseline_windows;
    if (have_base && noise2_ < 0) {  // the baseline windows' residuals, pooled over the ranks
      double m2 = 0;
      for (auto& [r, v] : dev_m2_) m2 += v;
      const int dof = static_cast<int>(dev_m2_.size()) * (cfg_.slow_baseline_windows - 1);
      noise2_ = dof > 0 ? m2 / dof : 0;
    }
    // Against its own baseline (once learned), or the median of the others for a rank slow from the start.
    threshold = slow_rank_threshold();
    double worst = 0;
    if (have_base)
      for (auto& [r, d] : dev)
        if (dev_base_[r] - d >= threshold && dev_base_[r] - d > worst) worst = dev_base_[r] - d, candidate = r;
    for (auto& [r, d] : dev)
      if (candidate < 0 && -d >= cfg_.slow_rank_abs_gap && -d > worst) worst = -d, candidate = r;
    if (candidate >= 0) {
      gap = -dev[candidate];
      below_base = have_base ? dev_base_[candidate] - dev[candidate] : 0;
    }
    if (learned >= 1 && !have_base) {  // running mean and squared residuals over the baseline windows
      for (auto& [r, d] : dev) {
        const double before = d - dev_base_[r];
        dev_base_[r] += before / learned;
        dev_m2_[r] += before * (d - dev_base_[r]);
      }
    } else if (have_base && candidate < 0) {
      double sq = 0;
      for (auto& [r, d] : dev) {
        sq += (d - dev_base_[r]) * (d - dev_base_[r]);
        dev_base_[r] += cfg_.slow_baseline_follow * (d - dev_base_[r]);
      }
      noise2_ += cfg_.slow_baseline_follow * (sq / static_cast<double>(dev.size()) - noise2_);
    }
  }
  if (candidate >= 0 && candidate == rank_candidate_) {
    ++rank_streak_;
  } else {
    rank_streak_ = candidate >= 0 ? 1 : 0;
    rank_windows_.clear();
  }
  rank_candidate_ = candidate;
  if (candidate >= 0) {
    JsonObject w, q, base;
    for (auto& [r, f] : frac) w.num(std::to_string(r), f);
    for (auto& [r, f] : runq_frac) q.num(std::to_string(r), f);
    for (auto& [r, d] : dev_base_) base.num(std::to_string(r), d);
    rank_windows_.push_back(JsonObject()
                                .num("end", now)
                                .num("gap", gap)
                                .num("below_baseline", below_base)
                                .num("threshold", threshold)
                                .raw("comm_fraction", w.done())
                                .raw("run_queue", q.done())
                                .raw("baseline_deviation", base.done())
                                .done());
  }
  if (candidate >= 0 && rank_streak_ >= cfg_.slow_windows) {
    Verdict v;
    v.kind = "slow_rank";
    v.ranks = {candidate};
    v.onset = now - cfg_.slow_windows * span;
    std::ostringstream s;
    s.precision(3);
    s << "rank " << candidate << " is slow: in " << rank_streak_ << " windows of " << span
      << " s it spent the least time waiting (" << frac[candidate] * 100 << " % of its time, "
      << gap * 100 << " points below the median of the others";
    if (below_base > 0)
      s << ", " << below_base * 100 << " below its own baseline, threshold " << threshold * 100;
    s << "): the others wait for it";
    v.summary = s.str();
    v.evidence = JsonObject().raw("windows", json_array(rank_windows_)).done();
    out = v;
  }
  // Slow link: the pairwise matrices of mean transfer times, the ring's and the link probes' (transfers of other
  // sizes: never compared with each other), each pair against the others of its class (within a node, between
  // nodes: different links); the ring's first.
  auto window_means = [](std::map<std::pair<int, int>, LinkStats>& window) {
    std::map<std::pair<int, int>, double> means;
    for (auto& [pair, l] : window)
      if (l.transfers >= 3) means[pair] = l.sum_s / static_cast<double>(l.transfers);
    window.clear();
    return means;
  };
  const std::map<std::pair<int, int>, double> ring_means = window_means(window_links_),
                                              probe_means = window_means(window_probes_);
  last_link_means_ = ring_means;
  last_link_means_.insert(probe_means.begin(), probe_means.end());  // pairs only the probes measured
  const LinkPick ring_pick = pick_slow_link(ring_means);
  const bool by_probe = ring_pick.pair.first < 0;
  const auto [lc, worst, med] = by_probe ? pick_slow_link(probe_means) : ring_pick;
  const std::map<std::pair<int, int>, double>& means = by_probe ? probe_means : ring_means;
  if (lc.first >= 0 && lc == link_candidate_) {
    ++link_streak_;
  } else {
    link_streak_ = lc.first >= 0 ? 1 : 0;
    link_windows_.clear();
  }
  link_candidate_ = lc;
  if (lc.first >= 0) {
    std::vector<std::string> cells;
    for (auto& [p, m] : means)
      cells.push_back(JsonObject().num("src", p.first).num("dst", p.second).num("mean_s", m).done());
    link_windows_.push_back(
        JsonObject().num("end", now).str("source", by_probe ? "probes" : "ring").raw("pairs", json_array(cells)).done());
  }
  if (!out && lc.first >= 0 && link_streak_ >= cfg_.slow_windows) {
    Verdict v;
    v.kind = "slow_link";
    v.link_src = lc.first;
    v.link_dst = lc.second;
    v.ranks = {lc.first, lc.second};
    v.node = ranks_[lc.first].node;
    v.onset = now - cfg_.slow_windows * span;
    std::ostringstream s;
    s << "link " << lc.first << " -> " << lc.second << " (node " << ranks_[lc.first].node << " -> node "
      << ranks_[lc.second].node << ") is slow: mean " << (by_probe ? "probe " : "") << "transfer " << ms(worst)
      << " against a median of " << ms(med) << " for the other pairs "
      << (ranks_[lc.first].node == ranks_[lc.second].node ? "within a node" : "between nodes") << ", in "
      << link_streak_ << " consecutive windows";
    v.summary = s.str();
    v.evidence = JsonObject().raw("windows", json_array(link_windows_)).done();
    out = v;
  }
  return out;
}

}  // namespace loom::mon
