#!/usr/bin/env bash
# Data and tensor parallelism compute the same training run: with the same global batch, DP=2, DP=4, TP=2,
# TP=4 and TP=2 x DP=2 give the single-rank loss curve over 10 steps (float32; only the summation order of
# the all-reduces differs).
source "$(dirname "$0")/lib.sh"
gpt=$LOOM_BIN/gpt-train
args=(--preset tiny --steps 10 --eval-batches 0 --log-level warn)
mpi 1 "$gpt" "${args[@]}" --metrics-file "$WORK/single.jsonl" >/dev/null
[ "$(losses "$WORK/single.jsonl" | wc -l)" = 10 ] || fail "the single-rank run did not log 10 steps"
for layout in "2 1" "4 1" "2 2" "4 4" "4 2"; do
  set -- $layout
  np=$1 tp=$2
  mpi "$np" "$gpt" "${args[@]}" --tp "$tp" --metrics-file "$WORK/run_${np}_${tp}.jsonl" >/dev/null
  echo -n "ranks $np, tp $tp, dp $((np / tp)): "
  same_losses "$WORK/run_${np}_${tp}.jsonl" "$WORK/single.jsonl" 1e-5 || fail "ranks $np tp $tp diverge from one rank"
done
