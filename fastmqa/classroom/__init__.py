"""The classroom edition: student notebooks and an autograder for the chapters' exercises.

    python -m fastmqa.classroom student [--out students/] [--check]
    python -m fastmqa.classroom grade students/02_naive.ipynb

The convention a chapter follows (DEVNOTES.md, "Exercises"), in short:

- the exercise text is a ```{exercise} directive with a :label:, in a markdown cell;
- its worked solution sits in a gated solution: a markdown cell ```{solution-start} <label>
  (with :class: dropdown), the solution code cell(s), a markdown cell ```{solution-end};
  a non-gated ```{solution} <label> directive (prose only) is also fine;
- a code cell holding a solution is tagged `solution` and its first line is
  `# EXERCISE <label>`; the part students write lies between `### BEGIN SOLUTION` and
  `### END SOLUTION` (nbgrader's markers); a commented `### BEGIN STUB` / `### END STUB`
  block just before it is what students get instead (default: `raise NotImplementedError`);
- cells the exercises need (imports, `sim.setup()`, helpers) are tagged `setup`;
- `fastmqa.classroom.exercises.EXERCISES` says, per label, which name the cell defines
  and how to check it.
"""
from .convention import ConventionError, exercise_cells  # noqa: F401
