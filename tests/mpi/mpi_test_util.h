// Helpers shared by the MPI tests: world facts and cross-rank agreement, computed over MPI_COMM_WORLD directly so
// they do not depend on the communicators under test.
#pragma once

#include <mpi.h>

namespace loom::test {

inline int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

inline int world_size() {
  int s = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

// How many ranks have flag set.
inline int count_ranks(bool flag) {
  int mine = flag ? 1 : 0, total = 0;
  MPI_Allreduce(&mine, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  return total;
}

}  // namespace loom::test
