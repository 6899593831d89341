#!/usr/bin/env bash
# The monitor names crash and hang faults: 4 ranks (TP 2 x DP 2 on 2 emulated nodes), the fault injected into
# rank 2 or 1 after step 300; each verdict must name the right kind and rank (or link) and come within the
# targets: a crash within 2 s of the kill, a hang within 10 s of its start.
source "$(dirname "$0")/lib.sh"

monitored_fault crash crash 2
verdict_check crash 'v["kind"] == "crash" and v["ranks"] == [2] and v["node"] == 1 and t <= 2.0'

monitored_fault hang hang 1
verdict_check hang 'v["kind"] == "hang" and v["ranks"] == [1] and v["node"] == 0 and "outside communication" in v["summary"] and t <= 10.0'

# Rank 3 receives its input and never sends to its TP peer 2: the stalled link is 3 -> 2.
monitored_fault hang_comm hang_comm 3
verdict_check hang_comm 'v["kind"] == "hang" and v.get("link") == {"src": 3, "dst": 2} and t <= 10.0'

# `loom inspect` shows a verdict with its evidence.
"$LOOM_BIN/loom" inspect "$WORK/hang_comm/verdict.json" >"$WORK/inspect.txt"
grep -q "kind    : hang" "$WORK/inspect.txt" || fail "loom inspect does not show the verdict's kind"
grep -q '"evidence": {' "$WORK/inspect.txt" || fail "loom inspect does not show the evidence"

# With link probes on an odd group (DP 3, one round per step: a rank sits out each round, so the ranks' probe
# calls differ; the hang comes mid-cycle), the hang is still named by the collective counts, and the ranks
# waiting for the hung one inside a probe are not taken for stopped ones (counting the probe calls named 0 and 2).
FAULT_STEP=301 NP=3 TP=1 RPN=1 monitored_fault probe_hang hang 1 --link-probe on --probe-rounds 1 --batch-size 12
verdict_check probe_hang 'v["kind"] == "hang" and v["ranks"] == [1] and 0 < t <= 10.0'
