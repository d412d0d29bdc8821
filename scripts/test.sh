#!/usr/bin/env bash
# Set up and run the tests: pytest on tests/, then nbval on every notebook.
# With no GPU, notebooks run the numba prototypes in the CUDA simulator and skip GPU-only cells.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export MPLBACKEND=Agg PYTHONHASHSEED=0
$PY -m pytest -q -p no:cacheprovider tests/ "$@"
$PY -m pytest -q -p no:cacheprovider --nbval-lax notebooks/
