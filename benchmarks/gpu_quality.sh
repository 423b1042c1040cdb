#!/usr/bin/env bash
# The GPU quality table, prepared for one device-tool lease: all of Beauty (12,101 items),
# the mixed protocol (training/mixed.py: one ranking of old and new items; all, warm-target
# and cold-target users of one training), in two phases against one deadline:
#   1. id, text, text-init (composite-text's teacher) and composite-text: no alignment, so the
#      served model's comparison lands first;
#   2. said-init and composite-said (resumed into the same results file; said-init is its
#      teacher, SAID_COMPOSITE_TEACHER_INIT=content): one alignment with GPU-sized
#      batches, in the time left (the runs phase 1 finished are kept, not run again).
# Each finished run is written at once (training/evaluate.py), so a phase cut at the deadline
# keeps what it finished. Caches stay in WORK; only the results, the log and the GPU's name
# are copied to $OUT (the device tool brings back at most 8 files).
#
#   device run (from the repo root; data copied to the machine, SAID_LLM the GGUF there):
#     SAID_LLM=/tmp/said/SmolLM2-135M-Instruct.Q4_1.gguf bash benchmarks/gpu_quality.sh DATASET_DIR [PHASES]
#   PHASES: "both" (default), or "said": phase 2 alone on a fresh machine, with the id and
#   text baselines it is compared with and its teacher said-init, not composite-text.
#
# Fresh rows refine 256 a step (SAID_REFINE_BATCH; 16 on CPU): rows are independent and
# their optimiser (adagrad) is blind to the loss's 1/batch scale, so only the step count
# changes. At 16, the 1,210 held-out rows (with the fidelity decoding and the reference
# cohort) did not finish in the ~3.5 minutes between the alignment's end and the deadline of
# the 2026-12-06 lease (log: benchmarks/results/quality-mixed-beauty-full-h100-2026-12-06.log).
#
# Scorers train as in the CPU tables of docs/quality-mixed.md (patience 4, length-batched).
set -uo pipefail
dataset=${1:?usage: gpu_quality.sh DATASET_DIR [both|said]}
phases=${2:-both}
if [[ $phases != both && $phases != said ]]; then
  echo "unknown PHASES $phases: both or said" >&2
  exit 2
fi
out=${OUT:-/tmp/said-gpu-out}
work=${WORK:-/tmp/said-gpu}
deadline=$((SECONDS + ${SAID_GPU_SECONDS:-540}))
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 SAID_DEVICE=${SAID_DEVICE:-cuda} SAID_DATA_DIR="$work/data"
export SAID_ALIGN_BATCH=${SAID_ALIGN_BATCH:-256} SAID_ALIGN_EPOCHS=${SAID_ALIGN_EPOCHS:-40}
export SAID_REFINE_BATCH=${SAID_REFINE_BATCH:-256}
export SAID_SCORER_PATIENCE=${SAID_SCORER_PATIENCE:-4} SAID_SCORER_LENGTH_BATCHES=${SAID_SCORER_LENGTH_BATCHES:-1}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"

phase() {  # quality.py with the given arguments, stopped at the deadline
  local left=$((deadline - SECONDS))
  if ((left < 60)); then
    echo "phase skipped: ${left}s left before the deadline" | tee -a "$out/log.txt"
    return 0
  fi
  echo "phase: $* (${left}s left)" | tee -a "$out/log.txt"
  timeout "$left" python3 benchmarks/quality.py --dataset "$dataset" --out "$work/quality" \
    --align-seeds 0 --seeds 0 --protocol mixed "$@" 2>&1 | grep --line-buffered -v "it/s\]" \
    | tee -a "$out/log.txt"
  echo "phase exit ${PIPESTATUS[0]} after ${SECONDS}s" | tee -a "$out/log.txt"
  cp "$work/quality/results.json" "$out/results.json" 2>/dev/null || true
}

case $phases in
  both)
    phase --variant id text text-init composite-text
    phase --resume --variant id text text-init composite-text said-init composite-said
    ;;
  said) phase --resume --variant id text said-init composite-said ;;
esac
