"""Every kernel listing a chapter shows is what the file holds now.

A chapter shows kernel code with cells of `show_source("file.cu", start, end)` calls, and keeps the
output of its last run on the GPU host. A kernel edited after that run would leave the chapter
showing old code, or, with line numbers, the wrong lines. This test recomputes each such listing
from the files (no GPU needed) and compares it with the saved output."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from fastmqa import nbutil

ROOT = Path(__file__).resolve().parent.parent


def listing_cells(notebooks):
    """(notebook name, cell index, [call args], saved outputs) of every code cell made only of
    show_source calls on a kernel file (a string first argument, literal arguments)."""
    out = []
    for nb in notebooks:
        for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
            if cell["cell_type"] != "code":
                continue
            try:
                body = ast.parse("".join(cell["source"])).body
            except SyntaxError:
                continue
            calls = []
            for stmt in body:
                call = stmt.value if isinstance(stmt, ast.Expr) else None
                if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "show_source" and call.args
                        and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
                    calls = None
                    break
                calls.append([ast.literal_eval(a) for a in call.args])
            if calls:
                out.append((nb.name, i, calls, cell.get("outputs", [])))
    return out


CELLS = listing_cells(sorted((ROOT / "notebooks").glob("*.ipynb")))


def test_the_chapters_have_kernel_listings():
    assert len(CELLS) >= 20 and {c[0] for c in CELLS} >= {"02_naive.ipynb", "07_tensor_cores.ipynb", "08_decode.ipynb"}


@pytest.mark.parametrize("name,index,calls,outputs", CELLS, ids=[f"{c[0]}:{c[1]}" for c in CELLS])
def test_saved_listing_matches_the_kernel_file(name, index, calls, outputs):
    shown = ["".join(o["data"]["text/plain"]) for o in outputs
             if o.get("output_type") == "display_data" and "text/plain" in o.get("data", {})]
    if not shown:
        pytest.skip(f"{name} cell {index} has no saved output (not executed)")
    want = [nbutil.source_text(*args)[0] for args in calls]
    assert len(shown) == len(want), f"{name} cell {index}: {len(shown)} listings saved, {len(want)} calls"
    for args, got, expect in zip(calls, shown, want):
        assert got == expect, (f"{name} cell {index}: show_source{tuple(args)} no longer shows what the chapter "
                               "saved: re-run the chapter on the GPU host (or use marker strings, not line numbers)")


def test_a_stale_listing_is_caught(tmp_path):
    """The check itself: a saved listing that differs from the file is reported."""
    nb = {"cells": [{"cell_type": "code", "source": ['show_source("mbarrier.cuh", 1, 3)'], "outputs": [
        {"output_type": "display_data", "data": {"text/plain": ["an old version"]}}]}]}
    p = tmp_path / "x.ipynb"
    p.write_text(json.dumps(nb))
    (name, index, calls, outputs), = listing_cells([p])
    assert calls == [["mbarrier.cuh", 1, 3]]
    with pytest.raises(AssertionError, match="no longer shows"):
        test_saved_listing_matches_the_kernel_file(name, index, calls, outputs)
