#!/usr/bin/env bash
# cmake --install puts headers, libraries, tools and a CMake package in a prefix; a separate project finds it
# with find_package(Loom), builds a model against the public header, and trains it.
source "$(dirname "$0")/lib.sh"
build=$(cd "$LOOM_BIN/.." && pwd)
cmake --install "$build" --prefix "$WORK/prefix" >/dev/null
for f in bin/loom bin/gpt-train include/loom/loom/loom.h include/loom/core/tensor.h lib/cmake/Loom/LoomConfig.cmake; do
  [ -e "$WORK/prefix/$f" ] || fail "cmake --install did not install $f"
done
# The README's C++ example, exactly as printed there.
awk '/^```cpp$/ { on = 1; next } /^```$/ { if (on) exit } on' "$LOOM_SOURCE_DIR/README.md" >"$WORK/readme_example.cc"
grep -q "loom::Trainer" "$WORK/readme_example.cc" || fail "could not extract the README's C++ example"
cmake -S "$LOOM_SOURCE_DIR/tests/downstream" -B "$WORK/downstream" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$WORK/prefix" -DREADME_EXAMPLE="$WORK/readme_example.cc" >"$WORK/configure.log" 2>&1 || { cat "$WORK/configure.log"; fail "configure"; }
cmake --build "$WORK/downstream" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; fail "build"; }
out=$(mpi 1 "$WORK/downstream/my-model" --steps 3 --model.dim 32 --eval-batches 0 2>&1)
grep -q '"event":"done","steps":3' <<<"$out" || fail "the downstream model did not train: $out"
out=$(mpi 2 "$WORK/downstream/readme-example" --steps 20 --eval-batches 0 --log-level warn 2>&1)
first_last=$(grep -o '"final_loss":[0-9.]*' <<<"$out") || fail "the README example did not train: $out"
awk -F: '{ exit !($2 < 4.5) }' <<<"$first_last" || fail "the README example did not learn ($first_last; ln 256 = 5.55)"
echo "downstream project built with find_package(Loom) and trained"
