#!/usr/bin/env bash
# The main demo: the Llama-style GPT (tiny preset) trained data-parallel on 2 MPI ranks on the embedded corpus
# (Debian's fortunes, byte-level), printing progress; on the GPU when one is present.
#   bash scripts/demo.sh [extra gpt-train flags, e.g. --steps 100]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${LOOM_BUILD_DIR:-build}/bin
export OMPI_MCA_btl_vader_single_copy_mechanism=none
mpirun --oversubscribe --allow-run-as-root -np 2 "$bin/gpt-train" --preset tiny "$@"
