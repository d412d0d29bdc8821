"""How exercises and solutions are marked in a chapter notebook, and how to find them.

A solution code cell:

    # %% tags=["solution"]
    # EXERCISE ex-02-causal
    @cuda.jit
    def my_kernel(q, k, v, o, scale):
        row = cuda.grid(1)
        ### BEGIN STUB
        # j_end = k.shape[1]   # TODO: the causal limit
        ### END STUB
        ### BEGIN SOLUTION
        j_end = min(k.shape[1], max(0, i + k.shape[1] - q.shape[2] + 1))
        ### END SOLUTION
        ...

The student edition keeps the first line and everything outside the markers; a SOLUTION
region becomes the STUB block just before it (uncommented), or, without one,
`raise NotImplementedError("exercise <label>")` at the region's indentation. A solution
cell with no markers at all is replaced whole (after its first line).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SOLUTION_TAG = "solution"      # source notebooks: a cell holding a solution
EXERCISE_TAG = "exercise"      # student notebooks: the same cell, stubbed
SETUP_TAG = "setup"            # cells the exercises depend on (the grader runs these)
BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_STUB, END_STUB = "### BEGIN STUB", "### END STUB"
_EXERCISE_LINE = re.compile(r"^#\s*EXERCISE\s+(\S+)\s*$")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")


class ConventionError(ValueError):
    """A notebook breaks the exercise convention; the message names the cell and the fix."""


def stub_line(label: str) -> str:
    return f'raise NotImplementedError("exercise {label}")'


def tags(cell) -> list:
    return list(cell.get("metadata", {}).get("tags", []))


def exercise_label(cell) -> str | None:
    """The label of a code cell whose first non-blank line is `# EXERCISE <label>`, else None."""
    if cell.get("cell_type") != "code":
        return None
    for line in cell.source.splitlines():
        if line.strip():
            m = _EXERCISE_LINE.match(line.strip())
            return m.group(1) if m else None
    return None


@dataclass
class ExerciseCell:
    index: int
    label: str
    cell: object


def exercise_cells(nb, where: str = "notebook") -> list[ExerciseCell]:
    """Every code cell carrying `# EXERCISE <label>`, in order; checks the tag/marker pairing."""
    found = []
    for idx, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        label = exercise_label(cell)
        t = tags(cell)
        is_sol = SOLUTION_TAG in t or EXERCISE_TAG in t
        if label is None and SOLUTION_TAG in t:
            raise ConventionError(f"{where}, cell {idx}: tagged '{SOLUTION_TAG}' but its first line is not "
                                  "'# EXERCISE <label>' (add that line, with the exercise's :label:)")
        if label is not None and not is_sol:
            raise ConventionError(f"{where}, cell {idx}: starts with '# EXERCISE {label}' but is not tagged "
                                  f"'{SOLUTION_TAG}' (add the tag, or the solution would reach students)")
        if label is None:
            if BEGIN_SOLUTION in cell.source:
                raise ConventionError(f"{where}, cell {idx}: has '{BEGIN_SOLUTION}' but is not a solution "
                                      f"cell (tag it '{SOLUTION_TAG}' and start it with '# EXERCISE <label>')")
            continue
        if not _LABEL.match(label):
            raise ConventionError(f"{where}, cell {idx}: exercise label {label!r} is not a plain label")
        found.append(ExerciseCell(idx, label, cell))
    return found


def _uncomment(line: str, indent: str) -> str:
    body = line[len(indent):] if line.startswith(indent) else line.lstrip()
    if body.startswith("# "):
        return indent + body[2:]
    if body.rstrip() == "#":
        return ""
    if body.startswith("#"):
        return indent + body[1:]
    return line


def stub_source(source: str, label: str, where: str = "cell") -> str:
    """The student's version of a solution cell's source (see the module docstring)."""
    lines = source.splitlines()
    # keep everything up to and including the '# EXERCISE' line
    head = 0
    while head < len(lines) and not lines[head].strip():
        head += 1
    out = lines[:head + 1]
    body = lines[head + 1:]
    if not any(l.strip() == BEGIN_SOLUTION for l in body):
        if any(l.strip() in (END_SOLUTION, BEGIN_STUB, END_STUB) for l in body):
            raise ConventionError(f"{where}: stub/solution markers without '{BEGIN_SOLUTION}'")
        return "\n".join(out + ["# YOUR CODE HERE", stub_line(label)])
    stub = None        # lines of a pending STUB block
    state = "code"     # code | stub | solution
    indent = ""
    for n, line in enumerate(body, start=head + 2):
        s = line.strip()
        if state == "code":
            if s == BEGIN_STUB:
                if stub is not None:
                    raise ConventionError(f"{where}, line {n}: two STUB blocks before one SOLUTION region")
                state, stub, indent = "stub", [], line[:len(line) - len(line.lstrip())]
            elif s == BEGIN_SOLUTION:
                ind = line[:len(line) - len(line.lstrip())]
                out.extend(stub if stub is not None else [ind + "# YOUR CODE HERE", ind + stub_line(label)])
                stub, state = None, "solution"
            elif s in (END_SOLUTION, END_STUB):
                raise ConventionError(f"{where}, line {n}: '{s}' without its BEGIN")
            else:
                if stub is not None:
                    raise ConventionError(f"{where}, line {n}: a STUB block must be followed at once by "
                                          f"'{BEGIN_SOLUTION}'")
                out.append(line)
        elif state == "stub":
            if s == END_STUB:
                state = "code"
            elif s.startswith("###"):
                raise ConventionError(f"{where}, line {n}: '{s}' inside a STUB block")
            else:
                stub.append(_uncomment(line, indent))
        else:  # solution
            if s == END_SOLUTION:
                state = "code"
            elif s in (BEGIN_SOLUTION, BEGIN_STUB, END_STUB):
                raise ConventionError(f"{where}, line {n}: '{s}' inside a SOLUTION region")
    if state != "code":
        raise ConventionError(f"{where}: a {state.upper()} region is not closed "
                              f"('{END_SOLUTION if state == 'solution' else END_STUB}' missing)")
    if stub is not None:
        raise ConventionError(f"{where}: a STUB block at the end with no SOLUTION region after it")
    return "\n".join(out)


def is_stub(cells_source: str, label: str) -> bool:
    """True while the exercise cell still holds the generated `raise NotImplementedError` stub."""
    return stub_line(label) in cells_source
