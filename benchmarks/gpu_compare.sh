#!/usr/bin/env bash
# The GPU-scale comparison (launch/configs/compare-gpu.yaml: uniform, adapt, adapt-std, linupper,
# topk-bm25, seeds 1 and 2, about 8 minutes on one H200) in one command: installs the carried wheels,
# checks the whole path on a tiny model first (one minute at most, so a failure costs little device
# time), runs `adapt-pretrain compare` on the carried corpora under a time limit and leaves the report,
# plots, log and the runs' records under $OUT.
#
# 1. Here, once (network and the corpus needed; about 14 MB, ignored by git):
#      bash benchmarks/gpu_compare.sh --carry CORPORA_DIR        # required: a folder of *.jsonl.gz, one per domain
#    copies CORPORA_DIR/*.jsonl.gz into gpu_carry/corpora/ and downloads the wheels the GPU image lacks
#    into gpu_carry/wheels/ (benchmarks/gpu_wheels.sh: megatron-core, webdataset, braceexpand for
#    CPython 3.12 x86-64, the GPU machine's Python).
# 2. On the GPU machine (the device tool's `run`): command "bash benchmarks/gpu_compare.sh",
#    carry ["gpu_carry"], timeout_s 600. Extra arguments are compare overrides (run.train.steps=1260).
#    $OUT then holds results.md (tables), summary.png, domain_delta.png, train_loss.png,
#    weight_curricula.png, gpu_compare.log and runs.tar.gz (each run's result.json, metrics.jsonl,
#    train.log and config; no checkpoints).
# 3. CPU smoke test (tests/compare/test_gpu_compare_smoke.py): bash benchmarks/gpu_compare.sh --smoke
#    runs the same config shrunk to a tiny model on the bundled demo corpus (seed 1), with deepspeed
#    and wandb made unimportable as they are on the GPU machine.
# Env: OUT (default gpu_compare_out), COMPARE_WORK (run dirs; default runs/compare-gpu, or
#   runs/compare-gpu-smoke; a second call on a still-warm machine skips the finished runs),
#   COMPARE_JOBS (runs at once, default 2), COMPARE_LIMIT_S (the comparison stops after this many
#   seconds, default: 520 s after the script started, so that the report is written inside the device's
#   600 s per command; the report then covers the finished runs), PREFLIGHT (default 1 on a GPU),
#   CARRY (default gpu_carry), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
CARRY=${CARRY:-gpu_carry}
MODE=device
case "${1:-}" in --carry) MODE=carry; shift ;; --smoke) MODE=smoke; shift ;; esac

if [ "$MODE" = carry ]; then
  src=${1:-}
  [ -n "$src" ] || { echo "gpu_compare: --carry CORPORA_DIR: give the corpora folder (*.jsonl.gz, one file per domain)"; exit 2; }
  compgen -G "$src/*.jsonl.gz" >/dev/null || { echo "gpu_compare: no *.jsonl.gz in '$src': give the corpora folder"; exit 2; }
  rm -rf "$CARRY" && mkdir -p "$CARRY/corpora" && cp "$src"/*.jsonl.gz "$CARRY/corpora/" || exit 2
  bash benchmarks/gpu_wheels.sh download "$CARRY/wheels" || exit 3
  echo "gpu_compare: $CARRY is ready ($(du -sh "$CARRY" | cut -f1)); on the GPU machine run" \
       "'bash benchmarks/gpu_compare.sh' with carry [\"$CARRY\"]"
  exit 0
fi

PY=${PYTHON:-python3}
OUT=${OUT:-gpu_compare_out}
JOBS=${COMPARE_JOBS:-2}
# Tiny sizes: the smoke test, and the GPU pre-flight.
TINY=(prepare.vocab_size=512 prepare.num_workers=1 prepare.num_anchors=4 prepare.shard_tokens=65536
      "prepare.anchor_domains=[python_doc]"
      run.model.vocab_size=512 run.model.seq_len=32 run.model.hidden_size=32 run.model.num_layers=1
      run.model.num_attention_heads=2 run.model.ffn_hidden_size=64 run.train.steps=4 run.train.micro_batch_size=2
      run.train.log_interval=1 run.optim.warmup_steps=1 run.data.num_workers=0 run.adapt.num_anchors=4
      run.adapt.refresh_interval=2 eval.max_tokens=256 eval.docs=8)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2

main() {
  local start corpus work extra rc limit
  start=$(date +%s)
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
  if [ "$MODE" = device ]; then
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    [ -d "$CARRY/corpora" ] || { echo "gpu_compare: $CARRY/corpora is missing: build it with --carry and carry it"; return 2; }
    if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
      bash benchmarks/gpu_wheels.sh install "$CARRY/wheels" /tmp/gpu_compare_site || return 3
      export PYTHONPATH="/tmp/gpu_compare_site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    corpus=("$CARRY/corpora")
    work=${COMPARE_WORK:-runs/compare-gpu}
    extra=()
  else
    corpus=(demo)
    work=${COMPARE_WORK:-runs/compare-gpu-smoke}
    extra=(--seeds 1 "${TINY[@]}" run.model.bf16=false)
    for pkg in deepspeed wandb; do  # not on the GPU machine: nothing here may need them
      mkdir -p "$BLOCK/$pkg" && echo "raise ImportError('$pkg is not installed on the GPU machine')" > "$BLOCK/$pkg/__init__.py"
    done
    export PYTHONPATH="$BLOCK${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # setup.py ships kernels/ as adapt_pretrain.kernels; without an installed copy, link it into the tree
  "$PY" -c "import adapt_pretrain.kernels" 2>/dev/null || ln -sfn ../kernels adapt_pretrain/kernels
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import sys, torch, megatron.core, webdataset, tokenizers
print('python', sys.version.split()[0], 'torch', torch.__version__, 'megatron-core', megatron.core.__version__,
      'GPU:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" || return 3

  if [ "$MODE" = device ] && [ "${PREFLIGHT:-1}" = 1 ]; then
    echo "gpu_compare: pre-flight (tiny model, uniform + adapt, train and eval on this GPU)"
    rm -rf runs/compare-gpu-preflight
    timeout -s INT -k 20 150 "$PY" -m adapt_pretrain.experiments.compare --config launch/configs/compare-gpu.yaml \
      --out-dir runs/compare-gpu-preflight --corpus demo --methods uniform adapt --seeds 1 --jobs 2 "${TINY[@]}" \
      || { echo "gpu_compare: pre-flight FAILED; the logs:"; tail -n 40 runs/compare-gpu-preflight/runs/*/train.log; return 4; }
  fi

  # whatever the pre-flight took, the comparison stops 520 s after the start, inside the device's 600 s per command
  limit=${COMPARE_LIMIT_S:-$(( 520 - $(date +%s) + start ))}
  [ "$MODE" = smoke ] && limit=${COMPARE_LIMIT_S:-1800}  # a loaded CPU machine: no device clock to respect
  echo "gpu_compare: comparison, $JOBS runs at a time, stopping after ${limit}s"
  timeout -s INT -k 30 "$limit" "$PY" -m adapt_pretrain.experiments.compare --config launch/configs/compare-gpu.yaml \
    --out-dir "$work" --corpus "${corpus[@]}" --jobs "$JOBS" --report "$OUT/results.md" --plots-dir "$OUT" \
    "${extra[@]}" "$@"
  rc=$?
  [ $rc -eq 124 ] && echo "gpu_compare: time limit reached; the report covers the finished runs (a second call resumes)"
  "$PY" -m adapt_pretrain.experiments.compare --config launch/configs/compare-gpu.yaml --out-dir "$work" --corpus "${corpus[@]}" \
    --report "$OUT/results.md" --plots-dir "$OUT" --report-only "${extra[@]}" "$@"
  (cd "$work" && tar -czf "$OUT/runs.tar.gz" --ignore-failed-read scoring_work.json data/manifest.json \
     runs/*/result.json runs/*/metrics.jsonl runs/*/train.log runs/*/compare_run.yaml 2>/dev/null)
  echo "gpu_compare: done in $(( $(date +%s) - start ))s (comparison exit status $rc); results in $OUT"
  return $rc
}

[ "$MODE" = smoke ] && BLOCK=$(mktemp -d)
main "$@" 2>&1 | tee "$OUT/gpu_compare.log"
rc=${PIPESTATUS[0]}
[ "$MODE" = smoke ] && rm -rf "$BLOCK"
exit "$rc"
