#!/usr/bin/env bash
# Wheels of the Python packages the GPU machine's image lacks, fetched here for its Python (3.12,
# x86-64, manylinux) and installed there without a network. Used by benchmarks/gpu_compare.sh; any
# other GPU script can call it the same way.
#
#   bash benchmarks/gpu_wheels.sh download DEST [NAME==VERSION ...]   # here, where pip reaches PyPI
#   bash benchmarks/gpu_wheels.sh install DEST TARGET                 # there; then PYTHONPATH=TARGET:$PYTHONPATH
#
# Default packages: what training, eval and compare import beyond the image's torch, numpy, tokenizers,
# pyyaml, tqdm and matplotlib: megatron-core and webdataset (and webdataset's braceexpand), at the
# versions setup.py pins. deepspeed is not needed by a plain single-process run (the launcher module
# reads environment variables only) and wandb is imported only when `wandb.enabled` is true.
# `--no-deps` fetches no dependencies: name every missing one. Env: GPU_PYTHON_VERSION (default 3.12).
set -euo pipefail
DEFAULT_PACKAGES=(megatron-core==0.16.1 webdataset==1.0.2 braceexpand==0.1.7)
PYTHON=${PYTHON:-python3}
mode=${1:-}
dest=${2:-}
[ -n "$mode" ] && [ -n "$dest" ] || { sed -n '2,13p' "$0"; exit 2; }
shift 2
case "$mode" in
  download)
    packages=("$@")
    [ ${#packages[@]} -gt 0 ] || packages=("${DEFAULT_PACKAGES[@]}")
    mkdir -p "$dest"
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
             manylinux2014_x86_64 manylinux1_x86_64; do
      platforms+=(--platform "$p")
    done
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" \
      --implementation cp "${platforms[@]}" -d "$dest" "${packages[@]}"
    echo "gpu_wheels: $(ls "$dest"/*.whl | wc -l) wheel(s) in $dest ($(du -sh "$dest" | cut -f1))"
    ;;
  install)
    target=${1:?usage: gpu_wheels.sh install DEST TARGET}
    compgen -G "$dest/*.whl" >/dev/null || { echo "gpu_wheels: no wheels in $dest" >&2; exit 3; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$dest"/*.whl
    ;;
  *) echo "gpu_wheels: unknown mode '$mode' (download | install)" >&2; exit 2 ;;
esac
