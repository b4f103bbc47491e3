#!/usr/bin/env bash
# Download, on a machine with network access, the wheels that benchmarks/gpu_check.sh installs on a
# GPU machine without one (its image has torch, triton, numpy, pyyaml, tqdm, tokenizers and pytest
# but not these). They land in .whl/ (git-ignored through .git/info/exclude), for CPython 3.12 on
# x86-64 Linux; carry that folder to the GPU machine next to the repository (about 4 MiB).
#   bash benchmarks/gpu_wheels.sh            # then, on the GPU machine: bash benchmarks/gpu_check.sh
# Env: GPU_WHEELS_DIR (default .whl), GPU_PYTHON_VERSION (default 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${GPU_WHEELS_DIR:-.whl}
PYVER=${GPU_PYTHON_VERSION:-3.12}
# megatron-core's own needs (numpy, packaging, torch) are on the image; webdataset needs braceexpand.
# liger-kernel is optional: a baseline in the loss benchmark.
WHEELS=(megatron-core==0.16.1 webdataset==1.0.2 braceexpand==0.1.7 liger-kernel==0.8.5)

mkdir -p "$DIR"
if git rev-parse --git-dir >/dev/null 2>&1; then
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx "/$DIR/" "$exclude" 2>/dev/null || echo "/$DIR/" >> "$exclude"
fi
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DIR" "${WHEELS[@]}"
ls -l "$DIR"
du -sh "$DIR"
