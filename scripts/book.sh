#!/usr/bin/env bash
# Set up and build the book to _build/html (warnings are errors).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
"$(dirname "$PY")/jupyter-book" build . -W --keep-going -q
echo
echo "The book is at $PWD/_build/html/index.html"
