#!/usr/bin/env bash
# Installs Loom's dependencies from Debian 12 packages (as root, or through sudo) and builds Loom in build/.
# CUDA is used when nvcc is found (/usr/local/cuda or PATH); everything else comes from apt.
#   bash scripts/setup.sh            # install + configure + build (Release)
#   LOOM_BUILD_DIR=b bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
build=${LOOM_BUILD_DIR:-build}

packages=(build-essential cmake ninja-build pkg-config git
  libopenmpi-dev openmpi-bin libhdf5-dev hdf5-tools libisal-dev libopenblas-dev libboost-dev
  libgtest-dev libtomlplusplus-dev
  python3 python3-torch python3-numpy python3-h5py
  fortunes
  chromium curl)  # chromium: the headless test of the monitor's status page
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "== installing ${#missing[@]} Debian packages: ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "== configuring ($build)"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release ${LOOM_CMAKE_ARGS:-}
echo "== building"
cmake --build "$build" -j"$(nproc)"
