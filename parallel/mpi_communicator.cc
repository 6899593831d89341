#include "parallel/mpi_communicator.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <utility>

#include "core/error.h"
#include "core/log.h"
#include "parallel/link_trace.h"
#include "parallel/mpi_check.h"

namespace loom {
namespace {

// Any tag will do: the communicator is a private duplicate, so only Loom's own send/recv use it.
constexpr int kSendRecvTag = 7;

std::atomic<int64_t> g_max_chunk_elements{INT_MAX};

MPI_Datatype mpi_dtype(DType t) {
  switch (t) {
    case DType::kF32: return MPI_FLOAT;
    case DType::kI32: return MPI_INT32_T;
    case DType::kBF16: return MPI_UINT16_T;  // raw bits: moved, never reduced
    case DType::kU16: return MPI_UINT16_T;
  }
  LOOM_THROW(kInternal, "no MPI datatype for dtype " << static_cast<int>(t));
}

int comm_rank(MPI_Comm c) {
  int r = 0;
  LOOM_MPI_CHECK(MPI_Comm_rank(c, &r));
  return r;
}

int comm_size(MPI_Comm c) {
  int s = 0;
  LOOM_MPI_CHECK(MPI_Comm_size(c, &s));
  return s;
}

// Address of element `index` of t.
void* element(const Tensor& t, int64_t index) {
  return static_cast<char*>(t.data()) + static_cast<size_t>(index) * dtype_size(t.dtype());
}

// Calls f(offset, count) over [0, n) in pieces MPI's int counts can carry.
template <class F>
void for_each_chunk(int64_t n, F&& f) {
  const int64_t max = MpiCommunicator::max_chunk_elements();
  for (int64_t off = 0; off < n; off += max) f(off, static_cast<int>(std::min(max, n - off)));
}

}  // namespace

MpiComm::~MpiComm() {
  reset();
}

MpiComm& MpiComm::operator=(MpiComm&& o) noexcept {
  if (this != &o) {
    reset();
    comm_ = o.release();
  }
  return *this;
}

void MpiComm::reset() {
  if (comm_ == MPI_COMM_NULL) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) {
    int rc = MPI_Comm_free(&comm_);
    if (rc != MPI_SUCCESS) LOOM_WARN("MPI_Comm_free failed: " << detail::mpi_error_string(rc));
  }
  comm_ = MPI_COMM_NULL;
}

MpiComm MpiComm::dup(MPI_Comm parent) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  LOOM_CHECK(initialized, kComm, "MPI is not initialised: call MPI_Init before creating communicators");
  LOOM_CHECK(parent != MPI_COMM_NULL, kComm, "cannot duplicate MPI_COMM_NULL");
  MPI_Comm c = MPI_COMM_NULL;
  LOOM_MPI_CHECK(MPI_Comm_dup(parent, &c));
  MpiComm owned(c);
  LOOM_MPI_CHECK(MPI_Comm_set_errhandler(c, MPI_ERRORS_RETURN));
  return owned;
}

MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::string name, uint32_t group_id)
    : MpiCommunicator(MpiComm::dup(comm), std::move(name), group_id) {}

std::vector<int> world_ranks_of(MPI_Comm comm) {
  MPI_Group group = MPI_GROUP_NULL, world = MPI_GROUP_NULL;
  LOOM_MPI_CHECK(MPI_Comm_group(comm, &group));
  LOOM_MPI_CHECK(MPI_Comm_group(MPI_COMM_WORLD, &world));
  std::vector<int> mine(static_cast<size_t>(comm_size(comm)));
  for (size_t i = 0; i < mine.size(); ++i) mine[i] = static_cast<int>(i);
  std::vector<int> out(mine.size());
  const int rc = MPI_Group_translate_ranks(group, static_cast<int>(mine.size()), mine.data(), world, out.data());
  MPI_Group_free(&group);
  MPI_Group_free(&world);
  LOOM_MPI_CHECK(rc);
  return out;
}

MpiCommunicator::MpiCommunicator(MpiComm owned, std::string name, uint32_t group_id)
    : Communicator(std::move(name), comm_rank(owned.get()), comm_size(owned.get()), group_id),
      comm_(std::move(owned)) {
  set_world_ranks(world_ranks_of(comm_.get()));  // transfers are attributed to pairs of world ranks
}

MpiCommunicator::~MpiCommunicator() = default;

int64_t MpiCommunicator::max_chunk_elements() {
  return g_max_chunk_elements.load(std::memory_order_relaxed);
}

void MpiCommunicator::set_max_chunk_elements_for_testing(int64_t n) {
  g_max_chunk_elements.store(n <= 0 || n > INT_MAX ? INT_MAX : n, std::memory_order_relaxed);
}

bool MpiCommunicator::supports(DType dtype, bool reduction) const {
  if (reduction) return dtype == DType::kF32 || dtype == DType::kI32;
  return true;
}

namespace {

// Block i of n elements split over p ranks: [bounds[i], bounds[i+1]).
std::vector<int64_t> split_bounds(int64_t n, int p) {
  std::vector<int64_t> b(static_cast<size_t>(p) + 1);
  for (int i = 0; i <= p; ++i) b[static_cast<size_t>(i)] = n * i / p;
  return b;
}

template <class T>
void reduce_into(T* acc, const T* a, const T* b, int64_t n, ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      for (int64_t i = 0; i < n; ++i) acc[i] = a[i] + b[i];
      return;
    case ReduceOp::kMax:
      for (int64_t i = 0; i < n; ++i) acc[i] = a[i] > b[i] ? a[i] : b[i];
      return;
    case ReduceOp::kMin:
      for (int64_t i = 0; i < n; ++i) acc[i] = a[i] < b[i] ? a[i] : b[i];
      return;
  }
}

// acc = a (op) b elementwise; the reductions the MPI communicator supports (f32, i32).
void reduce_elements(void* acc, const void* a, const void* b, int64_t n, DType dtype, ReduceOp op) {
  if (dtype == DType::kF32)
    reduce_into(static_cast<float*>(acc), static_cast<const float*>(a), static_cast<const float*>(b), n, op);
  else
    reduce_into(static_cast<int32_t*>(acc), static_cast<const int32_t*>(a), static_cast<const int32_t*>(b), n, op);
}

constexpr int kRingDataTag = 11;
constexpr int kRingClockTag = 12;

}  // namespace

void MpiCommunicator::transfer(void* recv_buf, const void* send_buf, int64_t recv_count, int64_t send_count,
                               DType dtype, uint64_t seq, int step) {
  LinkTrace& links = process_link_trace();
  const int src = world_rank(left()), dst = world_rank(right());
  links.begin_transfer(group_id(), seq, step, src, dst);
  const size_t esize = dtype_size(dtype);
  const MPI_Datatype dt = mpi_dtype(dtype);
  double peer_ready = 0;
  const double recv_ready = wall_clock_s();
  std::vector<MPI_Request>& recvs = recv_requests_;
  std::vector<MPI_Request>& sends = send_requests_;
  recvs.clear();
  sends.clear();
  recvs.emplace_back();
  LOOM_MPI_CHECK(MPI_Irecv(&peer_ready, 1, MPI_DOUBLE, left(), kRingClockTag, comm(), &recvs.back()));
  for_each_chunk(recv_count, [&](int64_t off, int count) {
    recvs.emplace_back();
    LOOM_MPI_CHECK(MPI_Irecv(static_cast<char*>(recv_buf) + static_cast<size_t>(off) * esize, count, dt, left(),
                             kRingDataTag, comm(), &recvs.back()));
  });
  auto wait_recvs = [&] {
    if (recvs.empty()) return;
    LOOM_MPI_CHECK(MPI_Waitall(static_cast<int>(recvs.size()), recvs.data(), MPI_STATUSES_IGNORE));
    recvs.clear();
    const double arrived = wall_clock_s();
    links.record(src, arrived - std::max(peer_ready, recv_ready), static_cast<uint64_t>(recv_count) * esize);
    links.recv_done();
  };
  // The clock goes out before any injected delay: a slow link's delay is part of the transfer time.
  const double send_ready = wall_clock_s();
  process_comm_faults().before_send(dst, wait_recvs);
  sends.emplace_back();
  LOOM_MPI_CHECK(MPI_Isend(&send_ready, 1, MPI_DOUBLE, right(), kRingClockTag, comm(), &sends.back()));
  for_each_chunk(send_count, [&](int64_t off, int count) {
    sends.emplace_back();
    LOOM_MPI_CHECK(MPI_Isend(static_cast<const char*>(send_buf) + static_cast<size_t>(off) * esize, count, dt, right(),
                             kRingDataTag, comm(), &sends.back()));
  });
  wait_recvs();
  LOOM_MPI_CHECK(MPI_Waitall(static_cast<int>(sends.size()), sends.data(), MPI_STATUSES_IGNORE));
  links.end_transfer();
}

// Reduce-scatter ring: at step s rank r sends its running sum of block (r-s-1) and receives the left
// neighbour's running sum of block (r-s-2), adds its own contribution to it; after p-1 steps it holds block r
// reduced over all ranks. Running sums live in scratch buffers, so `in` is never written.
void MpiCommunicator::ring_reduce_scatter(const Tensor& in, void* out_block, const std::vector<int64_t>& bounds,
                                          ReduceOp op, uint64_t seq) {
  const int p = size(), r = rank();
  const DType dtype = in.dtype();
  const size_t esize = dtype_size(dtype);
  int64_t max_block = 0;
  for (int i = 0; i < p; ++i) max_block = std::max(max_block, bounds[static_cast<size_t>(i) + 1] - bounds[static_cast<size_t>(i)]);
  recv_scratch_.resize(static_cast<size_t>(max_block) * esize);
  acc_scratch_.resize(static_cast<size_t>(max_block) * esize);
  auto block = [&](int i) { return ((i % p) + p) % p; };
  auto count = [&](int i) { return bounds[static_cast<size_t>(i) + 1] - bounds[static_cast<size_t>(i)]; };
  auto own = [&](int i) { return element(in, bounds[static_cast<size_t>(i)]); };
  for (int s = 0; s < p - 1; ++s) {
    const int send_b = block(r - s - 1), recv_b = block(r - s - 2);
    const void* send = s == 0 ? own(send_b) : acc_scratch_.data();
    transfer(recv_scratch_.data(), send, count(recv_b), count(send_b), dtype, seq, s);
    void* dst = s == p - 2 ? out_block : acc_scratch_.data();
    reduce_elements(dst, recv_scratch_.data(), own(recv_b), count(recv_b), dtype, op);
  }
}

// All-gather ring: rank r holds block r of data; at step s it sends block (r-s) and receives block (r-s-1).
void MpiCommunicator::ring_all_gather(void* data, DType dtype, const std::vector<int64_t>& bounds, uint64_t seq,
                                      int first_step) {
  const int p = size(), r = rank();
  const size_t esize = dtype_size(dtype);
  auto block = [&](int i) { return ((i % p) + p) % p; };
  auto at = [&](int i) { return static_cast<char*>(data) + static_cast<size_t>(bounds[static_cast<size_t>(i)]) * esize; };
  auto count = [&](int i) { return bounds[static_cast<size_t>(i) + 1] - bounds[static_cast<size_t>(i)]; };
  for (int s = 0; s < p - 1; ++s) {
    const int send_b = block(r - s), recv_b = block(r - s - 1);
    transfer(at(recv_b), at(send_b), count(recv_b), count(send_b), dtype, seq, first_step + s);
  }
}

void MpiCommunicator::do_all_reduce(const Tensor& t, ReduceOp op) {
  if (size() == 1 || t.numel() == 0) return;
  const uint64_t seq = trace().collectives_launched() - 1;
  const std::vector<int64_t> bounds = split_bounds(t.numel(), size());
  ring_reduce_scatter(t, element(t, bounds[static_cast<size_t>(rank())]), bounds, op, seq);
  ring_all_gather(t.data(), t.dtype(), bounds, seq, size() - 1);
}

void MpiCommunicator::do_reduce_scatter(const Tensor& out, const Tensor& in, ReduceOp op) {
  const int64_t block = out.numel();
  if (block == 0) return;
  if (size() == 1) {
    if (out.data() != in.data()) std::memcpy(out.data(), in.data(), in.nbytes());
    return;
  }
  std::vector<int64_t> bounds(static_cast<size_t>(size()) + 1);
  for (int i = 0; i <= size(); ++i) bounds[static_cast<size_t>(i)] = block * i;
  ring_reduce_scatter(in, out.data(), bounds, op, trace().collectives_launched() - 1);
}

void MpiCommunicator::do_all_gather(const Tensor& out, const Tensor& in) {
  const int64_t block = in.numel();
  if (block == 0) return;
  void* own_block = element(out, rank() * block);
  if (in.data() != own_block) std::memcpy(own_block, in.data(), in.nbytes());
  if (size() == 1) return;
  std::vector<int64_t> bounds(static_cast<size_t>(size()) + 1);
  for (int i = 0; i <= size(); ++i) bounds[static_cast<size_t>(i)] = block * i;
  ring_all_gather(out.data(), out.dtype(), bounds, trace().collectives_launched() - 1, 0);
}

void MpiCommunicator::do_broadcast(const Tensor& t, int root) {
  for_each_chunk(t.numel(), [&](int64_t off, int count) {
    LOOM_MPI_CHECK(MPI_Bcast(element(t, off), count, mpi_dtype(t.dtype()), root, comm()));
  });
}

void MpiCommunicator::do_send(const Tensor& t, int peer) {
  process_comm_faults().delay_send(world_rank(peer));
  for_each_chunk(t.numel(), [&](int64_t off, int count) {
    LOOM_MPI_CHECK(MPI_Send(element(t, off), count, mpi_dtype(t.dtype()), peer, kSendRecvTag, comm()));
  });
}

void MpiCommunicator::do_recv(const Tensor& t, int peer) {
  for_each_chunk(t.numel(), [&](int64_t off, int count) {
    MPI_Status status;
    LOOM_MPI_CHECK(MPI_Recv(element(t, off), count, mpi_dtype(t.dtype()), peer, kSendRecvTag, comm(), &status));
    // A shorter message than expected is not an MPI error, but it is one here: the sides disagree on the size.
    int got = 0;
    LOOM_MPI_CHECK(MPI_Get_count(&status, mpi_dtype(t.dtype()), &got));
    LOOM_CHECK(got == count, kComm,
               "recv on '" << name() << "' from peer " << peer << ": received " << got << " elements at offset " << off
                           << ", expected " << count << " (send and recv disagree on the size of " << t.describe()
                           << ")");
  });
}

void MpiCommunicator::do_barrier() {
  LOOM_MPI_CHECK(MPI_Barrier(comm()));
}

}  // namespace loom
