"""python -m fastmqa.classroom {student,grade} ...  (see student.py and grade.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .convention import ConventionError
from .student import ROOT


def student_main(argv) -> int:
    from . import student
    ap = argparse.ArgumentParser(prog="python -m fastmqa.classroom student",
                                 description="Write the student edition of notebooks/*.ipynb "
                                             "(solutions replaced by stubs).")
    ap.add_argument("--src", type=Path, default=ROOT / "notebooks", help="chapter notebooks (default notebooks/)")
    ap.add_argument("--out", type=Path, default=ROOT / "students", help="where to write (default students/)")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if the notebooks in --out are not what would be generated")
    a = ap.parse_args(argv)
    try:
        if a.check:
            problems = student.check(a.src, a.out)
            if problems:
                print("student notebooks are out of date:\n  " + "\n  ".join(problems)
                      + "\nrun: python -m fastmqa.classroom student", file=sys.stderr)
                return 1
            print(f"student notebooks in {a.out} are up to date ({len(student.sources(a.src))} chapters)")
            return 0
        for p in student.generate(a.src, a.out):
            print(f"wrote {p}")
        return 0
    except ConventionError as e:
        print(f"student: {e}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("student", "grade"):
        print(__doc__.strip() + "\n\n  student [--out students/] [--check]   generate the student notebooks\n"
              "  grade NOTEBOOK [--sim|--gpu] [--json F]  grade a student's notebook")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "student":
        return student_main(argv[1:])
    from .grade import main as grade_main
    return grade_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
