#!/usr/bin/env bash
# A flipped byte in a committed in-memory snapshot: the CRC check catches it on restore, a warning names the
# shard (rank, TP and DP position), the ladder falls back to the previous version, and the run still continues
# bit-identically to a fault-free run.
source "$(dirname "$0")/lib.sh"
gpt=$LOOM_BIN/gpt-train
args=("${SMALL[@]}" --steps 16)
mpi 2 "$gpt" "${args[@]}" --snapshot-job cref$$ --metrics-file "$WORK/reference.jsonl" >/dev/null
job=corrupt$$
m=$WORK/run.jsonl
if mpi 2 "$gpt" "${args[@]}" --snapshot-job "$job" --metrics-file "$m" --fault-kind crash --fault-rank 0 \
  --fault-step 10 >/dev/null 2>&1; then fail "the run with a crash exited 0"; fi
sleep 1  # let the surviving daemon commit what was staged
status=$("$LOOM_BIN/loom" inspect "job:$job")
echo "$status"
# rank1: v/state,v/state,v/state   rank1_memory: /name,header_bytes,stride
read -r newest buffer < <(sed -n 's/^  rank1: //p' <<<"$status" | tr ',' '\n' | awk -F/ '$2 == "committed" { print $1, NR - 1 }' |
  sort -n | tail -1)
[ -n "$newest" ] || fail "rank 1 has no committed snapshot to corrupt"
IFS=, read -r name header stride < <(sed -n 's/^  rank1_memory: //p' <<<"$status")
offset=$((header + buffer * stride + 4096))
python3 - "/dev/shm$name" "$offset" <<'PY'
import sys
path, off = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    f.seek(off)
    b = f.read(1)
    f.seek(off)
    f.write(bytes([b[0] ^ 0x5A]))
PY
echo "flipped a byte of rank 1's snapshot of step $newest (buffer $buffer)"
mpi 2 "$gpt" "${args[@]}" --log-level info --snapshot-job "$job" --metrics-file "$m" >"$WORK/resume.log" 2>&1 ||
  { cat "$WORK/resume.log"; fail "the restart failed"; }
grep -E "CRC|resumed" "$WORK/resume.log"
grep -q "snapshot of step $newest of rank 1 (tp 0, dp 1) fails its CRC check" "$WORK/resume.log" ||
  fail "no warning naming the corrupt shard (rank 1, step $newest)"
resumed=$(sed -n 's/.*resumed from the in-memory snapshot of step \([0-9]*\).*/\1/p' "$WORK/resume.log")
[ -n "$resumed" ] && [ "$resumed" -lt "$newest" ] || fail "expected a resume from a step before $newest, got '$resumed'"
same_run "$m" "$WORK/reference.jsonl" || fail "the run resumed after the corruption diverged"
echo "corrupt snapshot of step $newest detected; resumed from step $resumed; loss log identical to the fault-free run"
