#include "parallel/communicator.h"

#include <numeric>
#include <utility>

#include "core/error.h"

namespace loom {

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kMin: return "min";
  }
  return "?";
}

Communicator::Communicator(std::string name, int rank, int size, uint32_t group_id)
    : name_(std::move(name)), rank_(rank), size_(size), group_id_(group_id) {
  LOOM_CHECK(size >= 1 && rank >= 0 && rank < size, kInternal,
             "communicator '" << name_ << "': rank " << rank << " out of range for size " << size);
  world_ranks_.resize(static_cast<size_t>(size));
  std::iota(world_ranks_.begin(), world_ranks_.end(), 0);
}

Communicator::~Communicator() = default;

void Communicator::set_world_ranks(std::vector<int> ranks) {
  LOOM_CHECK(ranks.size() == static_cast<size_t>(size_), kInternal,
             "communicator '" << name_ << "': " << ranks.size() << " world ranks for a group of " << size_);
  world_ranks_ = std::move(ranks);
}

namespace {
// Host-timed receives: the call has completed when it returns.
class HostTransferTimer final : public TransferTimer {
 public:
  void start() override { start_ = wall_clock_s(); }
  void stop() override { stop_ = wall_clock_s(); }
  std::optional<double> seconds() override { return stop_ - start_; }

 private:
  double start_ = 0, stop_ = 0;
};
}  // namespace

std::unique_ptr<TransferTimer> Communicator::make_transfer_timer() {
  return std::make_unique<HostTransferTimer>();
}

void Communicator::check_tensor(const Tensor& t, const char* call, const char* arg, bool reduction) const {
  LOOM_CHECK(
      t.defined(), kShape,
      call << " on '" << name_ << "': argument '" << arg << "' is a null tensor with " << t.numel() << " elements");
  LOOM_CHECK(t.device() == device(), kComm,
             call << " on '" << name_ << "': argument '" << arg << "' is in " << device_name(t.device())
                  << " memory, but the " << backend_name() << " communicator works on " << device_name(device())
                  << " memory");
  LOOM_CHECK(supports(t.dtype(), reduction), kComm,
             call << " on '" << name_ << "': argument '" << arg << "' has dtype " << dtype_name(t.dtype()) << "; "
                  << (reduction ? "reductions" : "transfers") << " of " << dtype_name(t.dtype())
                  << " are not supported on the " << backend_name() << " communicator");
}

void Communicator::check_overlap(const Tensor& part, const char* part_arg, const Tensor& whole, const char* whole_arg,
                                 const char* call) const {
  auto p = reinterpret_cast<uintptr_t>(part.data());
  auto w = reinterpret_cast<uintptr_t>(whole.data());
  bool overlap = part.nbytes() > 0 && whole.nbytes() > 0 && p < w + whole.nbytes() && w < p + part.nbytes();
  if (!overlap) return;
  uintptr_t in_place = w + static_cast<uintptr_t>(rank_) * part.nbytes();
  LOOM_CHECK(p == in_place, kComm,
             call << " on '" << name_ << "': arguments '" << part_arg << "' and '" << whole_arg
                  << "' overlap; the only overlap allowed is '" << part_arg << "' being exactly block " << rank_
                  << " (this rank's) of '" << whole_arg << "'");
}

void Communicator::check_rank_arg(int r, const char* call, const char* arg, bool allow_self) const {
  LOOM_CHECK(
      r >= 0 && r < size_, kComm,
      call << " on '" << name_ << "': " << arg << " " << r << " is out of range for a group of " << size_ << " ranks");
  LOOM_CHECK(allow_self || r != rank_, kComm,
             call << " on '" << name_ << "': " << arg << " " << r
                  << " is this rank; a rank cannot send to or receive from itself");
}

template <class Body>
void Communicator::traced(CollectiveOp op, int32_t peer, uint64_t bytes, Body&& body) {
  const uint64_t seq = trace_.begin(op, group_id_, peer, bytes, side_);
  const bool device = device_timed();
  if (device) before_enqueue();
  body();
  // A failure in body leaves the record in flight (the contract above); a device-timed one is closed by the
  // backend once its completion event fires.
  if (device)
    after_enqueue(seq);
  else
    trace_.end(seq);
}

void Communicator::all_reduce(const Tensor& t, ReduceOp op) {
  check_tensor(t, "all_reduce", "t", true);
  traced(CollectiveOp::kAllReduce, -1, t.nbytes(), [&] { do_all_reduce(t, op); });
}

void Communicator::check_like(const Tensor& t, const Tensor& like, const char* call, const char* arg) const {
  check_tensor(t, call, arg, true);
  check_dtype(t, like.dtype(), call, arg);
  LOOM_CHECK(t.shape() == like.shape(), kShape,
             call << " on '" << name_ << "': shapes " << t.shape().str() << " and " << like.shape().str() << " differ");
}

bool Communicator::fused_allreduce_add_rmsnorm(const Tensor& partial, const Tensor& residual, const Tensor& weight,
                                              float eps, const Tensor& residual_out, const Tensor& normed,
                                              const Tensor& rstd) {
  if (size_ == 1 || partial.ndim() != 2 || !fused_ || !fused_->fits_forward(partial)) return false;
  const char* call = "fused_allreduce_add_rmsnorm";
  check_tensor(partial, call, "partial", true);
  for (const Tensor* t : {&residual, &residual_out, &normed})
    check_like(*t, partial, call, "residual/residual_out/normed");
  check_tensor(weight, call, "weight", true);
  check_tensor(rstd, call, "rstd", false);
  check_dtype(weight, partial.dtype(), call, "weight");
  LOOM_CHECK(weight.numel() == partial.size(1) && rstd.numel() == partial.size(0) && rstd.dtype() == DType::kF32,
             kShape, call << " on '" << name_ << "': weight must be [" << partial.size(1) << "] and rstd f32 ["
                          << partial.size(0) << "]");
  traced(CollectiveOp::kAllReduce, -1, partial.nbytes(),
         [&] { fused_->forward(partial, residual, weight, eps, residual_out, normed, rstd); });
  return true;
}

bool Communicator::fused_rmsnorm_backward(const Tensor& dnormed, const Tensor& x, const Tensor& weight,
                                          const Tensor& rstd, const Tensor& dx, bool accumulate, const Tensor& dw) {
  if (size_ == 1 || dnormed.ndim() != 2 || !fused_ || !fused_->fits_backward(dnormed)) return false;
  const char* call = "fused_rmsnorm_backward";
  check_tensor(dnormed, call, "dnormed", true);
  for (const Tensor* t : {&x, &dx}) check_like(*t, dnormed, call, "x/dx");
  check_tensor(weight, call, "weight", true);
  check_tensor(dw, call, "dw", true);
  check_tensor(rstd, call, "rstd", false);
  check_dtype(weight, dnormed.dtype(), call, "weight");
  LOOM_CHECK(weight.numel() == dnormed.size(1) && dw.numel() == dnormed.size(1) &&
                 rstd.numel() == dnormed.size(0) && rstd.dtype() == DType::kF32 &&
                 (dw.dtype() == DType::kF32 || dw.dtype() == DType::kBF16),
             kShape, call << " on '" << name_ << "': weight and dw (f32 or bf16) must be [" << dnormed.size(1)
                          << "] and rstd f32 [" << dnormed.size(0) << "]");
  traced(CollectiveOp::kAllReduce, -1, dnormed.nbytes(),
         [&] { fused_->backward(dnormed, x, weight, rstd, dx, accumulate, dw); });
  return true;
}

void Communicator::reduce_scatter(const Tensor& out, const Tensor& in, ReduceOp op) {
  const char* call = "reduce_scatter";
  check_tensor(out, call, "out", true);
  check_tensor(in, call, "in", true);
  check_dtype(out, in.dtype(), call, "out");
  LOOM_CHECK(in.numel() % size_ == 0, kShape,
             call << " on '" << name_ << "': argument 'in' has " << in.numel()
                  << " elements, which do not split evenly over the group of " << size_ << " ranks");
  LOOM_CHECK(out.numel() * size_ == in.numel(), kShape,
             call << " on '" << name_ << "': argument 'out' has " << out.numel() << " elements, expected in.numel() / "
                  << size_ << " = " << in.numel() / size_);
  check_overlap(out, "out", in, "in", call);
  traced(CollectiveOp::kReduceScatter, -1, in.nbytes(), [&] { do_reduce_scatter(out, in, op); });
}

void Communicator::all_gather(const Tensor& out, const Tensor& in) {
  const char* call = "all_gather";
  check_tensor(out, call, "out", false);
  check_tensor(in, call, "in", false);
  check_dtype(out, in.dtype(), call, "out");
  LOOM_CHECK(out.numel() == in.numel() * size_, kShape,
             call << " on '" << name_ << "': argument 'out' has " << out.numel() << " elements, expected " << size_
                  << " x in.numel() = " << in.numel() * size_);
  check_overlap(in, "in", out, "out", call);
  traced(CollectiveOp::kAllGather, -1, out.nbytes(), [&] { do_all_gather(out, in); });
}

void Communicator::broadcast(const Tensor& t, int root) {
  check_tensor(t, "broadcast", "t", false);
  check_rank_arg(root, "broadcast", "root", true);
  traced(CollectiveOp::kBroadcast, -1, t.nbytes(), [&] { do_broadcast(t, root); });
}

void Communicator::send(const Tensor& t, int peer) {
  check_tensor(t, "send", "t", false);
  check_rank_arg(peer, "send", "peer", false);
  traced(CollectiveOp::kSend, peer, t.nbytes(), [&] { do_send(t, peer); });
}

void Communicator::recv(const Tensor& t, int peer) {
  check_tensor(t, "recv", "t", false);
  check_rank_arg(peer, "recv", "peer", false);
  traced(CollectiveOp::kRecv, peer, t.nbytes(), [&] { do_recv(t, peer); });
}

void Communicator::barrier() {
  traced(CollectiveOp::kBarrier, -1, 0, [&] { do_barrier(); });
}

void CommReducer::all_reduce_sum(const Tensor& t) {
  comm_.all_reduce(t, ReduceOp::kSum);
}
void CommReducer::all_reduce_max(const Tensor& t) {
  comm_.all_reduce(t, ReduceOp::kMax);
}

}  // namespace loom
