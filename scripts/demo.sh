#!/usr/bin/env bash
# The main demo: the Llama-style GPT (tiny preset) trained with tensor x data parallelism on the embedded corpus
# (Debian's fortunes, byte-level), under `loom run`, with a fault injected: one rank is killed (SIGKILL) mid-run;
# the monitor names it, the launcher aborts the job, replaces the rank's (emulated) node by a spare when there
# is one, and restarts; the ranks resume from the snapshots the daemons hold in memory (the spare node's are
# rebuilt from the erasure-coding group). The launcher's summary closes the run.
# Always TP=2 x DP=2. On 4 or more GPUs: one rank per GPU, one node. Otherwise two emulated nodes of 2 ranks plus
# one spare node, on the GPUs when there are any (ranks then share them: rank r on GPU r % count, and the groups
# whose ranks share a GPU communicate through host memory, as NCCL refuses them; docs/design.md) or on CPU ranks.
#   bash scripts/demo.sh [extra gpt-train flags, e.g. --steps 300]
set -uo pipefail
cd "$(dirname "$0")/.."
build=${LOOM_BUILD_DIR:-build}
bin=$build/bin
export OMPI_MCA_btl_vader_single_copy_mechanism=none NCCL_NVLS_ENABLE=0
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
np=4 tp=2 device=cpu
[ "${gpus:-0}" -ge 1 ] && device=cuda
if [ "${gpus:-0}" -ge 4 ]; then
  nodes=(--ranks-per-node "$np" --spares 0)  # one machine: the node stays, memory survives the crash
else
  nodes=(--ranks-per-node 2 --spares 1)
fi
victim=$((np - 1))
crash_step=${LOOM_DEMO_CRASH_STEP:-200}
job=demo-$(date +%s)-$$
rm -rf "$build/demo-snapshots" "$build/demo-verdicts"  # a fresh run: nothing to resume from but its own snapshots
export LOOM_MPIRUN="mpirun --oversubscribe --allow-run-as-root -x OMPI_MCA_btl_vader_single_copy_mechanism -x NCCL_NVLS_ENABLE"
echo "== Loom demo: $np ranks, TP=$tp x DP=$((np / tp)) on $device$([ "$device" = cuda ] && echo " ($gpus GPU(s))"); rank $victim will be killed after step $crash_step"
"$bin/loom" run --np "$np" "${nodes[@]}" --job "$job" --verdict-dir "$build/demo-verdicts" \
  --summary-file "$build/demo-summary.json" -- \
  "$bin/gpt-train" --preset tiny --device "$device" --tp "$tp" --snapshot-job "$job" \
  --snapshot-dir "$build/demo-snapshots" --metrics-file "$build/demo-metrics.jsonl" --log-every 50 \
  --fault-kind crash --fault-rank "$victim" --fault-step "$crash_step" "$@" || exit 1
echo
echo "== the verdict (loom inspect $build/demo-verdicts/verdict-e0.json):"
"$bin/loom" inspect "$build/demo-verdicts/verdict-e0.json" | sed -n '2,4p'
echo "== resumed and finished; the metrics of both incarnations are in $build/demo-metrics.jsonl"
