#!/usr/bin/env bash
# The main job, end to end on the built-in synthetic data:
#   prepare -> train -> evaluate -> distil the search head -> export to ONNX -> score with the torch-free runtime.
#   bash scripts/run.sh [RUN_DIR]        (default runs/default; data in data/synthetic)
# Extra arguments for training go in TRAIN_ARGS, e.g. TRAIN_ARGS="--device cuda".
# Run again, it replaces its own outputs in RUN_DIR and DATA (--overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
RUN=${1:-runs/default}
DATA=${DATA:-data/synthetic}

echo "== 1/6 prepare: the built-in synthetic dataset -> $DATA"
$PY -m imram_min.data.synthetic --out "$DATA" --overwrite
echo "== 2/6 train -> $RUN"
# shellcheck disable=SC2086
$PY -m imram_min.train --data "$DATA" --out "$RUN" --overwrite ${TRAIN_ARGS:-}
echo "== 3/6 evaluate on the test split"
$PY -m imram_min.evaluate "$RUN/best.pt" --data "$DATA" --split test --json "$RUN/test_metrics.json" --save-sims "$RUN/test_sims.npy" --overwrite
echo "== 4/6 distil the search's first-stage head (IMRAM frozen) -> $RUN/global_head.pt"
$PY -m imram_min.search.global_head "$RUN/best.pt" --data "$DATA" --out "$RUN/global_head.pt" --overwrite
echo "== 5/6 export to ONNX, with the head beside the checkpoint -> $RUN/model"
$PY -m export "$RUN/best.pt" --out "$RUN/model" --overwrite
echo "== 6/6 score the test split with ONNX Runtime (no torch) -> $RUN/runtime_sims.npy, $RUN/rankings.txt"
$PY -m runtime.score "$DATA/test_ims.npy" "$DATA/test_caps.txt" --model "$RUN/model" --output "$RUN/runtime_sims.npy" --overwrite --top-k 3 > "$RUN/rankings.txt"
head -n 8 "$RUN/rankings.txt"
echo "done: metrics in $RUN/test_metrics.json, ONNX model (with the search head) in $RUN/model"
