#!/usr/bin/env bash
# Bad input gives one clear message (not one per rank), a non-zero status on every rank, no hang, and no
# output file left behind.
source "$(dirname "$0")/lib.sh"
gpt=$LOOM_BIN/gpt-train
m=$WORK/metrics.jsonl
base=(--preset tiny --steps 2 --metrics-file "$m")

expect_failure 2 "unknown" "$gpt" "${base[@]}" --not-a-key 3
expect_failure 2 "expects an integer" "$gpt" "${base[@]}" --steps ten
expect_failure 2 "does-not-exist.toml" "$gpt" "${base[@]}" --config "$WORK/does-not-exist.toml"
printf '[model]\ndim = 64\n[train]\nlearning_rate = 0.1\n' >"$WORK/bad.toml"
expect_failure 2 "learning_rate" "$gpt" "${base[@]}" --config "$WORK/bad.toml"
expect_failure 2 "does not divide the number of ranks" "$gpt" "${base[@]}" --tp 3
expect_failure 2 "does not divide model.n_heads" "$gpt" "${base[@]}" --tp 2 --n-heads 3 --dim 96
expect_failure 2 "does not split evenly" "$gpt" "${base[@]}" --batch-size 15
expect_failure 2 "needs 6 ranks" "$gpt" "${base[@]}" --dp 3 --tp 2
expect_failure 2 "does not divide the world size" "$gpt" "${base[@]}" --ranks-per-node 3
expect_failure 2 "does not exist" "$gpt" "${base[@]}" --dataset "$WORK/missing.bin"
# A headered token file cut short.
"$LOOM_BIN/loom" tokenize "$here/lib.sh" "$WORK/readme.bin" >/dev/null
head -c 1000 "$WORK/readme.bin" >"$WORK/truncated.bin"
expect_failure 2 "is truncated" "$gpt" "${base[@]}" --dataset "$WORK/truncated.bin"
# Ranks that see different settings (a LOOM_* variable set on one node only).
expect_failure 2 "different configuration" bash -c 'LOOM_STEPS=$((3 + OMPI_COMM_WORLD_RANK)) exec "$0" "$@"' "$gpt" \
  "${base[@]/--steps/--log-every}"
[ ! -e "$m" ] || fail "a failed start left $m behind"
echo "all bad-input cases behave"
