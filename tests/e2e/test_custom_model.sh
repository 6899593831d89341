#!/usr/bin/env bash
# The custom-model example (a user model with a user-written op) trains data-parallel, its custom op passes the
# framework's finite-difference check at start-up, and its loss falls.
source "$(dirname "$0")/lib.sh"
out=$(mpi 2 "$LOOM_BIN/custom-model-train" --steps 40 --log-every 10 --log-level info --metrics-file "$WORK/m.jsonl" 2>&1)
echo "$out" | tail -5
grep -q "custom op 'causal_ema': gradients match" <<<"$out" || fail "the custom op's gradient check did not report success"
first=$(losses "$WORK/m.jsonl" | head -1)
last=$(losses "$WORK/m.jsonl" | tail -1)
awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a - 1.0) }' || fail "loss went from $first to $last (expected a drop of more than 1 nat)"
grep -q '"event":"done","steps":40' <<<"$out" || fail "no done line"
echo "custom model: loss $first -> $last"
