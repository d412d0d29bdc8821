#!/usr/bin/env bash
# Set up the course's Python environment; sourced by scripts/book.sh and scripts/test.sh.
#
# CPU machine (laptop, CI): a virtual environment .venv from requirements.txt (the CPU wheel of
#   torch), the package in editable mode. pip's download cache lives in .cache/pip.
# GPU host (torch with CUDA already installed, no registry): never reinstall torch there; use the
#   system python, plus the wheels carried in .whl/ (DEVNOTES.md) when present.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$PWD/.cache/pip}" PIP_DISABLE_PIP_VERSION_CHECK=1
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[setup] GPU host: using the preinstalled torch $(python3 -c 'import torch; print(torch.__version__)')"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  PY=python3
else
  if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    python3 -m venv .venv
  fi
  stamp=.venv/.requirements.sha
  want=$(cat requirements.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing requirements.txt into .venv (CPU torch wheel)"
    .venv/bin/python -m pip install -q -r requirements.txt 2> >(grep -v "WARNING: Location" >&2)
    .venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt 2> >(grep -v "WARNING: Location" >&2)
    .venv/bin/python -m pip install -q --no-deps -e . 2> >(grep -v "WARNING: Location" >&2)
    echo "$want" > $stamp
  fi
  PY=$PWD/.venv/bin/python
  export PATH="$PWD/.venv/bin:$PATH"
fi
export PY
