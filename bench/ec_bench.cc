// Erasure-coding throughput of the snapshot code (checkpoint/erasure.h) on one core: ISA-L's Reed-Solomon
// (loom::ec::ReedSolomon) against a plain GF(2^8) table-multiply implementation of the same code
// (loom::ec::plain::ReedSolomon, the "peer"), in the same run on the same buffers.
//
// Protocol:
//   - Data: --mib MiB (default 64) of random bytes (fixed seed) split into k data fragments of
//     floor(MiB / k / 64) * 64 bytes each, in page-aligned buffers that are written before timing (no page faults
//     in the timed calls). Shapes: k = 2..8, p = 1, 2.
//   - Encode: the p parity fragments from the k data fragments. Reconstruct: the first p data fragments are lost
//     (the expensive case: data must be decoded, not just re-encoded) and rebuilt from the remaining k - p data
//     and the p parity fragments. ISA-L's decode tables are cached per loss pattern, so its timed calls reuse
//     them (as the daemon does); the peer inverts its k x k matrix on every call (microseconds, negligible).
//   - Timing: per (implementation, operation, k, p), --warmup calls (default 2) then --repeat timed calls (default
//     11), std::chrono::steady_clock around each call; the figure is the median. Throughput = k * fragment bytes
//     / median seconds, in GB/s (1e9 B/s) of data: data encoded, or data covered by the stripe being rebuilt.
//   - One thread, the calling one (ISA-L's kernels are single-threaded): the figures are per core.
//   - Checks: ISA-L's parity equals the peer's byte for byte, and each reconstruction equals the original
//     fragments; a mismatch prints it and exits with status 1.
//   - Output: a table on stdout and JSON (--json PATH, default bench/results/ec.json) with the machine
//     (/proc/cpuinfo model name, core count, the SIMD flags ISA-L can dispatch on), the protocol and the results.
//
//   ec_bench [--json PATH] [--mib M] [--warmup W] [--repeat R]
#include <isa-l.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/erasure.h"
#include "core/error.h"
#include "core/rng.h"

namespace {

using loom::ec::ReedSolomon;
namespace plain = loom::ec::plain;

struct Options {
  std::string json = "bench/results/ec.json";
  size_t mib = 64;
  int warmup = 2;
  int repeat = 11;
};

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      LOOM_CHECK(i + 1 < argc, kConfig, a << " needs a value");
      return argv[++i];
    };
    if (a == "--json") {
      o.json = value();
    } else if (a == "--mib") {
      o.mib = std::stoul(value());
    } else if (a == "--warmup") {
      o.warmup = std::stoi(value());
    } else if (a == "--repeat") {
      o.repeat = std::stoi(value());
    } else {
      LOOM_THROW(kConfig, "unknown argument '" << a
                                               << "'; usage: ec_bench [--json PATH] [--mib M] [--warmup W] "
                                                  "[--repeat R]");
    }
  }
  LOOM_CHECK(o.mib >= 1 && o.warmup >= 0 && o.repeat >= 1, kConfig,
             "need --mib >= 1, --warmup >= 0, --repeat >= 1; got " << o.mib << ", " << o.warmup << ", " << o.repeat);
  return o;
}

// A page-aligned byte buffer (the daemon's shared-memory blobs are page-aligned too).
class Buffer {
 public:
  explicit Buffer(size_t bytes) : bytes_(bytes) {
    void* p = std::aligned_alloc(4096, (std::max<size_t>(bytes, 1) + 4095) / 4096 * 4096);
    LOOM_CHECK(p != nullptr, kIo, "cannot allocate " << bytes << " bytes");
    data_.reset(static_cast<uint8_t*>(p));
    std::memset(data_.get(), 0, bytes);
  }
  uint8_t* data() const { return data_.get(); }
  size_t size() const { return bytes_; }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> data_;
  size_t bytes_;
};

std::vector<uint8_t*> pointers(const std::vector<Buffer>& v) {
  std::vector<uint8_t*> p;
  for (const Buffer& b : v) p.push_back(b.data());
  return p;
}

// Median seconds of `repeat` calls after `warmup` untimed ones.
double median_seconds(const std::function<void()>& call, int warmup, int repeat) {
  for (int i = 0; i < warmup; ++i) call();
  std::vector<double> t;
  for (int i = 0; i < repeat; ++i) {
    auto start = std::chrono::steady_clock::now();
    call();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return repeat % 2 ? t[repeat / 2] : 0.5 * (t[repeat / 2 - 1] + t[repeat / 2]);
}

void require_equal(const uint8_t* got, const uint8_t* want, size_t n, const std::string& what) {
  if (std::memcmp(got, want, n) == 0) return;
  size_t i = 0;
  while (got[i] == want[i]) ++i;
  std::fprintf(stderr, "MISMATCH %s: first difference at byte %zu (got %d, expected %d)\n", what.c_str(), i, got[i],
               want[i]);
  std::exit(1);
}

struct Machine {
  std::string model = "unknown";
  unsigned cores = std::thread::hardware_concurrency();
  std::string simd;  // the flags ISA-L's erasure-code dispatch looks at
};

Machine read_machine() {
  Machine m;
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  std::set<std::string> flags;
  while (std::getline(in, line)) {
    auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, line.find_last_not_of(" \t", colon - 1) + 1);
    std::string value = line.substr(std::min(line.size(), colon + 2));
    if (key == "model name" && m.model == "unknown") m.model = value;
    if (key == "flags" && flags.empty()) {
      std::istringstream words(value);
      for (std::string w; words >> w;) flags.insert(w);
    }
  }
  for (const char* f : {"sse4_2", "avx", "avx2", "avx512f", "avx512bw", "avx512vl", "gfni", "vpclmulqdq"}) {
    if (!flags.count(f)) continue;
    if (!m.simd.empty()) m.simd += ' ';
    m.simd += f;
  }
  return m;
}

struct Result {
  int k, p;
  size_t fragment_bytes;
  double isal_encode_s, plain_encode_s, isal_reconstruct_s, plain_reconstruct_s;
  double gbps(double seconds) const { return static_cast<double>(k) * fragment_bytes / seconds / 1e9; }
};

Result run_shape(int k, int p, const Options& opt) {
  const size_t len = opt.mib * (size_t{1} << 20) / k / 64 * 64;
  ReedSolomon isal(k, p);
  plain::ReedSolomon peer(k, p);

  std::vector<Buffer> data, parity, peer_parity, rebuilt;
  for (int i = 0; i < k; ++i) {
    data.emplace_back(len);
    uint8_t* d = data.back().data();
    for (size_t b = 0; b < len; b += 8) {
      uint64_t r = loom::random_u64(2024, 100 + i, b / 8);
      std::memcpy(d + b, &r, std::min<size_t>(8, len - b));
    }
  }
  for (int i = 0; i < p; ++i) {
    parity.emplace_back(len);
    peer_parity.emplace_back(len);
    rebuilt.emplace_back(len);
  }
  std::vector<uint8_t*> data_ptr = pointers(data), parity_ptr = pointers(parity), peer_ptr = pointers(peer_parity),
                        rebuilt_ptr = pointers(rebuilt);
  const uint8_t* const* data_in = data_ptr.data();

  Result r{k, p, len, 0, 0, 0, 0};
  r.isal_encode_s = median_seconds([&] { isal.encode(len, data_in, parity_ptr.data()); }, opt.warmup, opt.repeat);
  r.plain_encode_s = median_seconds([&] { peer.encode(len, data_in, peer_ptr.data()); }, opt.warmup, opt.repeat);
  for (int i = 0; i < p; ++i) {
    require_equal(parity[i].data(), peer_parity[i].data(), len,
                  "parity " + std::to_string(i) + " (k=" + std::to_string(k) + " p=" + std::to_string(p) + ")");
  }

  // Lose data fragments 0..p-1; survivors: data p..k-1, then all parity.
  std::vector<int> missing, present_idx;
  std::vector<const uint8_t*> present;
  for (int f = 0; f < p; ++f) missing.push_back(f);
  for (int f = p; f < k; ++f) {
    present_idx.push_back(f);
    present.push_back(data[f].data());
  }
  for (int i = 0; i < p; ++i) {
    present_idx.push_back(k + i);
    present.push_back(parity[i].data());
  }
  const std::string shape = " (k=" + std::to_string(k) + " p=" + std::to_string(p) + ")";
  auto check_rebuilt = [&](const char* who) {
    for (int f = 0; f < p; ++f) {
      require_equal(rebuilt[f].data(), data[f].data(), len,
                    std::string(who) + " rebuilt data " + std::to_string(f) + shape);
      std::memset(rebuilt[f].data(), 0, len);
    }
  };
  r.isal_reconstruct_s = median_seconds(
      [&] { isal.reconstruct(len, present_idx, present.data(), missing, rebuilt_ptr.data()); }, opt.warmup, opt.repeat);
  check_rebuilt("ISA-L");
  r.plain_reconstruct_s = median_seconds(
      [&] { peer.reconstruct(len, present_idx, present.data(), missing, rebuilt_ptr.data()); }, opt.warmup, opt.repeat);
  check_rebuilt("plain");
  return r;
}

void write_json(const Options& opt, const Machine& m, const std::vector<Result>& results, const std::string& command) {
  std::ofstream out(opt.json);
  LOOM_CHECK(out.good(), kIo, "cannot write --json file '" << opt.json << "'");
  char buf[512];
  out << "{\n  \"benchmark\": \"ec_bench\",\n";
  out << "  \"machine\": \"" << m.model << ", " << m.cores << " cores\",\n";
  out << "  \"cores\": " << m.cores << ",\n  \"simd_flags\": \"" << m.simd << "\",\n";
  out << "  \"isal_version\": \"" << ISAL_MAJOR_VERSION << "." << ISAL_MINOR_VERSION << "." << ISAL_PATCH_VERSION
      << "\",\n";
  out << "  \"threads\": 1,\n  \"data_mib\": " << opt.mib << ",\n  \"warmup\": " << opt.warmup
      << ",\n  \"repeat\": " << opt.repeat << ",\n  \"statistic\": \"median\",\n";
  out << "  \"units\": \"GB/s = 1e9 bytes of data (k fragments) per second, one thread\",\n";
  out << "  \"reconstruct_case\": \"first p data fragments lost, rebuilt from k - p data + p parity\",\n";
  out << "  \"command\": \"" << command << "\",\n  \"results\": [\n";
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    std::snprintf(buf, sizeof buf,
                  "    {\"k\": %d, \"p\": %d, \"fragment_bytes\": %zu, \"isal_encode_gbps\": %.3f, "
                  "\"plain_encode_gbps\": %.3f, \"encode_speedup\": %.1f, \"isal_reconstruct_gbps\": %.3f, "
                  "\"plain_reconstruct_gbps\": %.3f, \"reconstruct_speedup\": %.1f, \"isal_encode_median_s\": %.6f, "
                  "\"plain_encode_median_s\": %.6f, \"isal_reconstruct_median_s\": %.6f, "
                  "\"plain_reconstruct_median_s\": %.6f}",
                  r.k, r.p, r.fragment_bytes, r.gbps(r.isal_encode_s), r.gbps(r.plain_encode_s),
                  r.plain_encode_s / r.isal_encode_s, r.gbps(r.isal_reconstruct_s), r.gbps(r.plain_reconstruct_s),
                  r.plain_reconstruct_s / r.isal_reconstruct_s, r.isal_encode_s, r.plain_encode_s, r.isal_reconstruct_s,
                  r.plain_reconstruct_s);
    out << buf << (i + 1 < results.size() ? ",\n" : "\n");
  }
  out << "  ]\n}\n";
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options opt = parse_args(argc, argv);
    const Machine machine = read_machine();
    std::string command = "ec_bench";
    for (int i = 1; i < argc; ++i) command += std::string(" ") + argv[i];
    std::printf(
        "ec_bench: %s, %u cores, SIMD: %s; ISA-L %d.%d; %zu MiB of data, 1 thread, median of %d after %d "
        "warm-up\n",
        machine.model.c_str(), machine.cores, machine.simd.c_str(), ISAL_MAJOR_VERSION, ISAL_MINOR_VERSION, opt.mib,
        opt.repeat, opt.warmup);
    std::printf("%3s %3s | %12s %12s %8s | %12s %12s %8s\n", "k", "p", "enc ISA-L", "enc plain", "x", "rec ISA-L",
                "rec plain", "x");
    std::printf("%7s | %12s %12s %8s | %12s %12s %8s\n", "", "GB/s", "GB/s", "", "GB/s", "GB/s", "");
    std::vector<Result> results;
    for (int p = 1; p <= 2; ++p) {
      for (int k = 2; k <= 8; ++k) {
        Result r = run_shape(k, p, opt);
        std::printf("%3d %3d | %12.2f %12.3f %8.1f | %12.2f %12.3f %8.1f\n", k, p, r.gbps(r.isal_encode_s),
                    r.gbps(r.plain_encode_s), r.plain_encode_s / r.isal_encode_s, r.gbps(r.isal_reconstruct_s),
                    r.gbps(r.plain_reconstruct_s), r.plain_reconstruct_s / r.isal_reconstruct_s);
        std::fflush(stdout);
        results.push_back(r);
      }
    }
    write_json(opt, machine, results, command);
    std::printf("wrote %s\n", opt.json.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ec_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
