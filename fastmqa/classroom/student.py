"""Generate the student edition of the chapters: solutions out, stubs in, everything else kept.

    python -m fastmqa.classroom student              # notebooks/*.ipynb -> students/
    python -m fastmqa.classroom student --check      # exit 1 if students/ is out of date (CI)

What changes, per chapter (nothing else does):
- a code cell tagged `solution` keeps its `# EXERCISE <label>` line, loses what lies between
  `### BEGIN SOLUTION` / `### END SOLUTION` (replaced by its stub), loses its outputs, and is
  tagged `exercise` instead of `solution`;
- markdown: ```{solution} directives are removed; everything between ```{solution-start} and
  ```{solution-end} is removed (markdown cells, and code cells not tagged `solution`);
  a markdown cell left empty is dropped;
- the notebook's metadata records `fastmqa.source` and `fastmqa.edition = "student"`.
"""
from __future__ import annotations

import copy
import filecmp
import re
import tempfile
from pathlib import Path

import nbformat

from .convention import (BEGIN_SOLUTION, EXERCISE_TAG, SOLUTION_TAG, ConventionError, exercise_cells,
                         exercise_label, stub_source, tags)

ROOT = Path(__file__).resolve().parents[2]
_DIRECTIVE = re.compile(r"^\{([A-Za-z0-9_-]+)\}")


def _parser():
    from markdown_it import MarkdownIt
    from mdit_py_plugins.colon_fence import colon_fence_plugin
    return MarkdownIt("commonmark").use(colon_fence_plugin)


def _directives(md, text):
    """(name, first_line, end_line) of every top-level MyST directive (``` or ::: fence)."""
    out = []
    for tok in md.parse(text):
        if tok.type in ("fence", "colon_fence") and tok.map and tok.level == 0:
            m = _DIRECTIVE.match(tok.info.strip())
            if m:
                out.append((m.group(1), tok.map[0], tok.map[1]))
    return out


def strip_solutions(nb, where: str = "notebook"):
    """Return the student edition of notebook `nb` (a new object; `nb` is left as it is)."""
    nb = copy.deepcopy(nb)
    exercise_cells(nb, where)  # raises ConventionError on a badly marked cell
    md = _parser()
    cells = []
    in_gate = None  # label of the open {solution-start}, or None
    for idx, cell in enumerate(nb.cells):
        w = f"{where}, cell {idx}"
        if cell.cell_type == "markdown":
            lines = cell.source.splitlines()
            keep = [in_gate is None] * len(lines)
            for name, a, b in _directives(md, cell.source):
                if name == "solution":
                    if in_gate is None:
                        keep[a:b] = [False] * (b - a)
                elif name == "solution-start":
                    if in_gate is not None:
                        raise ConventionError(f"{w}: solution-start inside an open solution-start")
                    in_gate = lines[a]
                    keep[a:] = [False] * (len(lines) - a)
                elif name == "solution-end":
                    if in_gate is None:
                        raise ConventionError(f"{w}: solution-end without a solution-start")
                    in_gate = None
                    keep[a:] = [True] * (len(lines) - a)
                    keep[a:b] = [False] * (b - a)
            text = "\n".join(_join_kept(lines, keep)).strip("\n")
            if not text.strip():
                continue
            cell.source = text
            cells.append(cell)
        elif cell.cell_type == "code":
            t = tags(cell)
            if SOLUTION_TAG in t:
                cell.source = stub_source(cell.source, exercise_label(cell), w)
                cell.metadata["tags"] = [EXERCISE_TAG if x == SOLUTION_TAG else x for x in t]
                cell.outputs, cell.execution_count = [], None
                cells.append(cell)
            elif in_gate is None:
                cells.append(cell)
            # any other code cell inside a gated solution is part of the solution: dropped
        else:
            if in_gate is None:
                cells.append(cell)
    if in_gate is not None:
        raise ConventionError(f"{where}: '{in_gate.strip()}' is never closed by a solution-end")
    nb.cells = cells
    _assert_no_leak(nb, where)
    return nb


def _join_kept(lines, keep):
    """The kept lines, with no doubled blank line where a removed block used to be."""
    out, removed = [], False
    for line, k in zip(lines, keep):
        if not k:
            removed = True
            continue
        if removed and not line.strip() and out and not out[-1].strip():
            continue
        removed = False
        out.append(line)
    return out


def _assert_no_leak(nb, where):
    md = _parser()
    for idx, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and BEGIN_SOLUTION in cell.source:
            raise ConventionError(f"{where}: student cell {idx} still holds '{BEGIN_SOLUTION}'")
        if cell.cell_type == "markdown":
            for name, _, _ in _directives(md, cell.source):
                if name.startswith("solution"):
                    raise ConventionError(f"{where}: student cell {idx} still holds a {{{name}}} directive")
        if cell.cell_type == "markdown" and re.search(r"^\s*(`{3,}|:{3,})\{solution", cell.source, re.M):
            raise ConventionError(f"{where}: student cell {idx} holds a nested {{solution}} directive; "
                                  "put solutions at the top level of a markdown cell")


def student_notebook(src: Path):
    src = Path(src)
    nb = nbformat.read(src, as_version=4)
    try:
        rel = src.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        rel = src.name
    out = strip_solutions(nb, where=rel)
    out.metadata.setdefault("fastmqa", {})
    out.metadata["fastmqa"].update({"edition": "student", "source": rel})
    return out


def sources(src_dir: Path) -> list[Path]:
    return sorted(p for p in Path(src_dir).glob("*.ipynb") if not p.name.startswith("."))


def generate(src_dir: Path = ROOT / "notebooks", out_dir: Path = ROOT / "students") -> list[Path]:
    """Write the student edition of every notebook in src_dir to out_dir; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sources(src_dir):
        dst = out_dir / src.name
        nbformat.write(student_notebook(src), dst)
        written.append(dst)
    for stale in sorted(set(out_dir.glob("*.ipynb")) - set(written)):
        stale.unlink()
    return written


def check(src_dir: Path = ROOT / "notebooks", out_dir: Path = ROOT / "students") -> list[str]:
    """What is out of date in out_dir (empty when the committed student set matches)."""
    out_dir = Path(out_dir)
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(src_dir, tmp)
        names = {p.name for p in fresh}
        for p in fresh:
            have = out_dir / p.name
            if not have.exists():
                problems.append(f"{have}: missing")
            elif not filecmp.cmp(p, have, shallow=False):
                problems.append(f"{have}: differs from its source notebooks/{p.name}")
        for p in sorted(out_dir.glob("*.ipynb")):
            if p.name not in names:
                problems.append(f"{p}: has no source notebook (stale)")
    return problems
