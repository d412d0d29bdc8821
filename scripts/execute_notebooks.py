"""Execute every chapter in place (nbclient), keeping its outputs: on the GPU host for the
book's H100 outputs, or on a CPU (numba simulator; GPU-only cells skip) as a fallback.

    python scripts/execute_notebooks.py [notebooks/NN_x.ipynb ...]
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fastmqa.gpucheck import run_notebooks  # noqa: E402  (the GPU check executes notebooks the same way)

paths = [Path(p).resolve() for p in sys.argv[1:]] or sorted((ROOT / "notebooks").glob("*.ipynb"))
sys.exit(0 if all(r["ok"] for r in run_notebooks(paths)) else 1)
