#!/usr/bin/env bash
# The loom tool: info, tokenize, inspect, and its errors.
source "$(dirname "$0")/lib.sh"
loom=$LOOM_BIN/loom
"$loom" info | grep -q "CUDA backend" || fail "loom info"
printf 'hello, loom\n' >"$WORK/t.txt"
"$loom" tokenize "$WORK/t.txt" "$WORK/t.bin" | grep -q "wrote 12 tokens" || fail "tokenize"
out=$("$loom" inspect "$WORK/t.bin")
grep -q "tokens     : 12" <<<"$out" || fail "inspect size: $out"
grep -q "104 101 108 108 111" <<<"$out" || fail "inspect tokens: $out"
grep -q "as bytes   : hello, loom/" <<<"$out" || fail "inspect text: $out"
if "$loom" inspect "$WORK/none.bin" 2>"$WORK/err"; then fail "inspect of a missing file succeeded"; fi
grep -q "does not exist" "$WORK/err" || fail "missing-file message: $(cat "$WORK/err")"
if "$loom" frobnicate 2>/dev/null; then fail "unknown command accepted"; fi
echo "loom cli ok"
