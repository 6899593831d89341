#!/usr/bin/env bash
# The monitor names a slow rank (+30 % step time) and a slow link (5 ms per transfer on one pair) within 60 s,
# without mistaking one for the other: 4 ranks, TP 2 x DP 2 on 2 emulated nodes.
source "$(dirname "$0")/lib.sh"

# The slowdown starts 30 s in, after the monitor learned each rank's usual deviation from the others (a rank
# that is slower than the others from the start is only named beyond 30 points; see test_monitor.cc).
FAULT_AFTER_S=30 monitored_fault slow slow 2 --fault-slowdown 0.3
verdict_check slow 'v["kind"] == "slow_rank" and v["ranks"] == [2] and 0 < t <= 60.0'

# Rank 1's transfers to its DP ring neighbour 3 (another node) are delayed.
monitored_fault slow_link slow_link 1 --fault-peer 3 --fault-delay-ms 5
verdict_check slow_link 'v["kind"] == "slow_link" and v.get("link") == {"src": 1, "dst": 3} and 0 < t <= 60.0'

# The link probe (monitor.link_probe): DP 4 over all four ranks, whose ring sends 0 -> 1 -> 2 -> 3 -> 0 and never
# 0 -> 2, so only the probes (every pair of the group) carry a delay on that pair to the monitor.
TP=1 monitored_fault probe_link slow_link 0 --fault-peer 2 --fault-delay-ms 5 --link-probe on
verdict_check probe_link 'v["kind"] == "slow_link" and v.get("link") == {"src": 0, "dst": 2} and 0 < t <= 60.0'
