#!/usr/bin/env bash
# `loom run` with one spare survives a crash and a hang in the same run: 4 ranks (TP 2 x DP 2) on 2 emulated
# nodes; rank 2 is killed at step 150 (epoch 0) and rank 1 hangs at step 300 (epoch 1). The launcher must name
# both, exclude node 1 for the spare after the crash (its daemon and memory are gone: the restart rebuilds them
# from the erasure-coding group), keep node 0 after the hang (no spare left), and finish with the same losses, step
# for step, as a fault-free run.
source "$(dirname "$0")/lib.sh"
steps=450
args=("${SMALL[@]}" --steps $steps --tp 2)
LOOM_RANKS_PER_NODE=2 mpi 4 "$LOOM_BIN/gpt-train" "${args[@]}" --snapshot-job lref$$ --metrics-file "$WORK/reference.jsonl" \
  >/dev/null
cd "$WORK"
export LOOM_MPIRUN
start=$(date +%s)
timeout 600 "$LOOM_BIN/loom" run --np 4 --ranks-per-node 2 --spares 1 --max-restarts 3 --job lrun$$ \
  --verdict-dir "$WORK/verdicts" --summary-file "$WORK/summary.json" -- \
  "$LOOM_BIN/gpt-train" "${args[@]}" --log-level info --metrics-file "$WORK/run.jsonl" \
  --fault-plan "crash:2:150:0;hang:1:300:1" >"$WORK/run.log" 2>&1 || { tail -40 "$WORK/run.log"; fail "loom run failed"; }
echo "loom run took $(($(date +%s) - start)) s"
grep '^loom run' "$WORK/run.log"
sed -n '/summary of job/,$p' "$WORK/run.log"
stop_daemons lrun$$
grep -q "loom run: verdict crash: rank 2 " "$WORK/run.log" || fail "the crash of rank 2 was not named"
grep -q "loom run: excluding emulated node 1; spare s0" "$WORK/run.log" || fail "node 1 was not replaced by the spare"
grep -q "loom run: verdict hang: rank(s) 1 stopped outside communication" "$WORK/run.log" || fail "the hang of rank 1 was not named"
grep -q "no spare left: node 0 stays in" "$WORK/run.log" || fail "the launcher did not say that node 0 stays in"
grep -q "node(s) 1 lost their snapshots: rebuilding step" "$WORK/run.log" || fail "node 1's snapshots were not rebuilt from the EC group"
grep -q "loom run: epoch 2 finished" "$WORK/run.log" || fail "the third incarnation did not finish"
"$LOOM_PYTHON3" - "$WORK/summary.json" <<'PY' || fail "summary.json is wrong"
import json, sys
s = json.load(open(sys.argv[1]))
kinds = [f["kind"] for f in s["faults"]]
print("summary:", kinds, "restarts", s["restarts"], "steps lost", s["steps_lost"], "time lost %.1f s" % s["time_lost_s"])
assert s["finished"] and s["restarts"] == 2 and kinds == ["crash", "hang"], s
assert all(f["detection_s"] < 10 for f in s["faults"]), s
PY
same_run "$WORK/run.jsonl" "$WORK/reference.jsonl" || fail "the run with two faults diverged from the fault-free run"
[ "$(merged_losses "$WORK/run.jsonl" | tail -1 | cut -d' ' -f1)" = $steps ] || fail "the run did not reach step $steps"
echo "loom run survived a crash and a hang; losses identical to the fault-free run"
