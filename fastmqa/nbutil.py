"""Small helpers the notebooks share: show source, say what machine this is, read results."""
from __future__ import annotations

import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _line_range(lines, start, end):
    """0-based [lo, hi) of lines from start to end: numbers are 1-based and inclusive; a string
    start is the first line that contains it, a string end the first line after start that
    contains it (not shown). A marker that is not found raises ValueError."""
    if not isinstance(start, str):
        lo = (start or 1) - 1
    else:
        lo = next((i for i, ln in enumerate(lines) if start in ln), None)
        if lo is None:
            raise ValueError(f"show_source: no line contains {start!r}")
    hi = end
    if isinstance(end, str):
        hi = next((i for i in range(lo + 1, len(lines)) if end in lines[i]), None)
        if hi is None:
            raise ValueError(f"show_source: no line after {start!r} contains {end!r}")
    return lo, hi


def source_text(obj, start=None, end=None):
    """(text, language) that show_source displays: the source of a function, a module, or a file
    in kernels/ (by name), cut to [start, end] (see show_source)."""
    if isinstance(obj, str):
        path = ROOT / "kernels" / obj if not obj.startswith("/") else Path(obj)
        text, lang = path.read_text(), "cuda" if path.suffix in (".cu", ".cuh") else "python"
    else:
        target = getattr(obj, "py_func", obj)  # numba dispatchers keep the Python function
        text, lang = inspect.getsource(target), "python"
    lines = text.splitlines()
    lo, hi = _line_range(lines, start, end)
    return "\n".join(lines[lo:hi]).rstrip("\n"), lang  # (no trailing blank lines before an end marker)


def show_source(obj, start=None, end=None):
    """Show the source of a function, a module, or a file in kernels/ (by name), highlighted.
    start, end: line numbers (1-based, inclusive) or marker strings (from the line containing
    start up to, not including, the line containing end): markers survive edits above them.
    tests/test_listings.py checks that the listings saved in the chapters match the files."""
    text, lang = source_text(obj, start, end)
    try:
        from IPython.display import Code, display
        display(Code(text, language=lang))
    except ImportError:
        print(text)


def gpu() -> bool:
    """True when a CUDA GPU is usable from torch (so the .cu kernels can be built and run)."""
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def no_gpu(what: str):
    print(f"no GPU here: skipping {what}; run this notebook on a GPU to see it.")


def machine() -> dict:
    import platform

    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch CUDA": torch.version.cuda or "none (CPU build)", "GPU": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update({"GPU": p.name, "SMs": p.multi_processor_count,
                     "memory GiB": round(p.total_memory / 2**30, 1),
                     "compute capability": f"{p.major}.{p.minor}"})
    return info
