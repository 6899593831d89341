#!/usr/bin/env bash
# Packs what the GPU machine needs into .device/ (ignored by git, carried by the device tool): the installed
# Loom (stripped), the GPU test binaries, the Debian runtime packages they load, and env.sh.
#   bash scripts/device_pack.sh          # after `cmake --build build` with CUDA
# On the GPU machine: source .device/env.sh; bash scripts/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
build=${LOOM_BUILD_DIR:-build}
shared=${LOOM_SHARED_DIR:-../shared}
rm -rf .device/prefix .device/tests
cmake --install "$build" --prefix .device/prefix --strip >/dev/null
mkdir -p .device/tests
for t in loom_cuda_tests loom_unit_tests test_communicator test_tp_equivalence test_fused_norm_ipc attention_bench op_split ec_bench fused_norm_bench; do
  if [ -x "$build/bin/$t" ]; then
    cp "$build/bin/$t" .device/tests/
    strip .device/tests/$t
  fi
done
[ -d .device/debs ] || bash "$shared/device/fetch-debs.sh" .device/prefix/bin/* .device/tests/*
cp "$shared/device/env.sh" .device/
du -sh .device/prefix .device/tests .device/debs
