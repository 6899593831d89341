#!/usr/bin/env bash
# docs/configuration.md documents every key, flag and environment variable that the programs accept, with the
# default they really have.
source "$(dirname "$0")/lib.sh"
doc=$LOOM_SOURCE_DIR/docs/configuration.md
for prog in gpt-train custom-model-train; do
  "$LOOM_BIN/$prog" --help >"$WORK/help.txt"
  while read -r key env dflt; do
    grep -q "| \`$key\` |.*| \`$env\` |" "$doc" || fail "$prog: key $key ($env) is missing from docs/configuration.md"
    if [ "$prog" = gpt-train ]; then
      grep -q "| \`$key\` |.*| \`$dflt\` |" "$doc" || fail "docs/configuration.md gives another default for $key (code: '$dflt')"
    fi
  done < <(sed -n "s/.*key \([a-z_.]*\), env \([A-Z_]*\), default '\(.*\)'/\1 \2 \3/p" "$WORK/help.txt")
done
echo "docs/configuration.md matches the programs' keys"
