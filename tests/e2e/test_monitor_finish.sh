#!/usr/bin/env bash
# A job that finishes under the monitor: every rank says BYE "done", and its last heartbeat still counts the
# collectives it ran (it goes out before the communicators are freed), the same number on every rank of a
# TP=2 x DP=2 job (each rank runs the same collectives), all of them completed; no verdict.
source "$(dirname "$0")/lib.sh"
d=$WORK/finish
start_monitor "$d" fin$$ tok$$
mon=$MON_PID
trap 'kill $mon 2>/dev/null || true; [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"' EXIT
mpi 4 "$LOOM_BIN/gpt-train" "${SMALL[@]}" --steps 30 --tp 2 --snapshot-every 0 --monitor "127.0.0.1:$MON_PORT" \
  --monitor-job fin$$ --monitor-token tok$$ >"$d/run.log" 2>&1 || { cat "$d/run.log"; fail "the job failed"; }
# The BYEs travel with the ranks' exit; give the monitor a moment to read them.
for _ in $(seq 1 50); do
  curl -s "http://127.0.0.1:$MON_PORT/status.json" >"$d/status.json" || true
  grep -c '"state":"done"' "$d/status.json" | grep -qx 4 && break
  sleep 0.1
done
"$LOOM_PYTHON3" - "$d/status.json" <<'PY' || fail "the monitor's view of the finished job is wrong: $(cat "$d/status.json")"
import json, sys
s = json.load(open(sys.argv[1]))
ranks = sorted(s["ranks"], key=lambda r: r["rank"])
print("finished:", [(r["rank"], r["state"], r["step"], int(r["launched"]), int(r["completed"])) for r in ranks])
assert [r["rank"] for r in ranks] == [0, 1, 2, 3], "not every rank seen"
assert all(r["state"] == "done" for r in ranks), "a rank did not say BYE done"
assert all(r["step"] == 30 for r in ranks), "the last heartbeat does not carry the last step"
counts = {int(r["launched"]) for r in ranks}
assert len(counts) == 1 and min(counts) > 30, f"collectives launched per rank: {counts}"
assert all(r["launched"] == r["completed"] for r in ranks), "collectives left in flight"
assert not s["verdicts"], s["verdicts"]
PY
echo "ok"
