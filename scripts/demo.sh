#!/usr/bin/env bash
# The main demo: the Llama-style GPT (tiny preset) trained with tensor x data parallelism on the embedded corpus
# (Debian's fortunes, byte-level), with a fault injected: one rank is killed (SIGKILL) mid-run, the job dies,
# and the same command started again resumes from the snapshots that the per-node daemon kept in memory.
# On GPUs when present (TP=2 x DP=2 on 4, TP=2 on 2, one GPU otherwise), else on CPU ranks (TP=2 x DP=2).
#   bash scripts/demo.sh [extra gpt-train flags, e.g. --steps 300]
set -uo pipefail
cd "$(dirname "$0")/.."
build=${LOOM_BUILD_DIR:-build}
bin=$build/bin
export OMPI_MCA_btl_vader_single_copy_mechanism=none NCCL_NVLS_ENABLE=0
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${gpus:-0}" -ge 4 ]; then
  np=4 tp=2 device=cuda
elif [ "${gpus:-0}" -ge 2 ]; then
  np=2 tp=2 device=cuda
elif [ "${gpus:-0}" -ge 1 ]; then
  np=1 tp=1 device=cuda
else
  np=4 tp=2 device=cpu
fi
victim=$((np - 1))
crash_step=${LOOM_DEMO_CRASH_STEP:-200}
job=demo-$(date +%s)-$$
run() {
  mpirun --oversubscribe --allow-run-as-root -x OMPI_MCA_btl_vader_single_copy_mechanism -x NCCL_NVLS_ENABLE \
    -np "$np" "$bin/gpt-train" --preset tiny --device "$device" --tp "$tp" --snapshot-job "$job" \
    --snapshot-dir "$build/demo-snapshots" --metrics-file "$build/demo-metrics.jsonl" --log-every 50 "$@"
}
echo "== Loom demo: $np rank(s), TP=$tp x DP=$((np / tp)) on $device; rank $victim will be killed after step $crash_step"
run --fault-kind crash --fault-rank "$victim" --fault-step "$crash_step" "$@"
status=$?
echo
echo "== the job died (mpirun exit status $status). Each node's snapshot daemon still holds every rank's state of"
echo "== the last steps in shared memory: $("$bin/loom" inspect "job:$job" 2>/dev/null | grep -c '^  rank[0-9]*:') rank(s) there. Starting the same command again:"
echo
run "$@" || exit 1
echo
echo "== resumed from memory and finished; the metrics of both runs are in $build/demo-metrics.jsonl"
