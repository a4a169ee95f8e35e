#!/usr/bin/env bash
# The main job, end to end on the built-in synthetic data:
#   prepare -> train -> evaluate -> export to ONNX -> score with the torch-free runtime.
#   bash scripts/run.sh [RUN_DIR]        (default runs/default; data in data/synthetic)
# Extra arguments for training go in TRAIN_ARGS, e.g. TRAIN_ARGS="--device cuda".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
RUN=${1:-runs/default}
DATA=${DATA:-data/synthetic}

echo "== 1/5 prepare: the built-in synthetic dataset -> $DATA"
$PY -m imram_min.synthetic --out "$DATA"
echo "== 2/5 train -> $RUN"
# shellcheck disable=SC2086
$PY -m imram_min.train --data "$DATA" --out "$RUN" ${TRAIN_ARGS:-}
echo "== 3/5 evaluate on the test split"
$PY -m imram_min.evaluate "$RUN/best.pt" --data "$DATA" --split test --json "$RUN/test_metrics.json" --save-sims "$RUN/test_sims.npy"
echo "== 4/5 export to ONNX -> $RUN/model"
$PY -m export "$RUN/best.pt" --out "$RUN/model"
echo "== 5/5 score the test split with ONNX Runtime (no torch) -> $RUN/runtime_sims.npy, $RUN/rankings.txt"
$PY -m runtime.score "$DATA/test_ims.npy" "$DATA/test_caps.txt" --model "$RUN/model" --output "$RUN/runtime_sims.npy" --top-k 3 > "$RUN/rankings.txt"
head -n 8 "$RUN/rankings.txt"
echo "done: metrics in $RUN/test_metrics.json, ONNX model in $RUN/model"
