# Shared helpers of the end-to-end tests (sourced). ctest sets LOOM_BIN, LOOM_MPIRUN, LOOM_SOURCE_DIR,
# LOOM_PYTHON3; run by hand they default to the build/ folder of this checkout.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOOM_SOURCE_DIR=${LOOM_SOURCE_DIR:-$(cd "$here/../.." && pwd)}
LOOM_BIN=${LOOM_BIN:-$LOOM_SOURCE_DIR/build/bin}
LOOM_MPIRUN=${LOOM_MPIRUN:-mpirun --oversubscribe --allow-run-as-root}
LOOM_PYTHON3=${LOOM_PYTHON3:-python3}
WORK=$(mktemp -d /tmp/loom-e2e.XXXXXX)
trap '[ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"' EXIT
export LOOM_CACHE_DIR=${LOOM_CACHE_DIR:-$WORK/cache}
export OMPI_MCA_btl_vader_single_copy_mechanism=none

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# mpi NP PROGRAM ARGS... : runs under mpirun with a 10-minute guard against hangs.
mpi() {
  local np=$1
  shift
  timeout 600 $LOOM_MPIRUN -np "$np" "$@"
}

# losses FILE : the "loss" of every line of a metrics file, one per line.
losses() { sed -n 's/.*"loss":\([-0-9.eE+]*\).*/\1/p' "$1"; }

# same_losses A B RTOL : every step's loss agrees within RTOL (relative).
same_losses() {
  paste <(losses "$1") <(losses "$2") | awk -v tol="$3" -v a="$1" -v b="$2" '
    { n++; d = $1 - $2; if (d < 0) d = -d; r = d / ($2 < 0 ? -$2 : $2); if (r > worst) worst = r;
      if (r > tol) { printf "step %d: %s has %s, %s has %s\n", n, a, $1, b, $2; bad = 1 } }
    END { if (n == 0) { print "no losses"; exit 1 } printf "%d steps, worst relative difference %.3g\n", n, worst; exit bad }'
}

# expect_failure NP PATTERN PROGRAM ARGS... : the program must fail on every rank, print PATTERN exactly once,
# and finish (no hang). Each rank's exit status is recorded by a wrapper shell.
expect_failure() {
  local np=$1 pattern=$2
  shift 2
  rm -f "$WORK"/rc.*
  local out
  out=$(timeout 120 $LOOM_MPIRUN -np "$np" bash -c '"$@"; echo $? > '"$WORK"'/rc.$OMPI_COMM_WORLD_RANK' wrapper "$@" 2>&1) ||
    true
  local count
  count=$(grep -c -- "$pattern" <<<"$out" || true)
  [ "$count" = 1 ] || fail "expected '$pattern' exactly once, saw it $count times in:
$out"
  for ((r = 0; r < np; r++)); do
    [ -f "$WORK/rc.$r" ] || fail "rank $r did not exit on its own (killed or hung) for: $*
$out"
    [ "$(cat "$WORK/rc.$r")" != 0 ] || fail "rank $r exited 0 for: $*"
  done
  echo "ok: $* -> '$pattern' once, every rank non-zero"
}

# merged_losses FILE : "step loss" per step of a metrics file that several incarnations appended to; the last
# line of a step wins (a resumed run repeats the steps after its snapshot).
merged_losses() {
  sed -n 's/^{"step":\([0-9]*\),"loss":\([^,]*\),.*/\1 \2/p' "$1" | awk '{ last[$1] = $2 } END { for (s in last) print s, last[s] }' |
    sort -n
}

# same_run A B : the merged loss logs of two metrics files are identical (bit-exact losses, same steps).
same_run() {
  diff <(merged_losses "$1") <(merged_losses "$2") >"$WORK/diff.txt" || {
    echo "loss logs differ (< $1, > $2):"
    head -20 "$WORK/diff.txt"
    return 1
  }
}

# A small model that trains a step in tens of milliseconds on 2 cores; snapshots every step, no HDF5.
SMALL=(--dim 64 --n-layers 2 --n-heads 4 --ffn-hidden 128 --seq-len 32 --vocab-size 256 --batch-size 8
  --eval-batches 0 --log-level warn --persist-every 0 --snapshot-idle-timeout 20)

# Stops the daemons of a job (they exit by themselves when a run finishes; this is for runs that did not).
stop_daemons() {
  local lock pid
  for lock in /tmp/loom-$(id -u)/"$1"-node*.sock.lock; do
    [ -f "$lock" ] || continue
    pid=$(cat "$lock" 2>/dev/null || true)
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
  done
  rm -f /dev/shm/loom-$(id -u)-"$1"-r* 2>/dev/null || true
}

# ---- monitor helpers ---------------------------------------------------------------------------------------
# start_monitor DIR JOB TOKEN [loom monitor ARGS...]: starts `loom monitor` for JOB in the background (log in
# DIR/monitor.log, verdicts in DIR/v), waits for its port; sets MON_PID and MON_PORT.
start_monitor() {
  local d=$1 job=$2 token=$3
  shift 3
  mkdir -p "$d"
  "$LOOM_BIN/loom" monitor --job "$job" --token "$token" --port 0 --port-file "$d/port" --verdict-dir "$d/v" "$@" \
    >"$d/monitor.log" 2>&1 &
  MON_PID=$!
  for _ in $(seq 1 100); do [ -s "$d/port" ] && break; sleep 0.1; done
  [ -s "$d/port" ] || fail "the monitor did not start: $(cat "$d/monitor.log")"
  MON_PORT=$(cat "$d/port")
}

# monitored_fault NAME KIND RANK [GPT ARGS...]: starts `loom monitor` (exits at its first verdict) and a run of
# $NP ranks (default 4), TP $TP (default 2) x DP the rest, on emulated nodes of $RPN ranks (default 2), with the
# fault KIND at RANK after step $FAULT_STEP (default 300, ~3 s in; or $FAULT_AFTER_S seconds in); returns when the
# monitor reached a verdict (or after 120 s), kills the job, and leaves $WORK/NAME/verdict.json and
# $WORK/NAME/fault_at (the unix time the trainer logged for the injection).
monitored_fault() {
  local name=$1 kind=$2 rank=$3
  shift 3
  local d=$WORK/$name
  start_monitor "$d" "m$name$$" "tok$$" --exit-on-verdict
  local mon=$MON_PID
  timeout 150 $LOOM_MPIRUN -np "${NP:-4}" "$LOOM_BIN/gpt-train" "${SMALL[@]}" --steps 100000 --tp "${TP:-2}" --ranks-per-node "${RPN:-2}" \
    --log-level warn --snapshot-job "s$name$$" --monitor "127.0.0.1:$MON_PORT" --monitor-job "m$name$$" \
    --monitor-token "tok$$" --fault-kind "$kind" --fault-rank "$rank" --fault-step "${FAULT_STEP:-300}" --fault-after-s "${FAULT_AFTER_S:-0}" "$@" >"$d/run.log" 2>&1 &
  local job=$!
  # Waits up to 120 s for the verdict (the monitor exits on it), and at most 5 s more once the job has ended (a
  # crash ends it before the verdict; a job that failed on its own gets none). Polled, not a background
  # `sleep 120; kill`: a leftover sleep would hold the test's output open, and ctest waits for that.
  local waited=0 ended=0
  while kill -0 "$mon" 2>/dev/null && [ "$waited" -lt 1200 ] && [ "$ended" -lt 50 ]; do
    sleep 0.1
    waited=$((waited + 1))
    kill -0 "$job" 2>/dev/null || ended=$((ended + 1))
  done
  kill "$mon" 2>/dev/null || true
  wait "$mon" 2>/dev/null || true
  pkill -TERM -f -- "--monitor-job m$name$$" 2>/dev/null || true
  wait "$job" 2>/dev/null || true
  stop_daemons "s$name$$"
  [ -f "$d/v/verdict-e0.json" ] || fail "$name: no verdict within 120 s; trainer log: $(grep -m3 ' error: ' "$d/run.log" ||
    grep -v '^[a-z_]*\.' "$d/run.log" | tail -5)"
  cp "$d/v/verdict-e0.json" "$d/verdict.json"
  sed -n 's/.*fault injection: .* at unix time \([0-9.]*\).*/\1/p' "$d/run.log" | head -1 >"$d/fault_at"
  [ -s "$d/fault_at" ] || fail "$name: the fault was not injected"
  echo "$name: $("$LOOM_PYTHON3" -c 'import json,sys; print(json.load(open(sys.argv[1]))["summary"])' "$d/verdict.json")"
}

# verdict_check NAME PYTHON-EXPR: asserts PYTHON-EXPR over v (the verdict) and t (seconds from the injection to
# the verdict).
verdict_check() {
  local d=$WORK/$1
  "$LOOM_PYTHON3" - "$d/verdict.json" "$(cat "$d/fault_at")" "$2" <<'PY' || fail "$1: verdict check '$2' failed"
import json, sys
v = json.load(open(sys.argv[1]))
t = v["detected_at"] - float(sys.argv[2])
ok = eval(sys.argv[3])
print(f"  {'ok' if ok else 'FAILED'}: {sys.argv[3]}  (kind {v['kind']}, ranks {v['ranks']}, link {v.get('link')}, "
      f"node {v['node']}, {t:.2f} s after the injection)")
sys.exit(0 if ok else 1)
PY
}
