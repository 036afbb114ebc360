#!/usr/bin/env bash
# Robustify your own classifier, end to end: a scikit-learn MLP served as a plain NumPy function,
# digits exported as PNG folders, `none` (no denoiser) and `zo-ds` through the CLI.
# Run from this folder with the project installed: bash run.sh [OUT] [PORT]
set -euo pipefail
OUT=${1:-runs/own-classifier}
PORT=${2:-50061}
DATA=data/digits-png

[ -d "$DATA" ] || python export_digits.py "$DATA"
python train_mlp.py "$DATA"

deepzero-oracle serve classifier:classify --port "$PORT" > serve.log 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
until grep -qs "serving" serve.log; do  # the line it prints once listening
    kill -0 "$SERVER" 2>/dev/null || { cat serve.log; exit 1; }
    sleep 0.5
done
CLASSIFIER=kserve://127.0.0.1:$PORT/classify

deepzero-oracle defense train --method zo-ds --classifier "$CLASSIFIER" --data "$DATA" --sigma 0.25 \
    --objective mse+stab --pretrain-epochs 3 --epochs 3 --quiet --out "$OUT/zo-ds"
CERTIFY=(--n0 100 --n 10000 --alpha 0.001 --max-examples 100 --quiet)
deepzero-oracle defense certify --method zo-ds "${CERTIFY[@]}" --out "$OUT/zo-ds"
deepzero-oracle defense certify --method none --classifier "$CLASSIFIER" --data "$DATA" --sigma 0.25 \
    "${CERTIFY[@]}" --out "$OUT/none"
deepzero-oracle defense report --root "$OUT"
