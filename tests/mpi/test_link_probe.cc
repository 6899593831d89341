// The link probe (parallel/link_probe.h) over real communicators, on the host (MpiCommunicator) and, where there
// is a GPU, on device tensors (NCCL where every rank has a GPU of its own, else the host-staged communicator):
//   - a cycle of rounds times every pair of ranks once in each direction: each rank records one transfer from
//     every other rank, of the probe's size, and nothing is left pending once the device is idle;
//   - an injected slow link (CommFaults: 60 ms on rank 0's sends to rank 1) is on the wire: rank 1 records
//     >= 57 ms from rank 0, every other pair stays fast;
//   - a late sender (rank 0 sleeps 60 ms before each probe: a slow rank) is not a slow link: every pair fast.
// Thresholds: 30 ms separates slow from fast (CI runs 4 ranks on 2 cores, where a transfer may wait for a CPU).
// The probe runs one round per run() here, so the cycles are counted in rounds.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "core/backend.h"
#include "parallel/link_probe.h"
#include "parallel/link_trace.h"
#include "parallel/mpi_communicator.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/mpi/mpi_test_util.h"

#ifdef LOOM_HAVE_CUDA
#include "parallel/cuda/host_staged_communicator.h"
#ifdef LOOM_HAVE_NCCL
#include "parallel/nccl/nccl_communicator.h"
#endif
#endif

namespace loom {
namespace {

constexpr double kDelayS = 0.060;
constexpr double kFastS = 0.030;
constexpr int64_t kBytes = 256 << 10;

struct Probed {
  std::unique_ptr<Backend> be;
  std::unique_ptr<Communicator> comm;
};

Probed host_setup() {
  Probed s;
  CpuBackendOptions o;
  o.threads = 1;
  s.be = make_cpu_backend(o);
  s.comm = std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, "dp", 2);
  return s;
}

// Empty comm (and a printed reason) where there is no GPU.
Probed device_setup() {
  Probed s;
  if (!test::cuda_skip_reason().empty()) return s;
#ifdef LOOM_HAVE_CUDA
  int n = 0;
  cudaGetDeviceCount(&n);
  s.be = make_cuda_backend(test::world_rank() % n);
  auto& cb = static_cast<cuda::CudaBackend&>(*s.be);
#ifdef LOOM_HAVE_NCCL
  if (HostStagedCommunicator::nccl_unusable_reason(MPI_COMM_WORLD).empty()) {
    s.comm = std::make_unique<NcclCommunicator>(MPI_COMM_WORLD, "dp", 2, cb);
    return s;
  }
#endif
  s.comm = std::make_unique<HostStagedCommunicator>(MPI_COMM_WORLD, "dp", 2, cb);
#endif
  return s;
}

// Runs `cycles` whole cycles of the schedule (before_each() ahead of every probe) and returns what this rank
// recorded, by source world rank, once the device is idle.
std::map<int, LinkStats> probe_cycles(Probed& s, int cycles, const std::function<void()>& before_each = {}) {
  process_link_trace().take();  // nothing earlier
  process_link_trace().take_probes();
  LinkProbeOptions opt;
  opt.bytes = kBytes;
  opt.rounds = 1;
  LinkProbe probe(*s.comm, *s.be, opt);
  for (int i = 0; i < cycles * LinkProbe::cycle_rounds(s.comm->size()); ++i) {
    if (before_each) before_each();
    probe.run();
  }
  s.be->synchronize();
  probe.collect();
  EXPECT_EQ(probe.pending(), 0u) << "timed transfers left pending on an idle device";
  std::map<int, LinkStats> out;
  for (const LinkStats& l : process_link_trace().take_probes()) out[l.src] = l;
  EXPECT_TRUE(process_link_trace().take().empty()) << "probe transfers among the ring's";
  return out;
}

void expect_every_pair_once_per_cycle(Probed& s) {
  const std::map<int, LinkStats> got = probe_cycles(s, 2);
  const int me = test::world_rank();
  for (int src = 0; src < test::world_size(); ++src) {
    if (src == me) {
      EXPECT_EQ(got.count(src), 0u) << "a transfer from itself";
      continue;
    }
    auto it = got.find(src);
    ASSERT_NE(it, got.end()) << "rank " << me << " recorded nothing from rank " << src;
    EXPECT_EQ(it->second.transfers, 2u) << "from rank " << src;
    EXPECT_EQ(it->second.bytes, 2u * static_cast<uint64_t>(kBytes)) << "from rank " << src;
    EXPECT_GT(it->second.sum_s, 0.0);
    EXPECT_LT(it->second.sum_s / 2, kFastS) << "from rank " << src << ": a healthy link looks slow";
  }
}

void expect_slow_link_on_the_wire(Probed& s) {
  const int me = test::world_rank();
  if (me == 0) process_comm_faults().set_slow_link(1, kDelayS);
  const std::map<int, LinkStats> got = probe_cycles(s, 1);
  if (me == 0) process_comm_faults().set_slow_link(1, 0);
  for (const auto& [src, l] : got) {
    const double mean = l.sum_s / static_cast<double>(l.transfers);
    if (me == 1 && src == 0) {
      EXPECT_GE(mean, kDelayS * 0.95) << "the delayed link 0 -> 1 measured " << mean * 1e3 << " ms";
    } else {
      EXPECT_LT(mean, kFastS) << "link " << src << " -> " << me << " measured " << mean * 1e3 << " ms";
    }
  }
  if (me == 1) {
    EXPECT_EQ(got.count(0), 1u);
  }
}

void expect_late_sender_not_a_slow_link(Probed& s) {
  const int me = test::world_rank();
  const std::map<int, LinkStats> got = probe_cycles(s, 1, [&] {
    if (me == 0) std::this_thread::sleep_for(std::chrono::duration<double>(kDelayS));
  });
  EXPECT_EQ(got.size(), static_cast<size_t>(test::world_size() - 1));
  for (const auto& [src, l] : got)
    EXPECT_LT(l.sum_s / static_cast<double>(l.transfers), kFastS)
        << "link " << src << " -> " << me << ": waiting for a late sender was timed as transfer";
}

TEST(LinkProbe, HostEveryPairOncePerCycle) {
  Probed s = host_setup();
  expect_every_pair_once_per_cycle(s);
}

TEST(LinkProbe, HostSlowLinkIsOnTheWire) {
  Probed s = host_setup();
  expect_slow_link_on_the_wire(s);
}

TEST(LinkProbe, HostLateSenderIsNotASlowLink) {
  Probed s = host_setup();
  expect_late_sender_not_a_slow_link(s);
}

#define LOOM_DEVICE_SETUP(s)                                                  \
  Probed s = device_setup();                                                   \
  if (!s.comm) GTEST_SKIP() << test::cuda_skip_reason();                      \
  if (test::world_rank() == 0) std::printf("on %s\n", s.comm->backend_name())

TEST(LinkProbe, DeviceEveryPairOncePerCycle) {
  LOOM_DEVICE_SETUP(s);
  expect_every_pair_once_per_cycle(s);
}

TEST(LinkProbe, DeviceSlowLinkIsOnTheWire) {
  LOOM_DEVICE_SETUP(s);
  expect_slow_link_on_the_wire(s);
}

TEST(LinkProbe, DeviceLateSenderIsNotASlowLink) {
  LOOM_DEVICE_SETUP(s);
  expect_late_sender_not_a_slow_link(s);
}

TEST(LinkProbe, WhichGroupsAreProbed) {
  Probed s = host_setup();
  EXPECT_FALSE(link_probe_wanted("auto", *s.comm)) << "the MPI ring times its own transfers";
  EXPECT_TRUE(link_probe_wanted("on", *s.comm));
  EXPECT_FALSE(link_probe_wanted("off", *s.comm));
  MpiCommunicator self(MPI_COMM_SELF, "self", 9);
  EXPECT_FALSE(link_probe_wanted("on", self)) << "a group of one rank has no links";
#if defined(LOOM_HAVE_CUDA) && defined(LOOM_HAVE_NCCL)
  if (test::cuda_skip_reason().empty()) {
    Probed d = device_setup();
    if (std::string(d.comm->backend_name()) == "NCCL") {
      EXPECT_TRUE(link_probe_wanted("auto", *d.comm));
    }
  }
#endif
}

}  // namespace
}  // namespace loom
