#!/usr/bin/env bash
# The GPU quality table, prepared for one device-tool lease: all of Beauty (12,101 items),
# one alignment with GPU-sized batches, then the mixed protocol (training/mixed.py: one
# ranking of old and new items; all, warm-target and cold-target users of one training)
# for id, text and the composites, every result written to $OUT/quality/results.json as it
# finishes (a run cut at the limit keeps what it finished).
#
#   device run (from the repo root, data copied into an ignored, carried folder):
#     bash benchmarks/gpu_quality.sh .data/amazon-beauty
set -euo pipefail
dataset=${1:?usage: gpu_quality.sh DATASET_DIR}
out=${OUT:-/tmp/said-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 SAID_DEVICE=cuda SAID_DATA_DIR="$out/data"
export SAID_ALIGN_BATCH=${SAID_ALIGN_BATCH:-256} SAID_ALIGN_EPOCHS=${SAID_ALIGN_EPOCHS:-40}
export SAID_SCORER_BATCH=${SAID_SCORER_BATCH:-256}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
timeout 570 python3 benchmarks/quality.py --dataset "$dataset" --out "$out/quality" \
  --align-seeds 0 --seeds 0 --protocol mixed \
  --variant id text composite-said composite-text composite-said+text 2>&1 | grep -v "it/s\]" | tee "$out/log.txt"
