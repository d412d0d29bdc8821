"""Run numba.cuda prototypes on the GPU or, with no GPU, in numba's CUDA simulator.

The switch must be thrown before numba.cuda is first imported, so call `setup()` at the
top of a notebook (or set FASTMQA_SIM=1 / NUMBA_ENABLE_CUDASIM=1 in the environment):

    from fastmqa import sim
    sim.setup()          # "auto": the GPU if numba sees one, else the simulator

The simulator runs every thread as a Python thread: correct, but thousands of times
slower, so prototypes are run there at tiny sizes only.
"""
from __future__ import annotations

import os
import sys

_MODE = None


def _gpu_present() -> bool:
    try:
        import torch
        if torch.cuda.is_available():
            return True
    except Exception:
        pass
    return os.path.exists("/dev/nvidia0")


def setup(mode: str = "auto", quiet: bool = False) -> str:
    """Choose 'gpu', 'sim' or 'auto'. Returns the mode in force and prints a banner."""
    global _MODE
    if mode not in ("auto", "gpu", "sim"):
        raise ValueError(f"mode must be 'auto', 'gpu' or 'sim', got {mode!r}")
    env = os.environ.get("FASTMQA_SIM")
    if mode == "auto":
        if env is not None:
            mode = "sim" if env not in ("0", "") else "gpu"
        elif os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
            mode = "sim"
        else:
            mode = "gpu" if _gpu_present() else "sim"
    want_sim = "1" if mode == "sim" else "0"
    if "numba.cuda" in sys.modules and os.environ.get("NUMBA_ENABLE_CUDASIM", "0") != want_sim:
        raise RuntimeError(f"numba.cuda was already imported with NUMBA_ENABLE_CUDASIM="
                           f"{os.environ.get('NUMBA_ENABLE_CUDASIM', '0')}; call fastmqa.sim.setup('{mode}') "
                           "before anything imports numba.cuda (restart the kernel)")
    if mode == "gpu" and not _gpu_present():
        raise RuntimeError("mode='gpu' asked for, but no CUDA GPU is visible; use mode='sim' "
                           "(numba's CUDA simulator, on the CPU)")
    os.environ["NUMBA_ENABLE_CUDASIM"] = want_sim
    # The prototypes launch teaching-sized grids on purpose; numba's "grid size N will likely
    # result in GPU under-utilization" warning would fill every chapter's output (set it to 1 to see it).
    os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
    _MODE = mode
    if not quiet:
        print(banner())
    return mode


def mode() -> str:
    if _MODE is None:
        return setup(quiet=True)
    return _MODE


def simulated() -> bool:
    return mode() == "sim"


def banner() -> str:
    if _MODE == "sim":
        return ("[fastmqa] numba.cuda prototypes run in the CUDA SIMULATOR on the CPU "
                "(NUMBA_ENABLE_CUDASIM=1): correct but slow, tiny sizes only; no timings.")
    return "[fastmqa] numba.cuda prototypes run on the GPU."


def cuda():
    """numba.cuda, imported after the switch."""
    mode()
    from numba import cuda as _cuda
    return _cuda
