#!/usr/bin/env bash
# The GPU evidence run of the alignment (issue 14), prepared for one device-tool lease:
# every Beauty item (12,101) aligned with the product's defaults but GPU-sized batches,
# fidelity and the fresh-item path measured, log and JSON written under $OUT.
#
#   device run (from the repo root, with the data copied into an ignored, carried folder
#   and the wheels the machine lacks in .whl):
#     bash benchmarks/gpu_alignment.sh .data/amazon-beauty
#
# Budget: 10 minutes of alignment on one H100 (the step is launch-bound at ~100 ms, so
# batches are large and the projector rate is square-root scaled with them).
set -euo pipefail
dataset=${1:?usage: gpu_alignment.sh DATASET_DIR}
out=${OUT:-/tmp/said-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 SAID_DEVICE=cuda SAID_DATA_DIR="$out/data"
export SAID_ALIGN_BATCH=${SAID_ALIGN_BATCH:-256} SAID_ALIGN_EPOCHS=${SAID_ALIGN_EPOCHS:-60}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
timeout 570 python3 benchmarks/alignment_fidelity.py --dataset "$dataset" --out "$out/run" 2>&1 \
  | grep -v "it/s\]" | tee "$out/log.txt"
cp "$out/run/fidelity.json" "$out/fidelity.json"
