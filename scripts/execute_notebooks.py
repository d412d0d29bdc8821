"""Execute every chapter in place (nbclient), keeping its outputs: on the GPU host for the
book's H100 outputs, or on a CPU (numba simulator; GPU-only cells skip) as a fallback.

    python scripts/execute_notebooks.py [notebooks/NN_x.ipynb ...]
"""
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
paths = [Path(p).resolve() for p in sys.argv[1:]] or sorted((ROOT / "notebooks").glob("*.ipynb"))
bad = 0
for p in paths:
    t = time.time()
    nb = nbformat.read(p, as_version=4)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(p.parent)}}).execute()
        status = "ok"
    except Exception as e:
        status, bad = f"FAIL {type(e).__name__}: {str(e)[-400:]}", bad + 1
    nbformat.write(nb, p)
    print(f"{p.name}: {status} ({time.time() - t:.0f} s)", flush=True)
sys.exit(1 if bad else 0)
