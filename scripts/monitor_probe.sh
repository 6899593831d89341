#!/usr/bin/env bash
# What the slow-rank rule sees: runs the CPU test job (4 ranks, TP 2 x DP 2 on 2 emulated nodes, the e2e tests'
# SMALL model) under a monitor for SECONDS, reads the monitor's /status.json every 5 s and prints, per complete
# 5 s window, each rank's fraction of time waiting (inside collectives, or for a CPU outside them), the part of
# it that was run-queue delay, and how far the rank is below its learned baseline deviation (the rule names a
# rank at max(6 points, 4 x the learned noise) in 3 consecutive windows; status.json shows the threshold).
#   bash scripts/monitor_probe.sh [SECONDS=120] [gpt-train fault flags...]
#   e.g. bash scripts/monitor_probe.sh 90 --fault-kind slow --fault-rank 2 --fault-slowdown 0.15 --fault-after-s 40
# LOOM_BIN defaults to build/bin (set LOOM_BIN=build-cpu/bin for the CPU build).
source "$(dirname "$0")/../tests/e2e/lib.sh"
secs=${1:-120}
shift || true
job=probe$$
d=$WORK/probe
start_monitor "$d" $job tok$$
mon=$MON_PID
trap 'pkill -KILL -f -- "--monitor-job '$job'" 2>/dev/null || true; kill $mon 2>/dev/null || true; rm -rf "$WORK"' EXIT
port=$MON_PORT
mpi 4 "$LOOM_BIN/gpt-train" "${SMALL[@]}" --steps 1000000 --tp 2 --ranks-per-node 2 --snapshot-job $job \
  --monitor "127.0.0.1:$port" --monitor-job $job --monitor-token tok$$ --metrics-file "$d/m.jsonl" "$@" \
  >"$d/run.log" 2>&1 &
for i in $(seq 1 $((secs / 5))); do
  sleep 5
  "$LOOM_PYTHON3" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
    "http://127.0.0.1:$port/status.json" >"$d/s.$i.json" 2>/dev/null || true
done
pkill -TERM -f -- "--monitor-job $job" 2>/dev/null || true
sleep 2
stop_daemons $job
"$LOOM_PYTHON3" - "$d" <<'PY'
import json, os, sys
d, last = sys.argv[1], None
print("  time  waiting (%) per rank        | of it run queue (%)       | points below own baseline | threshold | verdicts")
for i in range(1, 100000):
    f = f"{d}/s.{i}.json"
    if not os.path.exists(f):
        break
    try:
        s = json.load(open(f))
    except ValueError:
        continue
    c = s["comm_fraction"]
    if not c["fraction"] or json.dumps(c["fraction"]) == last:
        continue  # no complete window yet, or the same window as the last read
    last = json.dumps(c["fraction"])
    frac = " ".join(f"{v * 100:5.1f}" for v in c["fraction"].values())
    runq = " ".join(f"{c.get('run_queue', {}).get(r, float('nan')) * 100:5.1f}" for r in c["fraction"])
    below = " ".join(f"{(c['baseline'].get(r, 0) - v) * 100:5.1f}" for r, v in c["deviation"].items())
    print(f"{i * 5:5d} s  {frac}  | {runq} | {below} | {c.get('threshold', 0) * 100:9.1f} | {len(s['verdicts'])}")
    for v in s["verdicts"]:
        print("        verdict:", v["kind"], v["summary"])
PY
