// ProcessGroups: how the ranks of a job are split into tensor-parallel (TP), data-parallel (DP) and node
// groups, and one MpiCommunicator for each group this rank belongs to.
//
// Layout: world = DP x TP with the TP ranks contiguous — rank r has tp_rank = r % tp and dp_rank = r / tp —
// so with ranks placed on nodes in order (mpirun's default, --map-by slot/core) every TP group sits inside one
// node, where its all-reduces run on the fast links. Nodes are either the real ones (ranks that share memory,
// MPI_Comm_split_type) or emulated: ranks_per_node consecutive ranks per node, so one machine can stand for
// several nodes in fault tests. Node ids count nodes in the order of their lowest world rank.
//
// A bad layout is a kConfig error thrown identically on every rank before any group is created, so no rank is
// left waiting in a split that others never reach.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "parallel/mpi_communicator.h"

namespace loom {

struct ParallelConfig {
  int tp = 1;              // tensor-parallel size; the data-parallel size is world / tp
  int ranks_per_node = 0;  // 0: real nodes (shared memory); > 0: emulated nodes of this many consecutive ranks
};

// Group ids of the trace records (parallel/trace.h).
inline constexpr uint32_t kWorldGroupId = 0;
inline constexpr uint32_t kTpGroupId = 1;
inline constexpr uint32_t kDpGroupId = 2;
inline constexpr uint32_t kNodeGroupId = 3;

class ProcessGroups {
 public:
  // Collective over world (usually MPI_COMM_WORLD; every rank of it must call with the same cfg — ranks that
  // disagree get a kConfig error, all of them).
  static std::unique_ptr<ProcessGroups> create(MPI_Comm world, const ParallelConfig& cfg);

  // The communicators of the training tensors: MPI on host memory, or the device communicators installed by
  // use_device_communicators() (NCCL, or host-staged MPI) when training on GPUs. world() and node() always stay on MPI: they carry
  // control traffic (start-up agreement, barriers), never tensors of the model.
  Communicator& world() { return *world_; }
  Communicator& tp() { return tp_device_ ? *tp_device_ : *tp_; }
  Communicator& dp() { return dp_device_ ? *dp_device_ : *dp_; }
  Communicator& node() { return *node_; }  // the ranks of this rank's (emulated) node
  MpiCommunicator& host_tp() { return *tp_; }
  MpiCommunicator& host_dp() { return *dp_; }
  // Builds a device communicator for the TP and the DP group with `make` (collective over each group, TP
  // first); tp() and dp() return them from then on.
  using DeviceCommFactory =
      std::function<std::unique_ptr<Communicator>(MpiCommunicator& group, const std::string& name, uint32_t id)>;
  void use_device_communicators(const DeviceCommFactory& make);

  int rank() const { return world_->rank(); }
  int world_size() const { return world_->size(); }
  int tp_rank() const { return tp_->rank(); }
  int tp_size() const { return tp_->size(); }
  int dp_rank() const { return dp_->rank(); }
  int dp_size() const { return dp_->size(); }
  int node_id() const { return node_id_; }
  int num_nodes() const { return num_nodes_; }
  int local_rank() const { return node_->rank(); }  // rank within the node
  int local_size() const { return node_->size(); }
  int host_size() const { return host_size_; }  // ranks on this machine (>= local_size() with emulated nodes)
  bool emulated_nodes() const { return emulated_nodes_; }

  // "world 4 = dp 2 x tp 2, 2 nodes (emulated, 2 ranks each)"
  std::string describe() const;

 private:
  ProcessGroups() = default;

  std::unique_ptr<MpiCommunicator> world_, tp_, dp_, node_;
  std::unique_ptr<Communicator> tp_device_, dp_device_;
  int node_id_ = 0;
  int num_nodes_ = 1;
  int host_size_ = 1;
  bool emulated_nodes_ = false;
};

// This process's rank within its node as the MPI launcher announces it in the environment (Open MPI, MPICH
// and MVAPICH, Slurm, PMIx), readable before MPI_Init — for picking a GPU before CUDA starts. -1 when no
// launcher variable is set.
int detect_local_rank();

}  // namespace loom
