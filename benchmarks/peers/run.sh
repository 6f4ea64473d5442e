#!/usr/bin/env bash
# Everything `make bench` runs for the peer comparison: the per-peer venvs (idempotent), parity
# (exits non-zero on any mismatch, which stops here), then speed. Extra arguments go to speed.py
# (e.g. --quick). The driver scripts run in the main venv (.venv, or $SPLICE_PY).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${SPLICE_PY:-$ROOT/.venv/bin/python}"
bash "$HERE/setup.sh"
"$PY" "$HERE/parity.py"
"$PY" "$HERE/speed.py" "$@"
