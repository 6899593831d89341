#!/usr/bin/env bash
# The snapshot daemon is killed (SIGKILL) mid-run: training goes on, the trainers start a new daemon, which adopts
# the shared memory, and snapshots resume: a crash later in the same run resumes from a step after the daemon's
# death, and the merged loss log equals the fault-free run's.
source "$(dirname "$0")/lib.sh"
gpt=$LOOM_BIN/gpt-train
args=("${SMALL[@]}" --steps 24)
mpi 2 "$gpt" "${args[@]}" --snapshot-job dref$$ --metrics-file "$WORK/reference.jsonl" >/dev/null
job=daemon$$
m=$WORK/run.jsonl
# Run 1: the daemon dies after step 6; the job itself finishes step 24 regardless.
mpi 2 "$gpt" "${args[@]}" --log-level info --snapshot-job "$job" --metrics-file "$m" --fault-kind kill_daemon \
  --fault-rank 0 --fault-step 6 >"$WORK/run1.log" 2>&1 || { cat "$WORK/run1.log"; fail "the run failed after its daemon died"; }
grep -q "killing the snapshot daemon" "$WORK/run1.log" || fail "the daemon was not killed"
grep -q "started snapshot daemon" "$WORK/run1.log" || fail "no new daemon was started"
same_run "$m" "$WORK/reference.jsonl" || fail "training diverged after the daemon died"
staged=$(sed -n 's/.*snapshots: \([0-9]*\) staged.*/\1/p' "$WORK/run1.log" | head -1)
[ "$staged" = 24 ] || fail "expected 24 snapshots staged across the daemon's death, got '$staged'"
# Run 2: the daemon dies after step 6, and later (past step 20) a rank is killed from outside: the restart must
# resume from memory after step 6, so the new daemon took the snapshots over.
job=daemon2$$
m2=$WORK/run2.jsonl
args2=("${SMALL[@]}" --steps 400)  # long enough to be killed mid-run
mpi 2 "$gpt" "${args2[@]}" --snapshot-job dref2$$ --metrics-file "$WORK/reference2.jsonl" >/dev/null
mpi 2 "$gpt" "${args2[@]}" --snapshot-job "$job" --metrics-file "$m2" --fault-kind kill_daemon --fault-rank 1 \
  --fault-step 6 >/dev/null 2>&1 &
runner=$!
for _ in $(seq 1 600); do
  [ "$(merged_losses "$m2" 2>/dev/null | tail -1 | cut -d' ' -f1)" -ge 20 ] 2>/dev/null && break
  sleep 0.05
done
victim=$(pgrep -f -- "^$gpt .*--snapshot-job $job" | head -1)  # a rank, not mpirun
[ -n "$victim" ] || fail "no trainer process to kill"
kill -9 "$victim"
wait "$runner" && fail "the job with a killed rank exited 0"
mpi 2 "$gpt" "${args2[@]}" --log-level info --snapshot-job "$job" --metrics-file "$m2" >"$WORK/run3.log" 2>&1 ||
  { cat "$WORK/run3.log"; fail "the restart failed"; }
resumed=$(sed -n 's/.*resumed from the in-memory snapshot of step \([0-9]*\).*/\1/p' "$WORK/run3.log")
[ -n "$resumed" ] && [ "$resumed" -ge 19 ] || fail "expected a resume from memory at step 19 or later, got '$resumed'"
same_run "$m2" "$WORK/reference2.jsonl" || fail "the resumed run diverged"
echo "daemon killed mid-run: training went on, a new daemon adopted the snapshots, resume from step $resumed exact"
