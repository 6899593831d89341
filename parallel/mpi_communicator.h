// MpiCommunicator: the Communicator on host memory over MPI — the CPU training path, and the reference the
// GPU communicators are tested against. Also MpiComm, the RAII owner of an MPI_Comm.
//
// Assumes MPI is initialised before any of these is built and finalised after all of them are destroyed.
// dtypes: f32 and i32 move and reduce; bf16 and u16 move as raw 16-bit elements (reducing them is refused with
// a kComm error: summing bf16 needs an f32 accumulator, which MPI does not have). MPI counts are int, so a
// call on more than INT_MAX elements is split into chunks of at most max_chunk_elements().
//
// all_reduce, reduce_scatter and all_gather run as rings of point-to-point transfers written here, not as MPI's
// own collectives: each transfer is timed and attributed to its pair of ranks, and fault injection can delay or
// stall one link (parallel/link_trace.h). The ring gives every rank bit-identical results (each block is
// reduced on one rank, in a fixed order, then copied). broadcast and barrier use MPI's.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "parallel/communicator.h"
#include "parallel/mpi_check.h"

namespace loom {

// Owns one MPI communicator and frees it on destruction (skipped once MPI is finalised, where freeing is
// invalid; the handle is gone with MPI then).
class MpiComm {
 public:
  MpiComm() = default;
  explicit MpiComm(MPI_Comm comm) : comm_(comm) {}
  ~MpiComm();
  MpiComm(MpiComm&& o) noexcept : comm_(o.release()) {}
  MpiComm& operator=(MpiComm&& o) noexcept;
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;

  MPI_Comm get() const { return comm_; }
  MPI_Comm release() {
    MPI_Comm c = comm_;
    comm_ = MPI_COMM_NULL;
    return c;
  }
  explicit operator bool() const { return comm_ != MPI_COMM_NULL; }

  // Collective over parent: a duplicate of it, with MPI_ERRORS_RETURN so that failures surface as loom::Error
  // through LOOM_MPI_CHECK instead of aborting the job.
  static MpiComm dup(MPI_Comm parent);

 private:
  void reset();
  MPI_Comm comm_ = MPI_COMM_NULL;
};

// The world rank (MPI_COMM_WORLD) of each rank of comm, in comm's rank order.
std::vector<int> world_ranks_of(MPI_Comm comm);

class MpiCommunicator : public Communicator {
 public:
  // Collective over comm (every rank of it must construct one): the communicator works on its own duplicate,
  // so its messages never match the caller's traffic on comm.
  MpiCommunicator(MPI_Comm comm, std::string name, uint32_t group_id);
  ~MpiCommunicator() override;

  MPI_Comm comm() const { return comm_.get(); }
  Device device() const override { return Device::kCpu; }
  const char* backend_name() const override { return "MPI"; }
  bool traces_links() const override { return true; }

  // The most elements one MPI call carries (default INT_MAX). Tests lower it to run the chunked paths on small
  // tensors; n <= 0 restores the default. Every rank must use the same value.
  static int64_t max_chunk_elements();
  static void set_max_chunk_elements_for_testing(int64_t n);

 protected:
  bool supports(DType dtype, bool reduction) const override;
  void do_all_reduce(const Tensor& t, ReduceOp op) override;
  void do_reduce_scatter(const Tensor& out, const Tensor& in, ReduceOp op) override;
  void do_all_gather(const Tensor& out, const Tensor& in) override;
  void do_broadcast(const Tensor& t, int root) override;
  void do_send(const Tensor& t, int peer) override;
  void do_recv(const Tensor& t, int peer) override;
  void do_barrier() override;

 private:
  // Takes ownership of an already duplicated communicator.
  MpiCommunicator(MpiComm owned, std::string name, uint32_t group_id);

  // Ring phases over blocks [bounds[i], bounds[i+1]) of `data` (elements of dtype).
  void ring_reduce_scatter(const Tensor& in, void* out_block, const std::vector<int64_t>& bounds, ReduceOp op,
                           uint64_t seq);
  void ring_all_gather(void* data, DType dtype, const std::vector<int64_t>& bounds, uint64_t seq, int first_step);
  // One ring step: receive `recv_count` elements from the left neighbour into recv_buf while sending
  // `send_count` elements of send_buf to the right one; timed and traced (parallel/link_trace.h).
  void transfer(void* recv_buf, const void* send_buf, int64_t recv_count, int64_t send_count, DType dtype,
                uint64_t seq, int step);
  int left() const { return (rank() + size() - 1) % size(); }
  int right() const { return (rank() + 1) % size(); }

  MpiComm comm_;
  std::vector<char> recv_scratch_, acc_scratch_;
  std::vector<MPI_Request> recv_requests_, send_requests_;  // of the transfer in flight (reused: no allocation)
};

}  // namespace loom
