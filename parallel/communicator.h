// Communicator: the one collective interface of Loom, for every backend (MPI on host memory, NCCL on device
// memory). The public calls are not virtual: each one validates its arguments, records a trace record
// (parallel/trace.h) around the backend's do_* call, and so every collective of the job goes through one
// instrumented path that the monitor reads.
//
// Contract for every call:
// - Every rank of the group makes the same calls in the same order, with tensors of the same dtype and size
//   (send/recv: matched pairs). A call is not an error on one rank only: argument checks depend only on the
//   arguments and the group's size, so when they are the same everywhere every rank throws the same error
//   before any communication starts, and no rank is left waiting.
// - Tensors are contiguous views (core/tensor.h) on this communicator's device(). The call reads and writes
//   them in place; on a host backend they are complete when the call returns. Device backends order each call
//   on the CUDA backend's collective stream after the kernels enqueued before it: NcclCommunicator returns at
//   once (the results are ready in stream order), HostStagedCommunicator returns with the results on the
//   device, except its fused calls, which are enqueued like NCCL's (their headers say more).
// - Errors: sizes that do not fit the group -> kShape; a tensor on the wrong device, a dtype the backend cannot
//   handle, a root or peer out of range, overlapping buffers -> kComm. Each message names the call, the group
//   and the argument. A failure inside the backend (kComm) leaves its trace record in flight: the group is
//   unusable after it, as peers may be waiting.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/ops.h"
#include "core/tensor.h"
#include "parallel/trace.h"

namespace loom {

enum class ReduceOp : uint8_t { kSum, kMax, kMin };

const char* reduce_op_name(ReduceOp op);  // "sum", "max", "min"

// The one-kernel device path of the fused op and of its backward (Communicator::fused_allreduce_add_rmsnorm,
// fused_rmsnorm_backward), which a device communicator installs (cuda::FusedNormPath, parallel/cuda/fused_path.h).
// fits_*() depend only on the tensors' shapes and dtypes, so every rank of a group gives the same answer.
class FusedKernels {
 public:
  virtual ~FusedKernels() = default;
  virtual bool fits_forward(const Tensor& partial) const = 0;
  virtual bool fits_backward(const Tensor& dnormed) const = 0;
  virtual void forward(const Tensor& partial, const Tensor& residual, const Tensor& weight, float eps,
                       const Tensor& residual_out, const Tensor& normed, const Tensor& rstd) = 0;
  virtual void backward(const Tensor& dnormed, const Tensor& x, const Tensor& weight, const Tensor& rstd,
                        const Tensor& dx, bool accumulate, const Tensor& dw) = 0;
  virtual void abort() = 0;  // waiting kernels give up now
};

// Times one receive as its transfer ran (the link probe, parallel/link_probe.h): start() just before the recv is
// issued, stop() just after it. seconds() is the time between the two in the order the work ran: at once on a
// host backend, once the stream got there on a device backend (nullopt until then). Reusable after seconds()
// returned a value.
class TransferTimer {
 public:
  virtual ~TransferTimer() = default;
  virtual void start() = 0;
  virtual void stop() = 0;
  virtual std::optional<double> seconds() = 0;
};

class Communicator {
 public:
  virtual ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  const std::string& name() const { return name_; }  // "world", "tp", "dp", "node"
  uint32_t group_id() const { return group_id_; }
  // The world rank (MPI_COMM_WORLD) of rank r of this group: the monitor names ranks and links by world rank.
  int world_rank(int r) const { return world_ranks_.at(static_cast<size_t>(r)); }
  // Where the tensors of this communicator live, and the backend's name for messages ("MPI", "NCCL").
  virtual Device device() const = 0;
  virtual const char* backend_name() const = 0;

  // t = op over ranks of t, in place.
  void all_reduce(const Tensor& t, ReduceOp op);
  // out = block `rank()` of (op over ranks of in), where in is size() equal blocks of out.numel() elements.
  // In place when out is exactly that block of in; any other overlap of out and in is an error.
  void reduce_scatter(const Tensor& out, const Tensor& in, ReduceOp op);
  // out = in of rank 0, in of rank 1, ... concatenated (out.numel() == size() * in.numel()).
  // In place when in is exactly block `rank()` of out; any other overlap is an error.
  void all_gather(const Tensor& out, const Tensor& in);
  // t = t of rank `root`.
  void broadcast(const Tensor& t, int root);
  // Point-to-point with the rank `peer` of this group (not this rank). Blocking: a send may wait until the
  // matching recv starts, so order pairs so that they cannot wait on each other in a cycle.
  void send(const Tensor& t, int peer);
  void recv(const Tensor& t, int peer);
  void barrier();

  // The fused op's one-kernel device path (parallel/fused_norm.h): residual_out = residual + the sum over ranks
  // of partial, normed = rmsnorm(residual_out) * weight, rstd = its per-row 1/rms (f32 [rows]). partial,
  // residual, residual_out, normed [rows, d] and weight [d], all of one dtype. Returns false, having done
  // nothing, when this communicator has no such path for these tensors (the caller then composes all_reduce,
  // add and rmsnorm); the answer depends only on the arguments' shapes and dtypes and the group, so it is the
  // same on every rank. Collective when it returns true. Traced as an all-reduce of partial.
  bool fused_allreduce_add_rmsnorm(const Tensor& partial, const Tensor& residual, const Tensor& weight, float eps,
                                   const Tensor& residual_out, const Tensor& normed, const Tensor& rstd);
  // Its backward as one device call: dn = the sum over ranks of dnormed (this rank's partial gradient of
  // normed), then dx (+)= rmsnorm_backward(dn, x, weight, rstd) and dw += the weight's gradient (f32 or bf16
  // [d]); x is the forward's residual_out, rstd its. False, having done nothing, where there is no such path
  // (the caller all-reduces dnormed and runs the backend's RMSNorm backward); the same answer on every rank.
  // Traced as an all-reduce of dnormed.
  bool fused_rmsnorm_backward(const Tensor& dnormed, const Tensor& x, const Tensor& weight, const Tensor& rstd,
                              const Tensor& dx, bool accumulate, const Tensor& dw);

  const TraceRing& trace() const { return trace_; }
  // While one lives, this communicator's calls are side traffic (the link probe, parallel/link_probe.h): traced
  // as usual, so their time counts as time in communication, but counted apart from the group's collectives
  // (TraceRing::side_launched), because side traffic need not be the same on every rank of the group (a rank
  // sits out a round of an odd group's probe) while the monitor compares the collective counts across ranks.
  class SideTraffic {
   public:
    explicit SideTraffic(Communicator& c) : c_(c) { c_.side_ = true; }
    ~SideTraffic() { c_.side_ = false; }
    SideTraffic(const SideTraffic&) = delete;
    SideTraffic& operator=(const SideTraffic&) = delete;

   private:
    Communicator& c_;
  };
  // Closes the trace records of calls that have completed but whose completion the backend has not read yet
  // (device-timed backends: waits up to timeout_s for them, never blocking on the device). Before a last report
  // to the monitor. Host backends have nothing to do.
  virtual void flush_trace(double /*timeout_s*/) {}
  // Whether the backend times its own transfers per link (process_link_trace(): MpiCommunicator's rings). A
  // group whose backend does not (NCCL) has its links measured by probes instead (parallel/link_probe.h).
  virtual bool traces_links() const { return false; }
  // A timer for receives on this communicator; by default the host's clock (the calls complete on return).
  virtual std::unique_ptr<TransferTimer> make_transfer_timer();

 protected:
  Communicator(std::string name, int rank, int size, uint32_t group_id);

  // Timing of the trace records. By default a record spans the do_* call on the host (complete when it returns).
  // A backend whose calls only enqueue work (NCCL) returns true from device_timed(): each call is then wrapped in
  // before_enqueue() and after_enqueue(seq) instead, and the backend closes the record itself once the work is
  // done (TraceRing::end(seq, start, end), from device events: start = when its stream reached the call).
  virtual bool device_timed() const { return false; }
  virtual void before_enqueue() {}
  virtual void after_enqueue(uint64_t /*seq*/) {}
  TraceRing& trace_ring() { return trace_; }
  // The world rank of each rank of the group (see world_rank()); identity until a backend sets it.
  void set_world_ranks(std::vector<int> ranks);

  // Whether the backend can move (reduction == false) or reduce (true) elements of this dtype.
  virtual bool supports(DType dtype, bool reduction) const = 0;

  // The backend's work; arguments are already validated.
  virtual void do_all_reduce(const Tensor& t, ReduceOp op) = 0;
  virtual void do_reduce_scatter(const Tensor& out, const Tensor& in, ReduceOp op) = 0;
  virtual void do_all_gather(const Tensor& out, const Tensor& in) = 0;
  virtual void do_broadcast(const Tensor& t, int root) = 0;
  virtual void do_send(const Tensor& t, int peer) = 0;
  virtual void do_recv(const Tensor& t, int peer) = 0;
  virtual void do_barrier() = 0;
  // The fused path (see fused_allreduce_add_rmsnorm): none unless the backend installs one (null: none).
  void set_fused_kernels(std::unique_ptr<FusedKernels> kernels) { fused_ = std::move(kernels); }
  FusedKernels* fused_kernels() const { return fused_.get(); }

 private:
  void check_tensor(const Tensor& t, const char* call, const char* arg, bool reduction) const;
  // check_tensor (reduction), and of like's dtype and shape.
  void check_like(const Tensor& t, const Tensor& like, const char* call, const char* arg) const;
  // part must not overlap whole unless it is exactly block rank() of it (the in-place form).
  void check_overlap(const Tensor& part, const char* part_arg, const Tensor& whole, const char* whole_arg,
                     const char* call) const;
  void check_rank_arg(int r, const char* call, const char* arg, bool allow_self) const;
  // One traced call: the trace record around body (see device_timed()).
  template <class Body>
  void traced(CollectiveOp op, int32_t peer, uint64_t bytes, Body&& body);

  std::string name_;
  int rank_;
  int size_;
  uint32_t group_id_;
  std::vector<int> world_ranks_;
  bool side_ = false;  // a SideTraffic lives
  TraceRing trace_;
  std::unique_ptr<FusedKernels> fused_;
};

// The tensor-parallel all-reduce that the vocab-parallel cross-entropy (core/ops.h) needs, over a Communicator.
class CommReducer : public GroupReducer {
 public:
  explicit CommReducer(Communicator& comm) : comm_(comm) {}
  void all_reduce_sum(const Tensor& t) override;
  void all_reduce_max(const Tensor& t) override;

 private:
  Communicator& comm_;
};

}  // namespace loom
