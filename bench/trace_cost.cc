// What the monitor adds to every collective on the thread that issues it: the cost of one TraceRing
// begin()/end() pair with run-queue accounting off (how every rank runs without a monitor) and on (with a
// monitor: two reads of /proc/thread-self/schedstat), and of one thread_run_delay_s() read alone.
//
// Protocol: one thread, no other work of ours; per variant 20 000 warm-up pairs, then 9 repeats of 200 000 pairs,
// each timed with the steady clock; reported: the median ns per pair (and the min and max of the repeats). The
// peer in the same run is the accounting-off pair: "added_ns" = on − off is what a monitor costs per collective.
// bench/monitor_bench.py multiplies it by the collectives per step it reads from the monitor.
//   trace_cost [--json FILE]     (prints the JSON object to stdout as well)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "parallel/trace.h"

namespace {

struct Figure {
  double median_ns, min_ns, max_ns;
};

template <class Body>
Figure time_per_op(Body&& body) {
  constexpr int kWarm = 20000, kOps = 200000, kRepeats = 9;
  for (int i = 0; i < kWarm; ++i) body();
  std::vector<double> ns;
  for (int r = 0; r < kRepeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < kOps; ++i) body();
    ns.push_back(std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / kOps);
  }
  std::sort(ns.begin(), ns.end());
  return {ns[ns.size() / 2], ns.front(), ns.back()};
}

std::string json(const char* name, const Figure& f) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "\"%s\": {\"median_ns\": %.1f, \"min_ns\": %.1f, \"max_ns\": %.1f}", name,
                f.median_ns, f.min_ns, f.max_ns);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  std::string out;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) {
      out = argv[++i];
    } else {
      std::fprintf(stderr, "usage: trace_cost [--json FILE]\n");
      return 2;
    }
  }
  if (loom::thread_run_delay_s() < 0) {
    std::fprintf(stderr, "trace_cost: this kernel does not report run-queue delay (/proc/thread-self/schedstat)\n");
    return 1;
  }
  loom::TraceRing ring(4096);
  auto pair = [&] { ring.end(ring.begin(loom::CollectiveOp::kAllReduce, 1, -1, 1024)); };
  loom::set_run_delay_accounting(false);
  const Figure off = time_per_op(pair);
  loom::set_run_delay_accounting(true);
  const Figure on = time_per_op(pair);
  volatile double sink = 0;
  const Figure read = time_per_op([&] { sink = sink + loom::thread_run_delay_s(); });
  char added[64];
  std::snprintf(added, sizeof added, "\"added_ns\": %.1f", on.median_ns - off.median_ns);
  const std::string j = "{\"benchmark\": \"trace_cost\", " + json("pair_accounting_off", off) + ", " +
                        json("pair_accounting_on", on) + ", " + json("schedstat_read", read) + ", " + added + "}";
  std::printf("%s\n", j.c_str());
  if (!out.empty()) std::ofstream(out) << j << "\n";
  return 0;
}
