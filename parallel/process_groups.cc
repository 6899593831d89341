#include "parallel/process_groups.h"

#include <algorithm>
#include <sstream>
#include <utility>
#include <vector>

#include "core/env.h"
#include "core/error.h"
#include "parallel/mpi_check.h"

namespace loom {
namespace {

MpiComm split(MPI_Comm parent, int color, int key) {
  MPI_Comm c = MPI_COMM_NULL;
  LOOM_MPI_CHECK(MPI_Comm_split(parent, color, key, &c));
  return MpiComm(c);
}

// Every rank must lay out the groups from the same numbers, or some would throw below while others wait in a
// split. One all-reduce makes the decision below the same everywhere, even when the ranks were started with
// different flags.
void check_ranks_agree(MPI_Comm world, const ParallelConfig& cfg) {
  int local[4] = {cfg.tp, -cfg.tp, cfg.ranks_per_node, -cfg.ranks_per_node};
  int global[4];
  LOOM_MPI_CHECK(MPI_Allreduce(local, global, 4, MPI_INT, MPI_MAX, world));
  LOOM_CHECK(global[0] == -global[1], kConfig,
             "ranks disagree on the tensor-parallel size (--tp): from " << -global[1] << " to " << global[0]);
  LOOM_CHECK(global[2] == -global[3], kConfig,
             "ranks disagree on --ranks-per-node: from " << -global[3] << " to " << global[2]);
}

// Checks that need only the world size and the (agreed) config.
void check_layout(int world_size, const ParallelConfig& cfg) {
  LOOM_CHECK(cfg.tp >= 1, kConfig, "the tensor-parallel size (--tp) must be at least 1, got " << cfg.tp);
  LOOM_CHECK(cfg.ranks_per_node >= 0, kConfig,
             "--ranks-per-node must be 0 (real nodes) or positive (emulated nodes), got " << cfg.ranks_per_node);
  LOOM_CHECK(world_size % cfg.tp == 0, kConfig, "--tp " << cfg.tp << " does not divide the world size " << world_size);
  if (cfg.ranks_per_node == 0) return;
  LOOM_CHECK(world_size % cfg.ranks_per_node == 0, kConfig,
             "--ranks-per-node " << cfg.ranks_per_node << " does not divide the world size " << world_size);
  LOOM_CHECK(cfg.ranks_per_node % cfg.tp == 0, kConfig,
             "tensor-parallel size " << cfg.tp << " does not fit in emulated nodes of " << cfg.ranks_per_node
                                     << " ranks (a tensor-parallel group must sit inside one node, so ranks per "
                                        "node must be a multiple of --tp)");
}

struct NodeLayout {
  MpiComm comm;  // the ranks of this rank's node
  int node_id = 0;
  int num_nodes = 1;
  int host_size = 1;  // the ranks on this rank's machine (several emulated nodes may share one)
};

// The number of ranks on this rank's machine.
int ranks_on_host(MPI_Comm world, int rank) {
  MPI_Comm c = MPI_COMM_NULL;
  LOOM_MPI_CHECK(MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &c));
  MpiComm host(c);
  int n = 1;
  LOOM_MPI_CHECK(MPI_Comm_size(c, &n));
  return n;
}

NodeLayout emulated_node_layout(MPI_Comm world, int rank, int world_size, int ranks_per_node) {
  NodeLayout n;
  n.node_id = rank / ranks_per_node;
  n.num_nodes = world_size / ranks_per_node;
  n.comm = split(world, n.node_id, rank);
  n.host_size = ranks_on_host(world, rank);
  return n;
}

// Real nodes: every rank learns every rank's node (named by its lowest world rank, the leader) and node size,
// then all ranks validate the same table.
NodeLayout real_node_layout(MPI_Comm world, int rank, int world_size, int tp) {
  NodeLayout n;
  MPI_Comm c = MPI_COMM_NULL;
  LOOM_MPI_CHECK(MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &c));
  n.comm = MpiComm(c);
  int mine[2] = {rank, 0};  // leader, node size
  LOOM_MPI_CHECK(MPI_Comm_size(c, &mine[1]));
  n.host_size = mine[1];
  LOOM_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &mine[0], 1, MPI_INT, MPI_MIN, c));
  std::vector<int> table(2 * static_cast<size_t>(world_size));  // (leader, node size) of every rank
  LOOM_MPI_CHECK(MPI_Allgather(mine, 2, MPI_INT, table.data(), 2, MPI_INT, world));
  auto leader = [&](int r) { return table[2 * static_cast<size_t>(r)]; };
  auto node_size = [&](int r) { return table[2 * static_cast<size_t>(r) + 1]; };

  for (int r = 1; r < world_size; ++r) {
    LOOM_CHECK(node_size(r) == node_size(0), kConfig,
               "nodes hold different numbers of ranks: the node of rank 0 has "
                   << node_size(0) << ", the node of rank " << r << " has " << node_size(r)
                   << "; Loom needs the same number of ranks on every node");
  }
  LOOM_CHECK(node_size(0) % tp == 0, kConfig,
             "tensor-parallel size " << tp << " does not fit in nodes of " << node_size(0)
                                     << " ranks (a tensor-parallel group must sit inside one node)");
  for (int r = 0; r < world_size; ++r) {
    int first = r - r % tp;  // first rank of r's TP group
    LOOM_CHECK(leader(r) == leader(first), kConfig,
               "ranks " << first << " and " << r << " of one tensor-parallel group are on different nodes; "
                        << "place consecutive ranks on the same node (mpirun --map-by slot or core, not node)");
  }
  std::vector<int> leaders;
  for (int r = 0; r < world_size; ++r) leaders.push_back(leader(r));
  std::sort(leaders.begin(), leaders.end());
  leaders.erase(std::unique(leaders.begin(), leaders.end()), leaders.end());
  n.num_nodes = static_cast<int>(leaders.size());
  n.node_id = static_cast<int>(std::lower_bound(leaders.begin(), leaders.end(), mine[0]) - leaders.begin());
  return n;
}

}  // namespace

std::unique_ptr<ProcessGroups> ProcessGroups::create(MPI_Comm world, const ParallelConfig& cfg) {
  std::unique_ptr<ProcessGroups> g(new ProcessGroups());
  // The world communicator first: everything below runs on its duplicate, which returns errors instead of
  // aborting, and every split inherits that.
  g->world_ = std::make_unique<MpiCommunicator>(world, "world", kWorldGroupId);
  MPI_Comm w = g->world_->comm();
  const int rank = g->world_->rank();
  const int size = g->world_->size();

  check_ranks_agree(w, cfg);
  check_layout(size, cfg);
  NodeLayout nodes = cfg.ranks_per_node > 0 ? emulated_node_layout(w, rank, size, cfg.ranks_per_node)
                                            : real_node_layout(w, rank, size, cfg.tp);
  g->node_id_ = nodes.node_id;
  g->num_nodes_ = nodes.num_nodes;
  g->host_size_ = nodes.host_size;
  g->emulated_nodes_ = cfg.ranks_per_node > 0;

  // Key = world rank keeps group ranks in world order: tp_rank = r % tp, dp_rank = r / tp.
  MpiComm tp = split(w, rank / cfg.tp, rank);
  MpiComm dp = split(w, rank % cfg.tp, rank);
  g->tp_ = std::make_unique<MpiCommunicator>(tp.get(), "tp", kTpGroupId);
  g->dp_ = std::make_unique<MpiCommunicator>(dp.get(), "dp", kDpGroupId);
  g->node_ = std::make_unique<MpiCommunicator>(nodes.comm.get(), "node", kNodeGroupId);
  LOOM_ASSERT(g->tp_rank() == rank % cfg.tp && g->dp_rank() == rank / cfg.tp);
  return g;
}

std::string ProcessGroups::describe() const {
  std::ostringstream os;
  os << "world " << world_size() << " = dp " << dp_size() << " x tp " << tp_size() << ", " << num_nodes_
     << (num_nodes_ == 1 ? " node (" : " nodes (") << (emulated_nodes_ ? "emulated, " : "") << local_size()
     << (num_nodes_ == 1 ? " ranks)" : " ranks each)");
  return os.str();
}

int detect_local_rank() {
  // Open MPI, MVAPICH2, MPICH (Hydra), PMI-based launchers (Cray PALS, PMIx), Slurm's srun.
  static const char* const kVariables[] = {"OMPI_COMM_WORLD_LOCAL_RANK",
                                           "MV2_COMM_WORLD_LOCAL_RANK",
                                           "MPI_LOCALRANKID",
                                           "PMI_LOCAL_RANK",
                                           "PALS_LOCAL_RANKID",
                                           "SLURM_LOCALID"};
  for (const char* name : kVariables) {
    int64_t v = env::get_int(name, -1);
    if (v >= 0) return static_cast<int>(v);
  }
  return -1;
}

void ProcessGroups::use_device_communicators(const DeviceCommFactory& make) {
  tp_device_ = make(*tp_, "tp", kTpGroupId);
  dp_device_ = make(*dp_, "dp", kDpGroupId);
}

}  // namespace loom
