#!/usr/bin/env bash
# From nothing to a report with your own solver (solver.py beside this script), every step on the
# command line: write the trajectories, serve the solver, train SRC / NON / ZO-SOL against the served
# solver and FO-SOL against the same function in process, then report.
#
#   examples/own_solver/run.sh [OUT]        # default runs/own-solver; env PORT=50071 STEPS=200
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-runs/own-solver}
PORT=${PORT:-50071}
STEPS=${STEPS:-200}
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"  # MODULE:FUNCTION specs import solver.py from here
mkdir -p "$OUT"

[ -f "$OUT/trajectories.npz" ] || python "$HERE/make_trajectories.py" "$OUT/trajectories.npz"

deepzero-oracle serve solver:source_step --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER"' EXIT  # stop the server this script started (SIGTERM: graceful)
for _ in $(seq 120); do grep -q "serving" "$OUT/serve.log" && break; sleep 0.5; done

for METHOD in src non zo-sol; do
    deepzero-oracle sol train --out "$OUT" --data "$OUT/trajectories.npz" --solver "grpc://127.0.0.1:$PORT" \
        --method "$METHOD" --steps "$STEPS" --quiet
done
# FO-SOL back-propagates through the solver: the same function, in this process, called with torch tensors
deepzero-oracle sol train --out "$OUT" --solver solver:source_step --method fo-sol --steps "$STEPS" --quiet
deepzero-oracle sol report --out "$OUT"
