#!/usr/bin/env bash
# Kill -9 one random rank at a random step, 20 trials, TP=2 x DP=2 on 4 ranks: every time the job is started
# again through mpirun, resumes from the snapshots in the daemons' shared memory, and the merged loss log equals
# the fault-free run's exactly (bit for bit, same steps).
source "$(dirname "$0")/lib.sh"
gpt=$LOOM_BIN/gpt-train
steps=16
args=("${SMALL[@]}" --tp 2 --steps "$steps")
job=ref$$
mpi 4 "$gpt" "${args[@]}" --snapshot-job "$job" --metrics-file "$WORK/reference.jsonl" >/dev/null
[ "$(merged_losses "$WORK/reference.jsonl" | wc -l)" = "$steps" ] || fail "the fault-free run did not log $steps steps"

RANDOM=20261124  # fixed seed: the same trials every run
from_memory=0
for trial in $(seq 1 20); do
  rank=$((RANDOM % 4))
  step=$((1 + RANDOM % (steps - 2)))
  job=kill$$-$trial
  m=$WORK/trial$trial.jsonl
  if mpi 4 "$gpt" "${args[@]}" --snapshot-job "$job" --metrics-file "$m" --fault-kind crash --fault-rank "$rank" \
    --fault-step "$step" >"$WORK/crash.log" 2>&1; then
    fail "trial $trial: the run with rank $rank killed at step $step exited 0"
  fi
  mpi 4 "$gpt" "${args[@]}" --log-level info --snapshot-job "$job" --metrics-file "$m" >"$WORK/resume.log" 2>&1 ||
    { cat "$WORK/resume.log"; fail "trial $trial: the restarted job failed"; }
  grep -q "resumed from the in-memory snapshot" "$WORK/resume.log" && from_memory=$((from_memory + 1))
  same_run "$m" "$WORK/reference.jsonl" || fail "trial $trial (rank $rank killed after step $step): the resumed run diverged"
  echo "trial $trial: rank $rank killed after step $step; resumed: $(grep -o 'resumed from [a-z -]* of step [0-9]*' "$WORK/resume.log" || echo 'from step 0')"
  stop_daemons "$job"
done
[ "$from_memory" -ge 18 ] || fail "only $from_memory of 20 trials resumed from memory"
echo "20 kill -9 trials: every merged loss log equals the fault-free run ($from_memory resumed from memory)"
