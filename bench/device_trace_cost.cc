// What Loom's instrumentation adds to an NCCL collective (issue 7's monitoring overhead, GPU side): one
// NcclCommunicator::all_reduce (argument checks, the trace record, and its device timing: a start and an end
// event recorded around the call and queued for the watcher thread, parallel/cuda/device_trace_timer.h) against
// the bare ncclAllReduce of the same buffer on the same stream, on a one-rank NCCL communicator (so the figure is
// the per-call cost on one GPU, without peers; on a real group the collective itself is longer, the added cost is
// the same).
//
// Protocol: per variant, 2 000 warm-up calls, then 9 repeats of 5 000 calls of a 256-float sum all-reduce; per
// repeat, host time to enqueue the calls (host ns per call) and time until the stream drained them (stream ns
// per call: enqueue start to cudaStreamSynchronize's return, / calls); reported: median, min and max over the
// repeats. Peer in the same run: the bare ncclAllReduce ("added_*_ns" = Loom − bare). The variants alternate
// repeat by repeat (bare, Loom, bare, ...), so drift on the machine hits both alike.
//   mpirun -np 1 device_trace_cost [--json FILE]     (prints the JSON object as well)
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/cuda/cuda_backend.h"
#include "parallel/nccl/nccl_communicator.h"

namespace {

constexpr int kWarm = 2000, kCalls = 5000, kRepeats = 9, kElems = 256;

struct Figure {
  double median, min, max;
};

Figure summarise(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v.front(), v.back()};
}

std::string json(const char* name, const Figure& f) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "\"%s\": {\"median_ns\": %.1f, \"min_ns\": %.1f, \"max_ns\": %.1f}", name, f.median,
                f.min, f.max);
  return buf;
}

double now_ns() {
  return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  std::string out;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) {
      out = argv[++i];
    } else {
      std::fprintf(stderr, "usage: device_trace_cost [--json FILE]\n");
      MPI_Finalize();
      return 2;
    }
  }
  std::string why;
  if (!loom::cuda_available(&why)) {
    std::fprintf(stderr, "device_trace_cost: no usable GPU (%s)\n", why.c_str());
    MPI_Finalize();
    return 1;
  }
  std::string result;
  {
    std::unique_ptr<loom::Backend> be = loom::make_cuda_backend(0);
    auto& cb = static_cast<loom::cuda::CudaBackend&>(*be);
    loom::NcclCommunicator comm(MPI_COMM_SELF, "self", 9, cb);
    cudaStream_t stream = cb.collective_stream();
    // The bare peer: its own one-rank NCCL communicator on the same stream.
    ncclUniqueId id;
    ncclGetUniqueId(&id);
    ncclComm_t bare = nullptr;
    if (ncclCommInitRank(&bare, 1, id, 0) != ncclSuccess) {
      std::fprintf(stderr, "device_trace_cost: ncclCommInitRank failed\n");
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
    void* buf = be->allocate(kElems * sizeof(float));
    const loom::Tensor t(buf, loom::Shape{kElems}, loom::DType::kF32, loom::Device::kCuda);
    auto loom_call = [&] { comm.all_reduce(t, loom::ReduceOp::kSum); };
    auto bare_call = [&] { ncclAllReduce(buf, buf, kElems, ncclFloat32, ncclSum, bare, stream); };
    auto run = [&](auto&& call, int n, std::vector<double>* host, std::vector<double>* drained) {
      cudaStreamSynchronize(stream);
      const double t0 = now_ns();
      for (int i = 0; i < n; ++i) call();
      const double t1 = now_ns();
      cudaStreamSynchronize(stream);
      const double t2 = now_ns();
      if (host) host->push_back((t1 - t0) / n);
      if (drained) drained->push_back((t2 - t0) / n);
    };
    run(bare_call, kWarm, nullptr, nullptr);
    run(loom_call, kWarm, nullptr, nullptr);
    std::vector<double> bare_host, bare_drain, loom_host, loom_drain;
    for (int r = 0; r < kRepeats; ++r) {
      run(bare_call, kCalls, &bare_host, &bare_drain);
      run(loom_call, kCalls, &loom_host, &loom_drain);
    }
    comm.flush_trace(5.0);
    const uint64_t open = comm.trace().launched() - comm.trace().completed();
    const Figure bh = summarise(bare_host), bd = summarise(bare_drain), lh = summarise(loom_host),
                 ld = summarise(loom_drain);
    char added[200];
    std::snprintf(added, sizeof added,
                  "\"added_host_ns\": %.1f, \"added_stream_ns\": %.1f, \"records_left_open\": %llu, \"gpu\": \"%s\"",
                  lh.median - bh.median, ld.median - bd.median, static_cast<unsigned long long>(open),
                  cb.name().c_str());
    result = "{\"benchmark\": \"device_trace_cost\", \"elements\": " + std::to_string(kElems) + ", " +
             json("bare_host", bh) + ", " + json("bare_stream", bd) + ", " + json("loom_host", lh) + ", " +
             json("loom_stream", ld) + ", " + added + "}";
    ncclCommDestroy(bare);
    be->deallocate(buf);
  }
  std::printf("%s\n", result.c_str());
  if (!out.empty()) std::ofstream(out) << result << "\n";
  MPI_Finalize();
  return 0;
}
