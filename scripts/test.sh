#!/usr/bin/env bash
# Runs the whole test suite (unit, mpi, fault; cuda tests skip with their reason when there is no GPU).
#   bash scripts/test.sh [ctest args, e.g. -L unit]
set -euo pipefail
cd "$(dirname "$0")/.."
ctest --test-dir "${LOOM_BUILD_DIR:-build}" --output-on-failure "$@"
