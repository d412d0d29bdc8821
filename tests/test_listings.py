"""Every code listing a chapter shows is what the source holds now.

A chapter shows code with cells of `show_source(...)` calls — a kernel file by name
(`show_source("file.cu", start, end)`) or a Python object (a numba prototype, a layer method) —
and keeps the output of its last run on the GPU host. Code edited after that run would leave the
chapter showing old code, or, with line numbers, the wrong lines. This test recomputes each listing
(no GPU needed: the prototypes import under numba's simulator) and compares it with the saved
output. A Python target is resolved through the notebook's own import statements."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from fastmqa import nbutil

ROOT = Path(__file__).resolve().parent.parent


def _dotted(node):
    """'a.b.c' for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id] + parts[::-1]) if isinstance(node, ast.Name) else None


def listing_cells(notebooks):
    """(notebook name, cell index, [call args], saved outputs, notebook imports) of every code cell
    made only of show_source calls whose target is a kernel file name (a string) or a dotted name
    (kept as ("name", "a.b")), with literal line numbers or markers."""
    out = []
    for nb in notebooks:
        cells = json.loads(nb.read_text())["cells"]
        imports = []
        for cell in cells:
            if cell["cell_type"] == "code":
                try:
                    imports += [ast.unparse(n) for n in ast.parse("".join(cell["source"])).body
                                if isinstance(n, (ast.Import, ast.ImportFrom))]
                except SyntaxError:
                    pass
        for i, cell in enumerate(cells):
            if cell["cell_type"] != "code":
                continue
            try:
                body = ast.parse("".join(cell["source"])).body
            except SyntaxError:
                continue
            calls = []
            for stmt in body:
                call = stmt.value if isinstance(stmt, ast.Expr) else None
                if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "show_source" and call.args):
                    calls = None
                    break
                first = call.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    target = first.value
                elif _dotted(first):
                    target = ("name", _dotted(first))
                else:
                    calls = None
                    break
                calls.append([target] + [ast.literal_eval(a) for a in call.args[1:]])
            if calls:
                out.append((nb.name, i, calls, cell.get("outputs", []), imports))
    return out


_NAMESPACES = {}


def resolve(target, imports):
    """A kernel file name as is; ("name", "a.b") looked up after running the notebook's imports
    (numba's simulator set up first, as the chapters do on a CPU)."""
    if isinstance(target, str):
        return target
    key = tuple(imports)
    if key not in _NAMESPACES:
        from fastmqa import sim
        sim.setup(quiet=True)
        ns = {}
        for stmt in imports:
            try:
                exec(stmt, ns)
            except Exception:  # an optional package the chapter guards (the listings do not need it)
                pass
        _NAMESPACES[key] = ns
    head, *rest = target[1].split(".")
    obj = _NAMESPACES[key][head]
    for r in rest:
        obj = getattr(obj, r)
    return obj


CELLS = listing_cells(sorted((ROOT / "notebooks").glob("*.ipynb")))


def test_the_chapters_have_kernel_listings():
    assert len(CELLS) >= 40 and {c[0] for c in CELLS} >= {"02_naive.ipynb", "07_tensor_cores.ipynb", "08_decode.ipynb"}
    assert any(not isinstance(args[0], str) for c in CELLS for args in c[2])  # Python targets too


@pytest.mark.parametrize("name,index,calls,outputs,imports", CELLS, ids=[f"{c[0]}:{c[1]}" for c in CELLS])
def test_saved_listing_matches_the_source(name, index, calls, outputs, imports):
    shown = ["".join(o["data"]["text/plain"]) for o in outputs
             if o.get("output_type") == "display_data" and "text/plain" in o.get("data", {})]
    if not shown:
        pytest.skip(f"{name} cell {index} has no saved output (not executed)")
    want = [nbutil.source_text(resolve(args[0], imports), *args[1:])[0] for args in calls]
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
    (name, index, calls, outputs, imports), = listing_cells([p])
    assert calls == [["mbarrier.cuh", 1, 3]]
    with pytest.raises(AssertionError, match="no longer shows"):
        test_saved_listing_matches_the_source(name, index, calls, outputs, imports)
