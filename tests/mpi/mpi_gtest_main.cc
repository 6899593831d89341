// main() of the MPI tests: GoogleTest under mpirun, e.g.
//   mpirun --oversubscribe -np 4 ./test_communicator
// Rank 0 prints the usual GoogleTest output; the other ranks print only their failures, each line prefixed by
// "[rank r]", so the output appears once but no failure is hidden. Every rank exits non-zero when any rank
// had a failure, so mpirun (and ctest) report the test as failed.
//
// Assumes the tests call collectives in the same order on every rank and check with EXPECT_* where a failure
// would otherwise skip a collective (an ASSERT_* that returns early on one rank leaves the others waiting).
#include <gtest/gtest.h>
#include <unistd.h>

#include <sstream>
#include <string>
#include <vector>

#include "parallel/mpi_check.h"  // <mpi.h>

namespace {

void write_whole(const std::string& text) {
  size_t off = 0;
  while (off < text.size()) {
    ssize_t w = ::write(STDERR_FILENO, text.data() + off, text.size() - off);
    if (w <= 0) return;
    off += static_cast<size_t>(w);
  }
}

// Replaces the default printer on ranks other than 0: failures only, each written in one write() so the
// lines of different ranks do not interleave.
class RankFailurePrinter : public testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : prefix_("[rank " + std::to_string(rank) + "] ") {}

  void OnTestPartResult(const testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::ostringstream os;
    os << prefix_ << (result.file_name() ? result.file_name() : "unknown file") << ":" << result.line_number()
       << ": Failure\n";
    std::istringstream message(result.message());
    for (std::string line; std::getline(message, line);) os << prefix_ << line << "\n";
    write_whole(os.str());
  }

  void OnTestEnd(const testing::TestInfo& info) override {
    if (info.result()->Failed())
      write_whole(prefix_ + "[  FAILED  ] " + info.test_suite_name() + "." + info.name() + "\n");
  }

 private:
  std::string prefix_;
};

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  testing::InitGoogleTest(&argc, argv);
  if (rank != 0) {
    testing::TestEventListeners& listeners = testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }

  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (any_failed) {
    // Rank 0's summary alone may read PASSED: name every rank that failed.
    int size = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    std::vector<int> failed_by_rank(static_cast<size_t>(size));
    MPI_Gather(&failed, 1, MPI_INT, failed_by_rank.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (rank == 0) {
      std::string ranks;
      for (int r = 0; r < size; ++r)
        if (failed_by_rank[static_cast<size_t>(r)]) ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
      write_whole("[rank 0] FAILED on rank(s) " + ranks + " (see their \"[rank r]\" lines)\n");
    }
  }
  MPI_Finalize();
  return any_failed ? 1 : 0;
}
