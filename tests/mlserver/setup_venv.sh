#!/usr/bin/env bash
# Create .venv-mlserver (MLServer in its own virtual environment) if it is missing.
#
# MLServer pins protobuf<7 and many web packages; keeping it out of the project's .venv lets
# the project use any protobuf >= 5.27.2. The tests start it as a subprocess, like a remote
# server. Idempotent: a marker file records the pinned requirement; re-running is a no-op.
#
# Usage: tests/mlserver/setup_venv.sh [VENV_DIR]   (default: <repo>/.venv-mlserver)
# Environment: PYTHON (interpreter to build the venv from, default python3).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-$repo/.venv-mlserver}"
python="${PYTHON:-python3}"
# MLServer 1.7.1, run with parallel_workers: 0 (with worker processes its models were dropped).
requirement="mlserver==1.7.1"
marker="$venv/.installed"

if [ -f "$marker" ] && [ "$(cat "$marker")" = "$requirement" ] && [ -x "$venv/bin/mlserver" ]; then
    exit 0
fi

mkdir -p "$venv"
# Two test runs racing to create the venv would corrupt it: serialize on a lock file (kept
# inside the venv folder, so nothing new appears in the work tree).
exec 9>"$venv/.setup.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi
if [ -f "$marker" ] && [ "$(cat "$marker")" = "$requirement" ] && [ -x "$venv/bin/mlserver" ]; then
    exit 0
fi

start=$(date +%s)
test -x "$venv/bin/python" || "$python" -m venv "$venv"
# (pip's complaints about unreachable local index mirrors in some machines' pip config are
# filtered out; pip's exit status still decides, through pipefail.)
"$venv/bin/python" -m pip install --disable-pip-version-check -q "$requirement" 2>&1 \
    | { grep -v "^WARNING: Location '" || true; } >&2
"$venv/bin/python" -c "import mlserver, numpy; print('mlserver', mlserver.__version__)"
echo "$requirement" > "$marker"
echo "setup_venv.sh: $venv ready in $(( $(date +%s) - start )) s"
