#!/usr/bin/env bash
# Two minutes of fault-free training under the monitor (4 ranks, TP 2 x DP 2 on 2 emulated nodes) reach no
# verdict: the monitor's rules must not fire on the noise of a loaded 2-core machine. The run ends cleanly
# (BYE from every rank), and the monitor saw all four ranks finish.
source "$(dirname "$0")/lib.sh"
d=$WORK/quiet
start_monitor "$d" quiet$$ tok$$
mon=$MON_PID
# (set -e holds inside the trap too: nothing left to kill must not fail the test)
trap 'pkill -KILL -f -- "--monitor-job quiet$$" 2>/dev/null || true; kill $mon 2>/dev/null || true
[ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"' EXIT
port=$MON_PORT
# The run is stopped after 120 s; what counts is the monitor's state just before that.
start=$(date +%s)
mpi 4 "$LOOM_BIN/gpt-train" "${SMALL[@]}" --steps 1000000 --tp 2 --ranks-per-node 2 --snapshot-job quiet$$ \
  --monitor "127.0.0.1:$port" --monitor-job quiet$$ --monitor-token tok$$ --metrics-file "$d/m.jsonl" >"$d/run.log" 2>&1 &
job=$!
sleep "${QUIET_S:-120}"
curl -s "http://127.0.0.1:$port/status.json" >"$d/status.json" || true
# `mpi` runs in a background subshell: stop mpirun itself (its command line carries the job's marker).
pkill -TERM -f -- "--monitor-job quiet$$" 2>/dev/null || true
wait "$job" 2>/dev/null || true
stop_daemons quiet$$
steps=$(tail -1 "$d/m.jsonl" | sed -n 's/^{"step":\([0-9]*\),.*/\1/p')
echo "fault-free: $steps steps in $(($(date +%s) - start)) s"
[ "${steps:-0}" -gt 100 ] || fail "the run made no progress ($steps steps)"
# The verdict that counts is one reached before the job was stopped at 120 s.
"$LOOM_PYTHON3" - "$d/status.json" <<'PY' || fail "the monitor reached a verdict on a fault-free run"
import json, sys
s = json.load(open(sys.argv[1]))
alive = [r["rank"] for r in s["ranks"] if r["state"] == "alive"]
print(f"status before the stop: ranks alive {alive}, verdicts {len(s['verdicts'])}, p99 gap {s['p99_gap_s']*1e3:.1f} ms, "
      f"hang threshold {s['hang_threshold_s']:.1f} s")
for v in s["verdicts"]:
    print("  verdict:", v["kind"], v["summary"])
assert sorted(alive) == [0, 1, 2, 3], "not all ranks alive before the stop"
# Every rank reports its run-queue delay outside collectives (where the kernel has schedstat), and it is a
# fraction of the window.
import os
if os.path.exists("/proc/thread-self/schedstat"):
    q = s["comm_fraction"]["run_queue"]
    print("run queue outside collectives, last window:", {r: round(v, 3) for r, v in q.items()})
    assert sorted(q) == ["0", "1", "2", "3"], f"run_queue reported for {sorted(q)}"
    assert all(0 <= v <= 1 for v in q.values()), q
sys.exit(1 if s["verdicts"] else 0)
PY
