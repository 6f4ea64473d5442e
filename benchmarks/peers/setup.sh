#!/usr/bin/env bash
# Create (or refresh) one virtual env per peer library under benchmarks/peers/.venvs/<name>.
# Each holds torch 2.13.0 (the CPU wheel: it is installed first and alone, because any other torch
# spec pulls a multi-GB CUDA build), the peer at its pinned version, and splice (editable), so
# that splice and the peer are measured in one process. requirements/<name>.txt pins the peer and
# transformers; requirements/<name>.lock (a pip freeze of a working venv) pins everything else.
# Idempotent: a venv whose stamp is newer than those files and this script is left alone.
#
#   bash benchmarks/peers/setup.sh            # all peers
#   bash benchmarks/peers/setup.sh tl3 pyvene # some
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
PEERS=("$@")
[ ${#PEERS[@]} -gt 0 ] || PEERS=(tl3 tl4 nnsight pyvene)

for name in "${PEERS[@]}"; do
    req="$HERE/requirements/$name.txt"
    [ -f "$req" ] || { echo "setup.sh: no requirements/$name.txt" >&2; exit 2; }
    venv="$HERE/.venvs/$name"
    stamp="$venv/.installed"
    lockfile="$HERE/requirements/$name.lock"
    if [ -f "$stamp" ] && [ "$stamp" -nt "$req" ] && [ "$stamp" -nt "$HERE/setup.sh" ] \
        && { [ ! -f "$lockfile" ] || [ "$stamp" -nt "$lockfile" ]; }; then
        echo "setup.sh: $name up to date ($venv)"
        continue
    fi
    echo "setup.sh: installing $name into $venv"
    test -x "$venv/bin/python" || "$PYTHON" -m venv "$venv"
    pip=("$venv/bin/python" -m pip install -q)
    "${pip[@]}" --upgrade pip
    "${pip[@]}" torch==2.13.0
    lock=()
    [ -f "$lockfile" ] && lock=(-c "$lockfile")
    "${pip[@]}" "${lock[@]}" torch==2.13.0 -r "$req" -e "$ROOT"
    "$venv/bin/python" -c "import torch, transformers, splice; assert torch.__version__.startswith('2.13.0'), torch.__version__"
    touch "$stamp"
done
