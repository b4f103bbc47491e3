#!/usr/bin/env bash
# All GPU checks in one script (about 6-9 minutes on one H200, capped at 9; no network needed):
#   1. install megatron-core, webdataset (+ braceexpand) and liger-kernel from the wheels in .whl/
#      (fetch them beforehand, where there is network, with `bash benchmarks/gpu_wheels.sh download .whl megatron-core==0.16.1 webdataset==1.0.2
#      braceexpand==0.1.7 liger-kernel==0.8.5`, and carry
#      .whl along) and this package (editable, no build isolation, no index);
#   2. the kernel tests with CUDA tensors (Triton compiled, not interpreted; the vocab-parallel test's
#      worker processes too) and the SDPA attention check on the GPU's fused kernels;
#   3. benchmarks/bench_mfu.py: tokens/s, TFLOP/s and MFU of gpt-125m and gpt-1b (TP 1 on one GPU,
#      64 sequences of 2048 tokens per step via accumulation), ADAPT off and on with the anchor
#      refresh amortised at the config's refresh_interval (50);
#   4. benchmarks/bench_loss.py in bf16 at T=4096 V=32000 and T=16384 V=128256 (ADAPT loss path vs
#      megatron's vocab-parallel CE and Liger's, plus the grad-kernel layouts);
#   5. if at least GPU_CHECK_TRAIN_BUDGET seconds (default 150) are left: a short bf16 run of the real
#      trainer (gpt-125m shape, demo corpus, ADAPT on) and an exact resume check against the run-to-run
#      noise floor.
# Every step's timeout is capped so the whole script ends within GPU_CHECK_BUDGET seconds (default
# 540, under a 10-minute command limit); a step with under 20 s left is skipped and says so.
# Prints a summary last. Usage: bash benchmarks/gpu_check.sh   (logs: $GPU_CHECK_LOGS, default gpu_check_logs;
# at most 8 files, so a caller can collect the whole folder).
# Env: GPU_CHECK_WHEELS (default .whl), GPU_CHECK_FUSIONS=false to measure without megatron's fusions.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
LOG_DIR=${GPU_CHECK_LOGS:-gpu_check_logs}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
BUDGET=${GPU_CHECK_BUDGET:-540}
PY=python3
elapsed() { echo $(( $(date +%s) - START )); }
capped() {  # capped SECONDS: SECONDS or what is left of the budget, whichever is smaller (0: skip)
  local left=$(( BUDGET - $(elapsed) ))
  [ "$left" -lt 20 ] && { echo 0; return; }
  echo $(( $1 < left ? $1 : left ))
}
run_capped() {  # run_capped SECONDS CMD...: timeout-capped run; rc 124 when skipped for time
  local t; t=$(capped "$1"); shift
  [ "$t" -eq 0 ] && { echo "gpu_check: skipped for time: $*"; return 124; }
  timeout "$t" "$@"
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv \
  || { echo "gpu_check: no NVIDIA GPU (nvidia-smi missing)"; exit 2; }
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1
unset TRITON_INTERPRET ADAPT_KERNELS_FORCE_TRITON

# ---------------------------------------------------------------------------------------- 1. install
if ! $PY -c "import megatron.core, webdataset" 2>/dev/null; then
  ls "$WHEELS"/megatron_core-*.whl >/dev/null 2>&1 \
    || { echo "gpu_check: no wheels in $WHEELS: run 'bash benchmarks/gpu_wheels.sh download $WHEELS megatron-core==0.16.1 webdataset==1.0.2 braceexpand==0.1.7 liger-kernel==0.8.5' where there is network and carry $WHEELS"; exit 3; }
  PYTHON=$PY bash benchmarks/gpu_wheels.sh install "$WHEELS" /tmp/gpu_check_site \
    || { echo "gpu_check: installing the wheels failed"; exit 3; }
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import adapt_pretrain.kernels" 2>/dev/null \
  || $PY -m pip install -q --no-deps --no-index --no-build-isolation -e . >/dev/null \
  || { echo "gpu_check: pip install -e . failed"; exit 3; }
$PY -c "import torch, triton, megatron.core; assert torch.cuda.is_available(); print('torch', torch.__version__, 'triton', triton.__version__, 'megatron-core', megatron.core.__version__, torch.cuda.get_device_name(0))" \
  || exit 3
$PY -c "import liger_kernel" 2>/dev/null || echo "gpu_check: liger-kernel not importable (optional baseline)"

# ---------------------------------------------------------------------------------------- 2. tests
run_capped 180 $PY -m pytest -q -p no:cacheprovider tests/kernels tests/distributed/test_attention_gpu.py -rs 2>&1 \
  | tee "$LOG_DIR/tests.log"
TEST_RC=${PIPESTATUS[0]}

# ---------------------------------------------------------------------------------------- 3. MFU
MFU_JSON="$LOG_DIR/mfu.jsonl"
rm -f "$MFU_JSON"
FUSIONS=${GPU_CHECK_FUSIONS:-true}
ONE_GPU=(parallel.tensor=1 parallel.pipeline=1 parallel.sequence_parallel=false "model.fusions=$FUSIONS"
         train.global_batch_size=64 train.run_dir=/tmp/gpu_check_mfu_run)
MFU_RC=0
bench_mfu() {  # name, timeout, config, micro-batch size
  run_capped "$2" $PY benchmarks/bench_mfu.py --name "$1" --config "$3" --warmup 2 --steps 4 --refreshes 2 \
    --json "$MFU_JSON" "${ONE_GPU[@]}" "train.micro_batch_size=$4" 2>&1 | tee -a "$LOG_DIR/mfu.log"
  local rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && MFU_RC=$rc && echo "gpu_check: bench_mfu $1 failed (rc=$rc)"
}
: > "$LOG_DIR/mfu.log"
bench_mfu gpt-125m 120 launch/configs/gpt-125m.yaml 16
bench_mfu gpt-1b 200 launch/configs/gpt-1b.yaml 8

# ---------------------------------------------------------------------------------------- 4. loss path
BENCH_RC=0
for SHAPE in "4096 32000 10" "16384 128256 5"; do
  read -r T V REPS <<< "$SHAPE"
  run_capped 100 $PY benchmarks/bench_loss.py --device cuda --dtype bf16 --T "$T" --V "$V" --reps "$REPS" \
    --json "$LOG_DIR/loss_$T.json" 2>&1 | tee "$LOG_DIR/loss_$T.log"
  rc=${PIPESTATUS[0]}; [ "$rc" -gt 1 ] && BENCH_RC=$rc  # 1 = ran, ratio target not met
done

# ---------------------------------------------------------------------------------------- 5. trainer run
TRAIN_RC=skipped
if [ $(( BUDGET - $(elapsed) )) -ge "${GPU_CHECK_TRAIN_BUDGET:-150}" ]; then
  TRAIN_DIR=/tmp/gpu_check_train
  rm -rf "$TRAIN_DIR"; mkdir -p "$TRAIN_DIR"
  TRAIN_ARGS=(--config launch/configs/gpt-125m.yaml prepare.inputs=demo prepare.vocab_size=8192 prepare.num_workers=8
              "data.data_dir=$TRAIN_DIR/data" model.seq_len=1024 train.micro_batch_size=8 train.global_batch_size=16
              optim.warmup_steps=5 adapt.enabled=true adapt.refresh_interval=10 wandb.enabled=false
              train.log_interval=5 train.steps=20 train.checkpoint_interval=10 train.progress_bar=false)
  # the same run twice, the second stopped at step 10 and resumed: GPU kernels are not bitwise
  # deterministic run to run, so steps 0-9 measure the noise floor the resumed steps must stay within
  { run_capped 150 $PY -m adapt_pretrain.train "${TRAIN_ARGS[@]}" "train.run_dir=$TRAIN_DIR/run" \
      && run_capped 100 $PY -m adapt_pretrain.train "${TRAIN_ARGS[@]}" "train.run_dir=$TRAIN_DIR/resumed" train.stop_at_step=10 \
      && run_capped 100 $PY -m adapt_pretrain.train "${TRAIN_ARGS[@]}" "train.run_dir=$TRAIN_DIR/resumed" --resume \
      && $PY - "$TRAIN_DIR/run" "$TRAIN_DIR/resumed" <<'PYEOF'
import sys
from adapt_pretrain.monitor import read_metrics
a, b = ({s: l["scalars"]["loss"] for s, l in read_metrics(d)[0].items()} for d in sys.argv[1:3])
if not sorted(a) == sorted(b) == list(range(20)):
    print(f"resume check: MISSING steps ({sorted(set(range(20)) - set(a) - set(b))})"); sys.exit(1)
before = max(abs(a[s] - b[s]) for s in range(10))
after = max(abs(a[s] - b[s]) for s in range(10, 20))
ok = after <= max(10 * before, 1e-3)
print(f"resume check: {'OK' if ok else 'MISMATCH'}: max |loss diff| before the resume point {before:.3g} "
      f"(run-to-run noise), after resuming at step 10 {after:.3g}; final loss {a[19]:.4f} (step 0 {a[0]:.4f})")
sys.exit(0 if ok else 1)
PYEOF
  } > "$LOG_DIR/train.log" 2>&1
  TRAIN_RC=$?
fi

# ---------------------------------------------------------------------------------------- summary
echo "================ gpu_check summary ($(elapsed) s) ================"
echo "kernel + attention tests (compiled): $(tail -n 1 "$LOG_DIR/tests.log")  [rc=$TEST_RC]"
grep -E "^\[|ADAPT (off|on)" "$LOG_DIR/mfu.log" || echo "bench_mfu: no output (rc=$MFU_RC)"
for T in 4096 16384; do
  echo "--- loss path T=$T"; grep -E "^(T=|variant|torch-ce|megatron|adapt|liger|target|grad kernel|  (split|row))" "$LOG_DIR/loss_$T.log" || echo "(no output)"
done
if [ "$TRAIN_RC" = skipped ]; then echo "trainer run + resume: skipped (time budget)"; else
  echo "trainer run + resume (bf16, ADAPT on, 20 steps): rc=$TRAIN_RC; $(grep -E '^resume check' "$LOG_DIR/train.log" || tail -n 3 "$LOG_DIR/train.log")"; fi
[ "$TEST_RC" -eq 0 ] && [ "$MFU_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ] && { [ "$TRAIN_RC" = skipped ] || [ "$TRAIN_RC" -eq 0 ]; }
