"""The classroom edition: student notebooks (solutions out) and the autograder.

Built and tested on tests/fixtures/classroom_fixture.ipynb; every chapter in notebooks/ that has
exercise cells is picked up automatically: its solutions must score full marks, its student
edition zero, and every exercise label must be registered.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from fastmqa.classroom import exercises as registry
from fastmqa.classroom import grade as grader
from fastmqa.classroom import student
from fastmqa.classroom.convention import ConventionError, exercise_cells, stub_source

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "classroom_fixture.ipynb"
CHAPTERS = [p for p in sorted((ROOT / "notebooks").glob("*.ipynb"))
            if exercise_cells(nbformat.read(p, as_version=4), str(p))]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _code(nb):
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def _text(nb):
    return "\n".join(c.source for c in nb.cells)


def _write(nb, path):
    nbformat.write(nb, path)
    return path


# -- the convention ------------------------------------------------------------------------

def test_stub_given_and_default():
    src = ("# EXERCISE ex-a\ndef f(x):\n    ### BEGIN STUB\n    # return x  # TODO\n    ### END STUB\n"
           "    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n\n"
           "def g(x):\n    ### BEGIN SOLUTION\n    return 3 * x\n    ### END SOLUTION\n")
    out = stub_source(src, "ex-a")
    assert out.splitlines()[0] == "# EXERCISE ex-a"
    assert "    return x  # TODO" in out and "2 * x" not in out and "3 * x" not in out
    assert '    raise NotImplementedError("exercise ex-a")' in out
    assert "###" not in out
    whole = stub_source("# EXERCISE ex-b\nx = 42\n", "ex-b")
    assert "42" not in whole and 'raise NotImplementedError("exercise ex-b")' in whole


@pytest.mark.parametrize("src, why", [
    ("# EXERCISE e\n### BEGIN SOLUTION\nx = 1\n", "not closed"),
    ("# EXERCISE e\n### END SOLUTION\n", "without"),
    ("# EXERCISE e\n### BEGIN STUB\n# x = 0\n### END STUB\ny = 1\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n",
     "followed at once"),
])
def test_stub_errors_are_readable(src, why):
    with pytest.raises(ConventionError, match=why):
        stub_source(src, "e")


def test_untagged_solution_cells_are_refused():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("# EXERCISE ex-x\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION")]
    with pytest.raises(ConventionError, match="not tagged 'solution'"):
        student.strip_solutions(nb)
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["solution"]})]
    with pytest.raises(ConventionError, match="# EXERCISE <label>"):
        student.strip_solutions(nb)
    nb.cells = [nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")]
    with pytest.raises(ConventionError, match="not a solution cell"):
        student.strip_solutions(nb)


def test_markdown_solution_forms_are_removed():
    md = nbformat.v4.new_markdown_cell
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        md("Keep me.\n\n```{exercise} E1\n:label: e1\nDo it.\n```\n\n````{solution} e1\n:class: dropdown\n"
           "```python\nsecret_one = 1\n```\n````\n\nKeep me too."),
        md(":::{solution} e1\nsecret_two\n:::\nafter colon"),
        md("```{solution-start} e1\n:class: dropdown\n```\nsecret_three"),
        md("secret_four"),
        nbformat.v4.new_code_cell("secret_five = 5"),
        md("```{solution-end}\n```\nafter gate"),
        md("```{solution} e1\nonly a solution\n```"),
    ]
    out = student.strip_solutions(nb)
    text = _text(out)
    for s in ("secret_one", "secret_two", "secret_three", "secret_four", "secret_five", "only a solution",
              "{solution"):
        assert s not in text
    for s in ("Keep me.", "Keep me too.", "```{exercise} E1", "after colon", "after gate"):
        assert s in text
    assert len(out.cells) == 3  # the gate's cells and the solution-only cell are gone
    assert "\n\n\n" not in out.cells[0].source


# -- the student edition of the fixture ----------------------------------------------------

@pytest.fixture(scope="module")
def fixture_student(tmp_path_factory):
    d = tmp_path_factory.mktemp("students")
    return _write(student.student_notebook(FIXTURE), d / FIXTURE.name)


def test_fixture_student_edition_hides_solutions(fixture_student):
    src = nbformat.read(FIXTURE, as_version=4)
    out = nbformat.read(fixture_student, as_version=4)
    assert "min(Skv, max(0, i + (Skv - Sq) + 1))" in _code(src)
    assert "min(Skv, max(0" not in _text(out)                      # the causal solution
    assert "softmax_rows_kernel" not in _text(out)                 # the softmax solution
    assert "300.0" not in _text(out)                               # a code cell inside the gate
    assert "{solution" not in _text(out) and "bottom-right rather than top-left" in _text(out)
    assert "j_end = Skv  # TODO" in _code(out)                     # the given stub, uncommented
    ex = exercise_cells(out)
    assert [e.label for e in ex] == ["ex-fixture-causal", "ex-fixture-softmax"]
    assert all(e.cell.outputs == [] and "exercise" in e.cell.metadata["tags"] for e in ex)
    # everything else is kept as it was (the setup and demo cells, with their outputs)
    keep = [c for c in src.cells if c.cell_type == "code" and "solution" not in c.metadata.get("tags", [])]
    assert keep[:3] == [c for c in out.cells if c.cell_type == "code"][:3]
    assert out.metadata["fastmqa"] == {"edition": "student", "source": "tests/fixtures/classroom_fixture.ipynb"}


def test_student_check_cli(tmp_path):
    src = tmp_path / "nb"
    src.mkdir()
    (src / FIXTURE.name).write_bytes(FIXTURE.read_bytes())
    out = tmp_path / "students"
    cli = [sys.executable, "-m", "fastmqa.classroom", "student", "--src", str(src), "--out", str(out)]
    r = subprocess.run(cli + ["--check"], env=ENV, capture_output=True, text=True)
    assert r.returncode == 1 and "missing" in r.stderr
    assert subprocess.run(cli, env=ENV, capture_output=True).returncode == 0
    assert subprocess.run(cli + ["--check"], env=ENV, capture_output=True).returncode == 0
    nb = nbformat.read(src / FIXTURE.name, as_version=4)
    nb.cells[0].source += "\n\nAn edit."
    nbformat.write(nb, src / FIXTURE.name)
    r = subprocess.run(cli + ["--check"], env=ENV, capture_output=True, text=True)
    assert r.returncode == 1 and "differs" in r.stderr


def test_committed_students_are_up_to_date():
    """What CI runs as `python -m fastmqa.classroom student --check`."""
    problems = student.check(ROOT / "notebooks", ROOT / "students")
    assert not problems, "run `python -m fastmqa.classroom student`:\n" + "\n".join(problems)


# -- grading the fixture -------------------------------------------------------------------

def test_fixture_solutions_score_full_marks():
    rep = grader.grade(FIXTURE, mode="sim")
    assert rep.score == rep.possible == 2.0, rep.format()
    assert rep.cell_errors == []
    assert 4 not in rep.executed  # the demo cell is neither setup nor an exercise: never run
    assert "simulator" in rep.mode


def test_fixture_student_stubs_score_zero(fixture_student):
    r = subprocess.run([sys.executable, "-m", "fastmqa.classroom", "grade", str(fixture_student), "--sim",
                        "--json", str(fixture_student.with_suffix(".json"))],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Total: 0.00 / 2 (0%)" in r.stdout
    assert "ex-fixture-softmax" in r.stdout and "not attempted" in r.stdout
    assert "0/4 cases passed" in r.stdout  # the given stub runs, and fails every causal shape


def _modified(tmp_path, old, new, drop_setup=False):
    nb = nbformat.read(FIXTURE, as_version=4)
    n = 0
    for c in nb.cells:
        if old in c.source:
            c.source, n = c.source.replace(old, new), n + 1
        if drop_setup and "setup" in c.metadata.get("tags", []):
            c.metadata["tags"].remove("setup")
    assert n == 1, f"{old!r} not found once in the fixture"
    return _write(nb, tmp_path / "wrong.ipynb")


def test_wrong_kernel_fails_readably(tmp_path):
    # the classic mistake: top-left aligned causal mask. Right only where Sq == Skv.
    # Also runs the fallback selection (no `setup` tags: every code cell up to the last exercise).
    p = _modified(tmp_path, "j_end = min(Skv, max(0, i + (Skv - Sq) + 1))", "j_end = min(Skv, i + 1)",
                  drop_setup=True)
    rep = grader.grade(p, mode="sim")
    r = rep.result("ex-fixture-causal")
    assert r.passed == 1 and len(r.cases) == 4, rep.format()
    text = rep.format()
    assert "1/4 cases passed" in text and "score 0.25 / 1" in text
    assert "FAIL B=2 H=3 Sq=5 Skv=7 D=8 causal=True: max err" in text and "> tol" in text
    assert "worst at (b, h, i, d)" in text and "hint: causal masking is bottom-right aligned" in text
    assert 4 in rep.executed and rep.cell_errors == []
    assert rep.result("ex-fixture-softmax").score == 1.0


def test_softmax_without_max_overflows_readably(tmp_path):
    p = _modified(tmp_path, "e = math.exp(x[r, c] - m)", "e = math.exp(x[r, c])")
    rep = grader.grade(p, mode="sim")
    r = rep.result("ex-fixture-softmax")
    fails = [c for c in r.cases if not c["ok"]]
    assert fails and all("x60" in c["name"] for c in fails), rep.format()
    assert "output has NaN or inf (does exp overflow?" in rep.format()


def test_broken_cell_is_reported(tmp_path):
    p = _modified(tmp_path, "def softmax_rows(x, threads=32):", "def softmax_rowz(x, threads=32):")
    rep = grader.grade(p, mode="sim")
    r = rep.result("ex-fixture-softmax")
    assert r.score == 0 and "must define `softmax_rows`" in r.message
    assert rep.result("ex-fixture-causal").score == 1.0


def test_endless_loop_is_stopped_and_reported(tmp_path):
    p = _modified(tmp_path, "def softmax_rows(x, threads=32):\n", "def softmax_rows(x, threads=32):\n    while True:\n        pass\n")
    rep = grader.grade(p, mode="sim", timeout=10)
    r = rep.result("ex-fixture-softmax")
    assert r.score == 0 and "stopped after the 10 s allowed per exercise" in r.message, rep.format()
    assert rep.result("ex-fixture-causal").score == 1.0


# -- the real chapters, as they appear -----------------------------------------------------

@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_exercises_are_registered(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    missing = [e.label for e in exercise_cells(nb, str(nb_path)) if registry.get(e.label) is None]
    assert not missing, (f"{nb_path.name}: add an Exercise(...) for {missing} to "
                         "fastmqa/classroom/exercises.py")


@pytest.mark.parametrize("nb_path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_solutions_full_marks_and_stubs_zero(nb_path, tmp_path):
    rep = grader.grade(nb_path, mode="sim")
    assert rep.possible > 0 and rep.score == rep.possible, rep.format()
    stu = _write(student.student_notebook(nb_path), tmp_path / nb_path.name)
    rep = grader.grade(stu, mode="sim")
    assert rep.score == 0, rep.format()


def test_registry_is_consistent():
    labels = [e.label for e in registry.EXERCISES]
    assert len(labels) == len(set(labels))
    for e in registry.EXERCISES:
        assert e.name.isidentifier() and e.points > 0 and callable(e.check)


def test_committed_student_notebooks_contain_no_solutions():
    """Grep the committed student edition for any trace of a solution."""
    import re as _re
    src_dir, stu_dir = ROOT / "notebooks", ROOT / "students"
    assert sorted(p.name for p in stu_dir.glob("*.ipynb")) == sorted(p.name for p in src_dir.glob("*.ipynb"))
    for stu in stu_dir.glob("*.ipynb"):
        text = stu.read_text()
        for marker in ("BEGIN SOLUTION", "END SOLUTION", "{solution", "solution-start", "solution-end"):
            assert marker not in text, f"{stu.name} contains {marker!r}"
        # every substantial line inside a solution region of the source is absent from the student file
        src = nbformat.read(src_dir / stu.name, as_version=4)
        stu_src = "\n".join(c.source for c in nbformat.read(stu, as_version=4).cells)
        pattern = r"### BEGIN SOLUTION\n(.*?)### END SOLUTION"
        outside = "\n".join(_re.sub(pattern, "", c.source, flags=_re.S) for c in src.cells)
        for cell in src.cells:
            for region in _re.findall(pattern, cell.source, _re.S):
                for line in region.splitlines():
                    # lines that also stand outside every solution region (stubs, shared code) may stay
                    if len(line.strip()) > 25 and line.strip() not in outside:
                        assert line.strip() not in stu_src, f"{stu.name} leaks solution line {line.strip()!r}"


def test_stage_ring_check_catches_each_protocol_error():
    """ex-07-ring's grader runs the ring: a producer that never waits refills a stage in use,
    parities counted per tile deadlock or read early, a wait for the wrong phase deadlocks;
    the kernel's protocol, and CUTLASS's (the producer waits for parity 1 on fresh barriers), pass."""
    from fastmqa.classroom.exercises import check_stage_ring

    def kernel(u, n):
        f = u // n
        return u % n, f & 1, None if u < n else (f & 1) ^ 1

    def cutlass(u, n):
        f = u // n
        return u % n, f & 1, (f & 1) ^ 1

    def no_wait(u, n):
        return u % n, (u // n) & 1, None

    def per_tile(u, n):
        return u % n, u & 1, None if u < n else ((u // n) & 1) ^ 1

    def wrong_phase(u, n):
        return u % n, (u // n) & 1, None if u < n else (u // n) & 1

    for fn in (kernel, cutlass):
        assert all(r.ok for r in check_stage_ring(fn)), fn.__name__
    details = {fn.__name__: [r.detail for r in check_stage_ring(fn) if not r.ok]
               for fn in (no_wait, per_tile, wrong_phase)}
    assert any("refilled stage" in d for d in details["no_wait"])
    assert details["per_tile"] and all("deadlock" in d or "passed the full barrier" in d for d in details["per_tile"])
    assert details["wrong_phase"]
    bad = check_stage_ring(lambda u, n: (u, 0, None))  # a stage out of range: a readable error, no crash
    assert not bad[0].ok and "stage in 0.." in bad[0].detail


def test_item_walk_check_counts_divisions_and_catches_a_missing_carry():
    """ex-07-walk's grader: the definition (two divisions an item) is correct but refused for its
    divisions, a walk without the carry is refused for its items, divmod counts twice, and the
    kernel's walk (divide once before the loop, carry once) passes every grid."""
    from fastmqa.classroom.exercises import check_item_walk

    def dividing(w0, dw, B, nmb, P):
        return [(w % B, nmb - 1 - w // B, (nmb - 1 - w // B) * P) for w in range(w0, B * nmb, dw)]

    def walk(w0, dw, B, nmb, P, carry=True):
        b, j, q, r, out = w0 % B, w0 // B, dw // B, dw % B, []
        for _ in range(w0, B * nmb, dw):
            out.append((b, nmb - 1 - j, (nmb - 1 - j) * P))
            b, j = b + r, j + q
            if carry and b >= B:
                b, j = b - B, j + 1
        return out

    assert all(r.ok for r in check_item_walk(walk))
    slow = [r for r in check_item_walk(dividing) if not r.ok]
    assert slow and all("divisions or remainders by B" in r.detail for r in slow)
    wrong = [r for r in check_item_walk(lambda *a: walk(*a, carry=False)) if not r.ok]
    assert wrong and all("want" in r.detail for r in wrong)
    dm = [r for r in check_item_walk(lambda w0, dw, B, nmb, P: [(divmod(w, B)[1], nmb - 1 - divmod(w, B)[0],
                                                                 (nmb - 1 - divmod(w, B)[0]) * P)
                                                                for w in range(w0, B * nmb, dw)]) if not r.ok]
    assert dm
