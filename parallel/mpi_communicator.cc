#include "parallel/mpi_communicator.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <utility>

#include "core/error.h"
#include "core/log.h"
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

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return MPI_SUM;
    case ReduceOp::kMax: return MPI_MAX;
    case ReduceOp::kMin: return MPI_MIN;
  }
  LOOM_THROW(kInternal, "no MPI op for reduce op " << static_cast<int>(op));
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

MpiCommunicator::MpiCommunicator(MpiComm owned, std::string name, uint32_t group_id)
    : Communicator(std::move(name), comm_rank(owned.get()), comm_size(owned.get()), group_id),
      comm_(std::move(owned)) {}

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

void MpiCommunicator::do_all_reduce(const Tensor& t, ReduceOp op) {
  for_each_chunk(t.numel(), [&](int64_t off, int count) {
    LOOM_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, element(t, off), count, mpi_dtype(t.dtype()), mpi_op(op), comm()));
  });
}

void MpiCommunicator::do_reduce_scatter(const Tensor& out, const Tensor& in, ReduceOp op) {
  const int64_t block = out.numel();
  if (block == 0) return;
  const bool in_place = out.data() == element(in, rank() * block);
  if (!in_place && in.numel() <= max_chunk_elements()) {
    LOOM_MPI_CHECK(MPI_Reduce_scatter_block(in.data(), out.data(), static_cast<int>(block), mpi_dtype(in.dtype()),
                                            mpi_op(op), comm()));
    return;
  }
  // Too large for one call, or in place (MPI's in-place reduce-scatter wants the input where the output
  // goes): one reduce per owner of a block, per chunk. Each touches only contiguous memory, which is what MPI's
  // reductions handle everywhere (reductions over strided derived datatypes are not portable).
  for_each_chunk(block, [&](int64_t off, int count) {
    for (int owner = 0; owner < size(); ++owner) {
      void* send = element(in, owner * block + off);
      if (owner == rank()) {
        LOOM_MPI_CHECK(MPI_Reduce(in_place ? MPI_IN_PLACE : send, element(out, off), count, mpi_dtype(in.dtype()),
                                  mpi_op(op), owner, comm()));
      } else {
        LOOM_MPI_CHECK(MPI_Reduce(send, nullptr, count, mpi_dtype(in.dtype()), mpi_op(op), owner, comm()));
      }
    }
  });
}

void MpiCommunicator::do_all_gather(const Tensor& out, const Tensor& in) {
  const int64_t block = in.numel();
  if (block == 0) return;
  void* own_block = element(out, rank() * block);
  const bool in_place = in.data() == own_block;
  if (out.numel() <= max_chunk_elements()) {
    MPI_Datatype dt = mpi_dtype(in.dtype());
    LOOM_MPI_CHECK(MPI_Allgather(in_place ? MPI_IN_PLACE : in.data(), static_cast<int>(block), dt, out.data(),
                                 static_cast<int>(block), dt, comm()));
    return;
  }
  // Too large for one call: every rank's block is broadcast from its owner, in chunks.
  if (!in_place) std::memcpy(own_block, in.data(), in.nbytes());
  for (int owner = 0; owner < size(); ++owner) {
    for_each_chunk(block, [&](int64_t off, int count) {
      LOOM_MPI_CHECK(MPI_Bcast(element(out, owner * block + off), count, mpi_dtype(in.dtype()), owner, comm()));
    });
  }
}

void MpiCommunicator::do_broadcast(const Tensor& t, int root) {
  for_each_chunk(t.numel(), [&](int64_t off, int count) {
    LOOM_MPI_CHECK(MPI_Bcast(element(t, off), count, mpi_dtype(t.dtype()), root, comm()));
  });
}

void MpiCommunicator::do_send(const Tensor& t, int peer) {
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
