"""Grade a student's notebook: run their exercise cells (and the setup cells), then the checks.

    python -m fastmqa.classroom grade students/02_naive.ipynb [--sim | --gpu] [--json out.json]

Only the student's file is read: the cells run are those tagged `setup` and the exercise cells
(`# EXERCISE <label>`), in notebook order (a notebook with no `setup` tag runs every code cell
up to its last exercise instead). They run in a fresh Jupyter kernel of this Python, in the
notebook's folder, with FASTMQA_GRADING=1; then one added cell runs, per exercise, the check
registered in `fastmqa.classroom.exercises` on the callable the cell defined, and writes the
results to a JSON file this process reads. On the CPU the notebook's `sim.setup()` puts numba
in the CUDA simulator; on a GPU machine the checks run on the GPU with more and larger shapes.
An exercise whose cell still holds the generated stub is "not attempted" and is not run; a
notebook with nothing attempted is not executed at all.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from . import exercises as registry
from .convention import SETUP_TAG, ConventionError, exercise_cells, is_stub, tags

ROOT = Path(__file__).resolve().parents[2]
MAX_FAILURES_SHOWN = 4


@dataclass
class ExerciseResult:
    label: str
    title: str
    points: float
    status: str                  # graded | not attempted | cell error | missing | unregistered
    cases: list = field(default_factory=list)     # CaseResult dicts
    message: str = ""
    hint: str = ""

    @property
    def passed(self) -> int:
        return sum(1 for c in self.cases if c["ok"])

    @property
    def score(self) -> float:
        if self.status not in ("graded", "cell error") or not self.cases:
            return 0.0
        return self.points * self.passed / len(self.cases)


@dataclass
class Report:
    notebook: str
    chapter: str
    mode: str = "not run"
    exercises: list = field(default_factory=list)
    cell_errors: list = field(default_factory=list)   # (cell index, 'Name: message') of non-exercise cells
    executed: list = field(default_factory=list)      # cell indices run

    @property
    def score(self) -> float:
        return sum(e.score for e in self.exercises)

    @property
    def possible(self) -> float:
        return sum(e.points for e in self.exercises if e.status != "unregistered")

    def result(self, label) -> ExerciseResult:
        return next(e for e in self.exercises if e.label == label)

    def to_json(self) -> dict:
        d = {"notebook": self.notebook, "chapter": self.chapter, "mode": self.mode,
             "score": self.score, "possible": self.possible, "cell_errors": self.cell_errors,
             "exercises": []}
        for e in self.exercises:
            x = asdict(e)
            x["score"] = e.score
            d["exercises"].append(x)
        return d

    def format(self) -> str:
        lines = [f"Grading {self.notebook} (chapter {self.chapter}; {self.mode})"]
        for idx, err in self.cell_errors:
            lines.append(f"  ! setup cell {idx} failed: {err}")
        for e in self.exercises:
            head = f"  {e.label}: {e.title}"
            if e.status == "unregistered":
                lines.append(f"{head}\n      ungraded: {e.message}")
                continue
            if e.status in ("not attempted", "missing"):
                lines.append(f"{head}\n      {e.status}: {e.message}   score 0 / {e.points:g}")
                continue
            if not e.cases:
                lines.append(f"{head}\n      {e.status}: {e.message}   score 0 / {e.points:g}")
                continue
            lines.append(f"{head}\n      {e.passed}/{len(e.cases)} cases passed   score "
                         f"{e.score:.2f} / {e.points:g}")
            if e.message:
                lines.append(f"      {e.message}")
            failed = [c for c in e.cases if not c["ok"]]
            for c in failed[:MAX_FAILURES_SHOWN]:
                lines.append(f"      FAIL {c['name']}: {c['detail']}")
            if len(failed) > MAX_FAILURES_SHOWN:
                lines.append(f"      ... and {len(failed) - MAX_FAILURES_SHOWN} more failing cases")
            note = _diagnose(e.cases)
            if note:
                lines.append(f"      note: {note}")
            if failed and e.hint:
                lines.append(f"      hint: {e.hint}")
        pct = 100.0 * self.score / self.possible if self.possible else 0.0
        lines.append(f"Total: {self.score:.2f} / {self.possible:g} ({pct:.0f}%)")
        return "\n".join(lines)


def _diagnose(cases) -> str | None:
    """A pattern across the failing cases that says more than each case alone."""
    failed = [c for c in cases if not c["ok"]]
    if not failed:
        return None
    notes = []
    if all("causal=True" in c["name"] for c in failed) and any(
            c["ok"] and "causal=False" in c["name"] for c in cases):
        notes.append("every non-causal shape passes and only causal ones fail: the mask is wrong "
                     "(bottom-right aligned: query i sees key j iff j <= i + Skv - Sq)")
    if all(" Sq=" in c["name"] for c in cases):
        same = [c for c in cases if _sq_eq_skv(c["name"])]
        if same and all(c["ok"] for c in same) and all(not _sq_eq_skv(c["name"]) for c in failed):
            notes.append("only shapes with Sq != Skv fail (a top-left aligned mask, j <= i, "
                         "fails exactly these)")
    return "; ".join(notes) or None


def _sq_eq_skv(name) -> bool:
    f = dict(kv.split("=") for kv in name.split() if "=" in kv)
    return f.get("Sq") == f.get("Skv")


def chapter_of(nb, path: Path) -> str:
    src = nb.metadata.get("fastmqa", {}).get("source")
    return Path(src).stem if src else Path(path).stem


def select_cells(nb, ex_cells) -> list[int]:
    """Indices of the code cells the grader runs: `setup`-tagged + exercise cells, in order."""
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "skip-execution" not in tags(c)]
    ex = {e.index for e in ex_cells}
    if any(SETUP_TAG in tags(nb.cells[i]) for i in code):
        return [i for i in code if i in ex or SETUP_TAG in tags(nb.cells[i])]
    last = max(ex) if ex else -1
    return [i for i in code if i <= last]


def _grader_cell(labels, out_path) -> str:
    return ("from fastmqa.classroom import grade as _fastmqa_grade\n"
            f"_fastmqa_grade._grade_in_kernel({labels!r}, globals(), {str(out_path)!r})")


def _grade_in_kernel(labels, ns, out_path):
    """Runs inside the student's kernel: each label's check on the callable the cell defined."""
    import torch

    from .. import sim
    simulated = sim.simulated()
    device = "cpu" if simulated or not torch.cuda.is_available() else "cuda"
    ctx = registry.Context(device=device, simulated=simulated)
    mode = ("numba CUDA simulator on the CPU" if simulated else
            f"GPU: {torch.cuda.get_device_name()}" if device == "cuda" else "CPU")
    out = {"mode": mode, "results": {}}
    Path(out_path).write_text(json.dumps(out))
    for label in labels:  # written after each exercise: a later one that hangs loses only itself
        ex = registry.get(label)
        fn = ns.get(ex.name)
        if not callable(fn):
            out["results"][label] = {"defined": False, "cases": []}
        else:
            cases = ex.check(fn, ctx)
            out["results"][label] = {"defined": True, "cases": [asdict(c) for c in cases]}
        Path(out_path).write_text(json.dumps(out))


def _kernel_manager():
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager  # nbclient's own: timeouts need the async client
    km = AsyncKernelManager(kernel_name="python3")
    # this very Python, whatever kernelspecs the machine has installed
    km._kernel_spec = KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                                       "--IPKernelApp.log_level=ERROR"],
                                 language="python", display_name="fastmqa grader")
    return km


def _error_text(cell) -> str | None:
    for o in cell.get("outputs", []):
        if o.get("output_type") == "error":
            ev = str(o.get("evalue", "")).strip().splitlines()
            return f"{o.get('ename')}: {ev[0] if ev else ''}"
    return None


def grade(path, mode: str = "auto", timeout: int = 900) -> Report:
    """Grade the notebook at `path`; mode 'auto' (GPU if present), 'sim' or 'gpu'."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    ex_cells = exercise_cells(nb, str(path))
    chapter = chapter_of(nb, path)
    report = Report(notebook=str(path), chapter=chapter)
    by_label: dict[str, list] = {}
    for e in ex_cells:
        by_label.setdefault(e.label, []).append(e)
    labels = list(by_label)
    for e in registry.for_chapter(chapter):
        if e.label not in by_label:
            labels.append(e.label)

    to_run = []
    for label in labels:
        ex = registry.get(label)
        cells = by_label.get(label, [])
        if ex is None:
            report.exercises.append(ExerciseResult(label, "(not in the registry)", 0.0, "unregistered",
                                                   message="no check registered for this label in "
                                                           "fastmqa/classroom/exercises.py"))
            continue
        r = ExerciseResult(label, ex.title, ex.points, "graded", hint=ex.hint)
        if not cells:
            r.status, r.message = "missing", "no cell starting with '# EXERCISE " + label + "' in this notebook"
        elif any(is_stub(c.cell.source, label) for c in cells):
            r.status, r.message = "not attempted", "the cell still raises NotImplementedError (the stub)"
        else:
            to_run.append(label)
        report.exercises.append(r)
    if not to_run:
        return report

    run_idx = select_cells(nb, ex_cells)
    exe = copy.deepcopy(nb)
    exe.cells = [exe.cells[i] for i in run_idx]
    for c in exe.cells:
        c.outputs, c.execution_count = [], None
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "results.json"
        exe.cells.append(nbformat.v4.new_code_cell(_grader_cell(to_run, out_json)))
        env = dict(os.environ, FASTMQA_GRADING="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        if mode == "sim":
            env["FASTMQA_SIM"] = "1"
        elif mode == "gpu":
            env["FASTMQA_SIM"] = "0"
        from nbclient import NotebookClient
        grader_cell = exe.cells[-1]
        client = NotebookClient(exe, km=_kernel_manager(), allow_errors=True, interrupt_on_timeout=True,
                                timeout_func=lambda c: timeout * (len(to_run) if c is grader_cell else 1),
                                resources={"metadata": {"path": str(path.resolve().parent)}})
        died = None
        try:
            client.execute(env=env)
        except Exception as e:  # DeadKernelError: a segfault, os._exit(), out of memory ...
            died = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        report.executed = run_idx
        errors = {run_idx[k]: _error_text(c) for k, c in enumerate(exe.cells[:-1])}
        grader_err = died or _error_text(exe.cells[-1])
        results = json.loads(out_json.read_text()) if out_json.exists() else None
    ex_idx = {e.index: e.label for e in ex_cells}
    cell_err_by_label = {}
    for idx, err in errors.items():
        if err is None:
            continue
        if idx in ex_idx:
            cell_err_by_label.setdefault(ex_idx[idx], err)
        else:
            report.cell_errors.append((idx, err))
    if results is None:  # the kernel died before the checks began
        results = {"mode": "the kernel stopped", "results": {}}
        for label in to_run:
            r = report.result(label)
            r.status = "cell error"
            r.message = f"the checks never ran: {grader_err or 'the kernel stopped'}" + (
                f"; cell errors: {cell_err_by_label[label]}" if label in cell_err_by_label else "")
        to_run = []
    report.mode = results["mode"]
    for label in to_run:
        r = report.result(label)
        res = results["results"].get(label)
        if res is None:
            r.status = "cell error"
            why = "stopped after" if (grader_err or "").startswith("KeyboardInterrupt") else "did not finish in"
            r.message = (f"its check {why} the {timeout} s allowed per exercise: an endless loop, or far "
                         f"too slow for these shapes?" + (f" ({grader_err})" if why != "stopped after" else ""))
            continue
        ex = registry.get(label)
        r.cases = res["cases"]
        err = cell_err_by_label.get(label)
        if err and err.startswith("NotImplementedError"):
            r.status, r.message, r.cases = "not attempted", f"the cell raised {err}", []
        elif not res["defined"]:
            r.status = "cell error" if err else "graded"
            r.message = (f"the exercise cell raised {err}; " if err else "") + \
                        f"it must define `{ex.name}`, and no such callable exists after it ran"
        elif err:
            r.status, r.message = "cell error", f"the exercise cell raised {err} (graded what it defined)"
        elif r.cases and all(c.get("not_attempted") for c in r.cases):
            r.status, r.message, r.cases = "not attempted", "calling it raises NotImplementedError", []
    return report


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m fastmqa.classroom grade",
                                 description="Grade the exercises of a student notebook.")
    ap.add_argument("notebook", type=Path)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--sim", action="store_const", const="sim", dest="mode",
                   help="numba's CUDA simulator on the CPU even if a GPU is present")
    g.add_argument("--gpu", action="store_const", const="gpu", dest="mode", help="require the GPU")
    ap.add_argument("--json", type=Path, help="also write the report as JSON here")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
    a = ap.parse_args(argv)
    if not a.notebook.exists():
        print(f"grade: no such notebook: {a.notebook}", file=sys.stderr)
        return 2
    try:
        report = grade(a.notebook, mode=a.mode or "auto", timeout=a.timeout)
    except ConventionError as e:
        print(f"grade: {e}", file=sys.stderr)
        return 2
    print(report.format())
    if a.json:
        a.json.write_text(json.dumps(report.to_json(), indent=1))
    return 0
