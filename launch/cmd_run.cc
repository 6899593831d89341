// loom run: the self-healing launcher. Starts the job's monitor (in this process), runs the program under
// mpirun with the monitor's address, job id, token and epoch in its environment, and watches. On a verdict it
// aborts the job (SIGTERM to mpirun's process group; SIGKILL when that does not end it within --abort-timeout),
// excludes the faulty node and brings in a spare, then runs mpirun again with the next epoch; the trainers resume
// from their snapshots. At the end it prints what happened: faults, detection times, steps and time lost.
//
// Nodes: with --hostfile, real hosts ("host slots=N" lines): the first ones the ranks need are active, up to
// --spares of the rest are spares; each incarnation gets a hostfile of the active hosts. Without a hostfile, the
// nodes are emulated on this machine (--ranks-per-node, passed to the ranks as LOOM_RANKS_PER_NODE): an
// excluded emulated node loses what a dead machine loses (its snapshot daemon and its ranks' shared memory),
// and a fresh one takes its place, so the restart must rebuild that node's snapshots from the EC group.
// Without a spare left, the faulty node stays in (the fault may have been transient) and the launcher says so.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/client.h"
#include "checkpoint/segment.h"
#include "core/error.h"
#include "launch/commands.h"
#include "launch/monitor/json.h"
#include "launch/monitor/server.h"

namespace loom::cli {
namespace {

std::atomic<int> g_signal{0};
void on_signal(int s) { g_signal.store(s); }

void run_usage(std::ostream& os) {
  os << "usage: loom run --np N [options] -- PROGRAM [ARGS...]\n"
        "  --np N                 ranks (mpirun -np)\n"
        "  --hostfile F           real hosts, 'host slots=K' per line; without it nodes are emulated here\n"
        "  --ranks-per-node R     emulated nodes of R ranks (default: $LOOM_RANKS_PER_NODE, else 1)\n"
        "  --spares N             spare nodes to bring in for excluded ones (default 0)\n"
        "  --max-restarts N       give up after N restarts (default 3)\n"
        "  --job ID               job id of the monitor and the snapshots (default run-<pid>)\n"
        "  --monitor-port P       the monitor's port (default: any free one)\n"
        "  --verdict-dir D        where verdicts are written (default ./verdicts)\n"
        "  --abort-timeout S      seconds to wait after SIGTERM before SIGKILL (default 5)\n"
        "  --heartbeat-s S        heartbeat interval of the ranks (default 1)\n"
        "  --summary-file F       also write the summary as JSON\n"
        "  mpirun is $LOOM_MPIRUN if set (e.g. 'mpirun --oversubscribe'), else 'mpirun'.\n";
}

std::string random_token() {
  std::ifstream f("/dev/urandom", std::ios::binary);
  unsigned char b[12] = {0};
  f.read(reinterpret_cast<char*>(b), sizeof b);
  std::string out;
  char hex[3];
  for (unsigned char c : b) {
    std::snprintf(hex, sizeof hex, "%02x", c);
    out += hex;
  }
  return out;
}

std::vector<std::string> split_words(const std::string& s) {
  std::istringstream is(s);
  std::vector<std::string> out;
  for (std::string w; is >> w;) out.push_back(w);
  return out;
}

struct Host {
  std::string name;
  int slots = 1;
};

std::vector<Host> read_hostfile(const std::string& path) {
  std::ifstream f(path);
  LOOM_CHECK(f, kConfig, "loom run: cannot read the hostfile '" << path << "'");
  std::vector<Host> hosts;
  for (std::string line; std::getline(f, line);) {
    line = line.substr(0, line.find('#'));
    auto w = split_words(line);
    if (w.empty()) continue;
    Host h{w[0], 1};
    for (size_t i = 1; i < w.size(); ++i)
      if (w[i].rfind("slots=", 0) == 0) h.slots = std::atoi(w[i].c_str() + 6);
    LOOM_CHECK(h.slots > 0, kConfig, "loom run: host '" << h.name << "' in " << path << " has no slots");
    hosts.push_back(h);
  }
  LOOM_CHECK(!hosts.empty(), kConfig, "loom run: the hostfile '" << path << "' lists no hosts");
  return hosts;
}

double now_s() { return mon::wall_now_s(); }

struct Incarnation {
  int64_t epoch = 0;
  double started = 0, ended = 0;
  int64_t start_step = -1, max_step = 0;
  double resumed_at = 0;    // first progress past start_step
  double caught_up_at = 0;  // reached the previous incarnation's max step again
  std::string outcome;      // done | verdict | failed
  std::optional<mon::Verdict> verdict;
  std::string excluded, replacement;
  int exit_status = 0;
};

// Kills mpirun's process group: SIGTERM, then SIGKILL after timeout_s. Returns true when SIGKILL was needed.
bool abort_job(pid_t pid, double timeout_s, int* status) {
  ::kill(-pid, SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (std::chrono::steady_clock::now() < deadline) {
    if (::waitpid(pid, status, WNOHANG) == pid) {
      ::kill(-pid, SIGKILL);  // stragglers of the group, if any
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ::kill(-pid, SIGKILL);
  ::waitpid(pid, status, 0);
  return true;
}

// The snapshot job id the program will use: its --snapshot-job flag, else $LOOM_SNAPSHOT_JOB (which we set).
std::string snapshot_job_of(const std::vector<std::string>& prog, const std::string& fallback) {
  for (size_t i = 0; i + 1 < prog.size(); ++i)
    if (prog[i] == "--snapshot-job") return prog[i + 1];
  if (const char* e = std::getenv("LOOM_SNAPSHOT_JOB")) return e;
  return fallback;
}

// What a dead machine loses: the emulated node's snapshot daemon and its ranks' shared memory.
void retire_emulated_node(const std::string& snap_job, int node, int ranks_per_node) {
  const std::string sock = snap::daemon_socket_path(snap_job, node);
  const int pid = snap::daemon_pid(sock);
  if (pid > 0) ::kill(pid, SIGKILL);
  for (int r = node * ranks_per_node; r < (node + 1) * ranks_per_node; ++r)
    snap::SnapshotSegment::unlink(snap::segment_name(snap_job, r));
}

}  // namespace

int cmd_run(int argc, char** argv) {
  int np = 0, spares = 0, max_restarts = 3, ranks_per_node = 0, monitor_port = 0;
  double abort_timeout = 5, heartbeat = 1;
  std::string hostfile, job, verdict_dir = "verdicts", summary_file;
  std::vector<std::string> prog;
  auto need = [&](int& i, const char* flag) -> std::string {
    LOOM_CHECK(i + 1 < argc, kConfig, "loom run: " << flag << " needs a value");
    return argv[++i];
  };
  auto integer = [&](const std::string& v, const char* flag) {
    char* end = nullptr;
    long x = std::strtol(v.c_str(), &end, 10);
    LOOM_CHECK(!v.empty() && *end == 0 && x >= 0, kConfig, "loom run: " << flag << " wants a count, got '" << v << "'");
    return static_cast<int>(x);
  };
  auto number = [&](const std::string& v, const char* flag) {
    char* end = nullptr;
    double x = std::strtod(v.c_str(), &end);
    LOOM_CHECK(!v.empty() && *end == 0 && x > 0, kConfig, "loom run: " << flag << " wants a positive number, got '" << v << "'");
    return x;
  };
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--") {
      for (int j = i + 1; j < argc; ++j) prog.push_back(argv[j]);
      break;
    }
    if (a == "--np") np = integer(need(i, a.c_str()), "--np");
    else if (a == "--hostfile") hostfile = need(i, "--hostfile");
    else if (a == "--ranks-per-node") ranks_per_node = integer(need(i, a.c_str()), "--ranks-per-node");
    else if (a == "--spares") spares = integer(need(i, a.c_str()), "--spares");
    else if (a == "--max-restarts") max_restarts = integer(need(i, a.c_str()), "--max-restarts");
    else if (a == "--job") job = need(i, "--job");
    else if (a == "--monitor-port") monitor_port = integer(need(i, a.c_str()), "--monitor-port");
    else if (a == "--verdict-dir") verdict_dir = need(i, "--verdict-dir");
    else if (a == "--abort-timeout") abort_timeout = number(need(i, a.c_str()), "--abort-timeout");
    else if (a == "--heartbeat-s") heartbeat = number(need(i, a.c_str()), "--heartbeat-s");
    else if (a == "--summary-file") summary_file = need(i, "--summary-file");
    else if (a == "-h" || a == "--help") {
      run_usage(std::cout);
      return 0;
    } else {
      std::cerr << "loom run: unknown option '" << a << "'\n";
      run_usage(std::cerr);
      return 2;
    }
  }
  LOOM_CHECK(!prog.empty(), kConfig, "loom run: no program given (loom run --np N -- PROGRAM ARGS)");
  LOOM_CHECK(np > 0, kConfig, "loom run: --np N (the number of ranks) is required");
  if (job.empty()) job = "run-" + std::to_string(::getpid());

  // Nodes: active ones and spares.
  std::vector<Host> active, spare_pool;
  const bool emulated = hostfile.empty();
  if (emulated) {
    if (ranks_per_node == 0) {
      const char* e = std::getenv("LOOM_RANKS_PER_NODE");
      ranks_per_node = e ? std::atoi(e) : 1;
    }
    LOOM_CHECK(ranks_per_node > 0 && np % ranks_per_node == 0, kConfig,
               "loom run: --np " << np << " is not a multiple of --ranks-per-node " << ranks_per_node);
  } else {
    std::vector<Host> hosts = read_hostfile(hostfile);
    int have = 0;
    size_t i = 0;
    for (; i < hosts.size() && have < np; ++i) {
      active.push_back(hosts[i]);
      have += hosts[i].slots;
    }
    LOOM_CHECK(have >= np, kConfig, "loom run: the hostfile has " << have << " slots for " << np << " ranks");
    for (; i < hosts.size() && static_cast<int>(spare_pool.size()) < spares; ++i) spare_pool.push_back(hosts[i]);
    LOOM_CHECK(static_cast<int>(spare_pool.size()) == spares, kConfig,
               "loom run: --spares " << spares << " but the hostfile has only " << spare_pool.size()
                                     << " hosts beyond the ones the ranks need");
  }
  const int nodes = emulated ? np / ranks_per_node : static_cast<int>(active.size());
  int spares_left = spares;
  int next_spare_id = 0;

  mon::MonitorOptions mo;
  mo.job = job;
  mo.token = random_token();
  mo.port = monitor_port;
  mo.verdict_dir = verdict_dir;
  mo.engine.heartbeat_s = heartbeat;
  mon::MonitorServer monitor(mo);
  monitor.start();
  char hostname[256] = {0};
  ::gethostname(hostname, sizeof hostname - 1);
  const std::string address = (emulated ? std::string("127.0.0.1") : std::string(hostname)) + ":" +
                              std::to_string(monitor.port());
  const std::string snap_job = snapshot_job_of(prog, job);
  std::cout << "loom run: job " << job << ", " << np << " ranks on " << nodes << (emulated ? " emulated" : "")
            << " node(s), " << spares << " spare(s); monitor on " << address << " (status page http://" << hostname
            << ":" << monitor.port() << "/)" << std::endl;

  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  std::vector<std::string> mpirun = split_words(std::getenv("LOOM_MPIRUN") ? std::getenv("LOOM_MPIRUN") : "mpirun");
  std::vector<Incarnation> runs;
  const std::string tmp_hostfile = (std::filesystem::temp_directory_path() / (job + ".hosts")).string();
  int exit_code = 1;

  for (int64_t epoch = 0;; ++epoch) {
    monitor.begin_epoch(epoch);
    Incarnation inc;
    inc.epoch = epoch;
    inc.started = now_s();
    // The command line.
    std::vector<std::string> cmd = mpirun;
    cmd.insert(cmd.end(), {"-np", std::to_string(np)});
    for (const char* v : {"LOOM_MONITOR", "LOOM_MONITOR_JOB", "LOOM_MONITOR_TOKEN", "LOOM_EPOCH", "LOOM_HEARTBEAT_S",
                          "LOOM_SNAPSHOT_JOB"})
      cmd.insert(cmd.end(), {"-x", v});
    if (emulated) {
      cmd.insert(cmd.end(), {"-x", "LOOM_RANKS_PER_NODE"});
    } else {
      std::ofstream hf(tmp_hostfile);
      for (const Host& h : active) hf << h.name << " slots=" << h.slots << "\n";
      cmd.insert(cmd.end(), {"--hostfile", tmp_hostfile});
    }
    cmd.insert(cmd.end(), prog.begin(), prog.end());
    std::cout << "loom run: epoch " << epoch << ": starting";
    if (!emulated) {
      std::cout << " on";
      for (const Host& h : active) std::cout << " " << h.name;
    }
    std::cout << std::endl;
    std::cout.flush();
    std::fflush(stderr);

    const pid_t pid = ::fork();
    LOOM_CHECK(pid >= 0, kIo, "loom run: fork failed: " << std::strerror(errno));
    if (pid == 0) {
      ::setpgid(0, 0);
      ::setenv("LOOM_MONITOR", address.c_str(), 1);
      ::setenv("LOOM_MONITOR_JOB", job.c_str(), 1);
      ::setenv("LOOM_MONITOR_TOKEN", mo.token.c_str(), 1);
      ::setenv("LOOM_EPOCH", std::to_string(epoch).c_str(), 1);
      ::setenv("LOOM_HEARTBEAT_S", std::to_string(heartbeat).c_str(), 1);
      if (!std::getenv("LOOM_SNAPSHOT_JOB")) ::setenv("LOOM_SNAPSHOT_JOB", snap_job.c_str(), 1);
      if (emulated) ::setenv("LOOM_RANKS_PER_NODE", std::to_string(ranks_per_node).c_str(), 1);
      std::vector<char*> args;
      for (std::string& s : cmd) args.push_back(s.data());
      args.push_back(nullptr);
      ::execvp(args[0], args.data());
      std::fprintf(stderr, "loom run: cannot run %s: %s\n", args[0], std::strerror(errno));
      std::_Exit(127);
    }
    ::setpgid(pid, pid);

    // Watch.
    int status = 0;
    bool exited = false;
    const int64_t prev_max = runs.empty() ? 0 : runs.back().max_step;
    while (!exited && !inc.verdict && !g_signal.load()) {
      if (::waitpid(pid, &status, WNOHANG) == pid) {
        exited = true;
        break;
      }
      inc.verdict = monitor.wait_verdict(0.1);
      auto p = monitor.progress();
      if (p.start_step >= 0 && inc.start_step < 0) inc.start_step = p.start_step;
      inc.max_step = std::max(inc.max_step, p.max_step);
      if (inc.start_step >= 0 && inc.resumed_at == 0 && p.min_step > inc.start_step) inc.resumed_at = now_s();
      if (epoch > 0 && inc.caught_up_at == 0 && p.min_step >= prev_max && prev_max > 0) inc.caught_up_at = now_s();
    }
    if (exited && WIFEXITED(status) && WEXITSTATUS(status) == 0) {
      inc.outcome = "done";
      inc.ended = now_s();
      runs.push_back(inc);
      std::cout << "loom run: epoch " << epoch << " finished" << std::endl;
      exit_code = 0;
      break;
    }
    if (g_signal.load()) {
      abort_job(pid, abort_timeout, &status);
      inc.outcome = "interrupted";
      inc.ended = now_s();
      runs.push_back(inc);
      std::cout << "loom run: interrupted; job aborted" << std::endl;
      exit_code = 130;
      break;
    }
    if (exited && !inc.verdict) inc.verdict = monitor.wait_verdict(2.0);  // the monitor may still be deciding
    if (!exited) {
      const bool hard = abort_job(pid, abort_timeout, &status);
      std::cout << "loom run: job aborted" << (hard ? " (SIGKILL: it did not end within the abort timeout)" : "")
                << std::endl;
    }
    inc.ended = now_s();
    inc.exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (!inc.verdict) {
      inc.outcome = "failed";
      std::cout << "loom run: mpirun exited with status " << inc.exit_status << " and the monitor named no culprit"
                << std::endl;
    } else {
      inc.outcome = "verdict";
      std::cout << "loom run: verdict " << inc.verdict->kind << ": " << inc.verdict->summary << std::endl;
    }
    if (inc.verdict && inc.verdict->kind == "error") {
      runs.push_back(inc);
      std::cout << "loom run: a rank stopped with an error; restarting would repeat it, so the run ends here"
                << std::endl;
      break;
    }
    if (static_cast<int>(runs.size()) >= max_restarts) {
      runs.push_back(inc);
      std::cout << "loom run: giving up after " << max_restarts << " restart(s) (--max-restarts)" << std::endl;
      break;
    }
    // Exclude the faulty node, bring in a spare.
    const int bad = inc.verdict ? inc.verdict->node : -1;
    if (bad >= 0 && bad < nodes) {
      if (spares_left > 0) {
        --spares_left;
        if (emulated) {
          retire_emulated_node(snap_job, bad, ranks_per_node);
          inc.excluded = "emulated node " + std::to_string(bad);
          inc.replacement = "spare s" + std::to_string(next_spare_id++) + " (fresh daemon and memory)";
        } else {
          inc.excluded = active[static_cast<size_t>(bad)].name;
          const Host spare = spare_pool.front();
          spare_pool.erase(spare_pool.begin());
          active[static_cast<size_t>(bad)] = spare;
          inc.replacement = spare.name;
        }
        std::cout << "loom run: excluding " << inc.excluded << "; " << inc.replacement << " takes its place"
                  << std::endl;
      } else {
        std::cout << "loom run: no spare left: node " << bad << " stays in (the fault may have been transient)"
                  << std::endl;
      }
    }
    runs.push_back(inc);
    std::cout << "loom run: restarting (epoch " << epoch + 1 << "); the ranks resume from their snapshots"
              << std::endl;
  }
  monitor.stop();
  std::filesystem::remove(tmp_hostfile);

  // Summary.
  std::vector<std::string> faults;
  double lost_time = 0;
  int64_t lost_steps = 0;
  std::cout << "\nloom run: summary of job " << job << "\n";
  std::printf("  %-5s %-9s %-10s %-34s %-9s %-9s %-10s %-9s\n", "epoch", "outcome", "fault", "culprit", "detect s",
              "steps", "lost steps", "lost s");
  for (size_t i = 0; i < runs.size(); ++i) {
    const Incarnation& r = runs[i];
    std::string fault = "-", culprit = "-", detect = "-", lsteps = "-", ltime = "-";
    int64_t steps_lost = 0;
    double time_lost = 0;
    if (r.verdict) {
      fault = r.verdict->kind;
      culprit = r.verdict->link_src >= 0
                    ? "link " + std::to_string(r.verdict->link_src) + "->" + std::to_string(r.verdict->link_dst)
                    : "rank " + std::to_string(r.verdict->ranks.empty() ? -1 : r.verdict->ranks[0]);
      culprit += " node " + std::to_string(r.verdict->node);
      char b[32];
      std::snprintf(b, sizeof b, "%.2f", r.verdict->detected_at - r.verdict->onset);
      detect = b;
      if (i + 1 < runs.size() && runs[i + 1].start_step >= 0) {
        steps_lost = std::max<int64_t>(0, r.max_step - runs[i + 1].start_step);
        lsteps = std::to_string(steps_lost);
        if (runs[i + 1].caught_up_at > 0) {
          time_lost = runs[i + 1].caught_up_at - r.verdict->onset;
          std::snprintf(b, sizeof b, "%.1f", time_lost);
          ltime = b;
        }
      }
      lost_steps += steps_lost;
      lost_time += time_lost;
      faults.push_back(mon::JsonObject()
                           .num("epoch", r.epoch).str("kind", r.verdict->kind).str("summary", r.verdict->summary)
                           .raw("ranks", mon::json_int_array(r.verdict->ranks)).num("node", r.verdict->node)
                           .num("detection_s", r.verdict->detected_at - r.verdict->onset)
                           .num("steps_lost", steps_lost).num("time_lost_s", time_lost)
                           .str("excluded", r.excluded).str("replacement", r.replacement).done());
    }
    std::printf("  %-5lld %-9s %-10s %-34s %-9s %-9s %-10s %-9s\n", static_cast<long long>(r.epoch), r.outcome.c_str(),
                fault.c_str(), culprit.c_str(), detect.c_str(),
                (std::to_string(std::max<int64_t>(r.start_step, 0)) + "-" + std::to_string(r.max_step)).c_str(),
                lsteps.c_str(), ltime.c_str());
  }
  const double total = runs.empty() ? 0 : runs.back().ended - runs.front().started;
  std::printf("  %zu fault(s), %lld step(s) redone, %.1f s lost of %.1f s; %s\n", faults.size(),
              static_cast<long long>(lost_steps), lost_time, total, exit_code == 0 ? "finished" : "NOT finished");
  if (!summary_file.empty()) {
    std::ofstream f(summary_file);
    f << mon::JsonObject()
             .str("job", job).boolean("finished", exit_code == 0).num("restarts", static_cast<int64_t>(runs.size()) - 1)
             .raw("faults", mon::json_array(faults)).num("steps_lost", lost_steps).num("time_lost_s", lost_time)
             .num("wall_s", total).done()
      << "\n";
  }
  return exit_code;
}

}  // namespace loom::cli
