#!/usr/bin/env bash
# The monitor's status page, end to end: `loom monitor` watches a running 4-rank job (tp 2 x dp 2), and headless
# Chromium loads its page: the page's JS must have fetched /status.json and rendered every rank of the job as
# alive (rows id="rank-N" data-state="alive") under the job id. Also /metrics (Prometheus text) and a 404.
# Skipped (77) without chromium.
source "$(dirname "$0")/lib.sh"
command -v chromium >/dev/null 2>&1 || {
  echo "SKIP: chromium is not installed (apt-get install chromium)"
  exit 77
}
py=${LOOM_PYTHON3:-python3}
job=page$$
marker="--monitor-job $job --monitor-token"  # on the command lines of timeout, mpirun and every rank

if command -v curl >/dev/null 2>&1; then
  get() { curl -s --max-time 5 "$1"; }
  http_code() { curl -s -o /dev/null --max-time 5 -w '%{http_code}' "$1"; }
else
  get() { "$py" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1"; }
  http_code() {
    "$py" -c '
import sys, urllib.error, urllib.request
try: print(urllib.request.urlopen(sys.argv[1], timeout=5).status)
except urllib.error.HTTPError as e: print(e.code)' "$1"
  }
fi

# Stops the training (timeout -> mpirun -> ranks), its snapshot daemons and the monitor, also on failure.
cleanup() {
  local rc=$?
  set +e
  if [ -n "${train_pid:-}" ]; then
    pkill -TERM -f -- "$marker"
    kill "$train_pid" 2>/dev/null
    for _ in $(seq 1 50); do
      pgrep -f -- "$marker" >/dev/null || break
      sleep 0.1
    done
    pkill -KILL -f -- "$marker"
  fi
  if [ -n "${monitor_pid:-}" ]; then
    kill "$monitor_pid" 2>/dev/null
    for _ in $(seq 1 30); do
      kill -0 "$monitor_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$monitor_pid" 2>/dev/null
  fi
  stop_daemons "$job"
  rm -f /tmp/loom-"$(id -u)"/"$job"-node*
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT

logs() {
  echo "--- monitor log:"
  tail -20 "$WORK/monitor.log" 2>/dev/null
  echo "--- training log:"
  tail -20 "$WORK/train.log" 2>/dev/null
}

# 1. The monitor, on a free port.
"$LOOM_BIN/loom" monitor --job "$job" --token "T$$" --port 0 --port-file "$WORK/port" \
  --verdict-dir "$WORK/verdicts" >"$WORK/monitor.log" 2>&1 &
monitor_pid=$!
for _ in $(seq 1 200); do
  [ -s "$WORK/port" ] && break
  kill -0 "$monitor_pid" 2>/dev/null || fail "loom monitor exited: $(cat "$WORK/monitor.log")"
  sleep 0.1
done
[ -s "$WORK/port" ] || fail "loom monitor wrote no port file in 20 s: $(cat "$WORK/monitor.log")"
port=$(cat "$WORK/port")
url=http://127.0.0.1:$port
for _ in $(seq 1 50); do
  grep -q "monitor: listening on .*:$port" "$WORK/monitor.log" && break
  sleep 0.1
done
grep -q "monitor: listening on .*:$port" "$WORK/monitor.log" || fail "no 'listening' line: $(cat "$WORK/monitor.log")"

# 2. A 4-rank job that runs until it is stopped, reporting to the monitor.
mpi 4 "$LOOM_BIN/gpt-train" "${SMALL[@]}" --steps 100000 --tp 2 --snapshot-job "$job" \
  --monitor "127.0.0.1:$port" --monitor-job "$job" --monitor-token "T$$" >"$WORK/train.log" 2>&1 &
train_pid=$!

# 3. Wait until the monitor sees all 4 ranks alive and training.
ready() {
  "$py" -c '
import json, sys
s = json.loads(sys.stdin.read())
sys.exit(0 if sum(r["state"] == "alive" and r["step"] > 0 for r in s["ranks"]) == 4 else 1)' 2>/dev/null
}
last=""
deadline=$((SECONDS + 60))
while :; do
  last=$(get "$url/status.json" || true)
  ready <<<"$last" && break
  kill -0 "$train_pid" 2>/dev/null || { logs; fail "the training exited early; last status: $last"; }
  [ $SECONDS -lt $deadline ] || { logs; fail "4 alive ranks with step > 0 not seen in 60 s; last status: $last"; }
  sleep 0.5
done
echo "monitor sees 4 alive ranks"

# 4. The page, rendered by a browser: its JS must have drawn the running job's ranks.
timeout 60 chromium --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --user-data-dir="$WORK/chromium" \
  --virtual-time-budget=4000 --dump-dom "$url/" >"$WORK/dom.html" 2>"$WORK/chromium.log" ||
  fail "chromium failed: $(tail -5 "$WORK/chromium.log")"
for r in 0 1 2 3; do
  row=$(grep -o "<tr[^>]*id=\"rank-$r\"[^>]*>" "$WORK/dom.html" || true)
  [ -n "$row" ] || fail "no row rank-$r in the rendered page: $(head -c 3000 "$WORK/dom.html")"
  grep -q 'data-state="alive"' <<<"$row" || fail "rank $r is not alive on the page: $row"
done
grep -q "id=\"job\">$job<" "$WORK/dom.html" || fail "the job id $job is not on the page"
echo "page rendered ranks 0-3 alive for job $job"

# 5. Prometheus metrics and an unknown path.
metrics=$(get "$url/metrics" || true)
grep -qF "loom_rank_alive{job=\"$job\",rank=\"3\"} 1" <<<"$metrics" || fail "no alive rank 3 in /metrics: $metrics"
grep -q '^# TYPE ' <<<"$metrics" || fail "no '# TYPE' line in /metrics: $metrics"
code=$(http_code "$url/nope" || true)
[ "$code" = 404 ] || fail "GET /nope answered $code, not 404"
echo "monitor page, status.json and metrics ok"
