#!/usr/bin/env bash
# The tiny preset on the embedded corpus, 2 data-parallel ranks, learns: after its 600 steps the validation loss
# is below 2.1 nats, far under the corpus's unigram entropy (3.31 nats: what a model that only knows byte
# frequencies reaches). This is the figure the README states.
source "$(dirname "$0")/lib.sh"
out=$(mpi 2 "$LOOM_BIN/gpt-train" --preset tiny --log-every 100 --log-level info --metrics-file "$WORK/m.jsonl" 2>&1)
echo "$out" | grep -E "step [0-9]+/|validation|done"
val=$(sed -n 's/.*"event":"done".*"val_loss":\([0-9.]*\).*/\1/p' <<<"$out")
[ -n "$val" ] || fail "no validation loss in the done line"
awk -v v="$val" 'BEGIN { exit !(v < 2.1) }' || fail "validation loss $val is not below 2.1"
[ "$(losses "$WORK/m.jsonl" | wc -l)" = 600 ] || fail "metrics file does not hold 600 steps"
echo "tiny preset: validation loss $val < 2.1 (unigram entropy 3.31)"
