// The link probe's schedule (parallel/link_probe.h): each round pairs ranks disjointly, and one cycle of rounds
// meets every pair once (groups of up to 8 ranks) or every ring edge once (larger groups), the same on every
// rank and forever after.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>
#include <utility>

#include "parallel/link_probe.h"

namespace loom {
namespace {

TEST(LinkProbeSchedule, EachRoundPairsRanksDisjointlyAndACycleMeetsEachProbedPairOnce) {
  for (int n = 1; n <= 21; ++n) {
    const int cycle = LinkProbe::cycle_rounds(n);
    std::map<std::pair<int, int>, int> met;
    for (int64_t round = 0; round < cycle; ++round) {
      std::set<int> busy;
      for (const auto& [lo, hi] : LinkProbe::pairs(n, round)) {
        ASSERT_LT(lo, hi) << "n " << n << " round " << round;
        ASSERT_GE(lo, 0);
        ASSERT_LT(hi, n);
        EXPECT_TRUE(busy.insert(lo).second) << "rank " << lo << " twice in round " << round << " of n " << n;
        EXPECT_TRUE(busy.insert(hi).second) << "rank " << hi << " twice in round " << round << " of n " << n;
        ++met[{lo, hi}];
      }
    }
    std::map<std::pair<int, int>, int> want;
    if (n <= LinkProbe::kAllPairsMax) {
      for (int a = 0; a < n; ++a)
        for (int b = a + 1; b < n; ++b) want[{a, b}] = 1;
    } else {
      for (int i = 0; i < n; ++i) want[{std::min(i, (i + 1) % n), std::max(i, (i + 1) % n)}] = 1;
    }
    EXPECT_EQ(met, want) << "n " << n << " over " << cycle << " rounds";
    // No idle round: every round of a cycle meets some pair.
    for (int64_t round = 0; n >= 2 && round < cycle; ++round) EXPECT_FALSE(LinkProbe::pairs(n, round).empty());
    for (int64_t round = 0; round < 2 * cycle; ++round)
      EXPECT_EQ(LinkProbe::pairs(n, round), LinkProbe::pairs(n, round + cycle)) << "n " << n << " round " << round;
  }
}

TEST(LinkProbeSchedule, LargeRoundNumbersStayOnTheSchedule) {
  const int64_t big = (int64_t{1} << 40) + 3;
  EXPECT_EQ(LinkProbe::pairs(8, big), LinkProbe::pairs(8, big % 7));
  EXPECT_EQ(LinkProbe::pairs(13, big), LinkProbe::pairs(13, big % 3));
}

}  // namespace
}  // namespace loom
