"""Write the workshop's student copies of the notebooks: ``make student-copies``.

Each notebook of the series becomes ``workshop/student/NN_name.ipynb``: outputs
cleared, and every solution cell (tag ``solution``) replaced by an empty code
cell that says ``# Your solution to exercise N``; the exercise prompts and all
other cells stay. The Colab badge points at the student copy, so that a
participant who opens it in Colab gets the version without solutions.
``--check`` writes nothing and exits 1 when the committed copies are not the
ones this script would write (``tests/test_student_copies.py`` runs the same check).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat
import yaml
from notebook_io import ROOT, clean, series

STUDENT_DIR = ROOT / "workshop" / "student"
SOLUTION_TAG = "solution"
EXERCISE_HEADING = re.compile(r"^###\s+Exercise\s+(\d+)\b", re.MULTILINE)
BRANCH = yaml.safe_load((ROOT / "book" / "_config.yml").read_text(encoding="utf-8"))["repository"]["branch"]
NOTEBOOK_PATH = f"/blob/{BRANCH}/notebooks/"
STUDENT_PATH = f"/blob/{BRANCH}/workshop/student/"


def placeholder(exercise: int) -> str:
    """The source of the empty cell that replaces the solution to ``exercise``."""
    return f"# Your solution to exercise {exercise}\n"


def student_copy(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The student version of ``notebook`` (which is changed in place and returned).

    A solution cell takes the number of the ``### Exercise N`` heading above it;
    one without such a heading is a mistake in the notebook and raises.
    """
    notebook = clean(notebook)
    exercise: int | None = None
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "markdown":
            headings = EXERCISE_HEADING.findall(cell.source)
            exercise = int(headings[-1]) if headings else exercise
            cell.source = cell.source.replace(NOTEBOOK_PATH, STUDENT_PATH)
        elif SOLUTION_TAG in cell.metadata.get("tags", []):
            if exercise is None:
                raise ValueError(
                    f"Cell {index} is tagged {SOLUTION_TAG!r} but no '### Exercise N' heading comes before it. "
                    "Put each solution right after its exercise's markdown cell."
                )
            empty = nbformat.v4.new_code_cell(placeholder(exercise).rstrip("\n"))
            empty.id = cell.get("id", empty.id)  # keep the id, so the copy is the same on every run
            notebook.cells[index] = empty
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None  # never run in this copy
    return notebook


def render(path: Path) -> str:
    """The text of the student copy of the notebook at ``path``."""
    return nbformat.writes(student_copy(nbformat.read(path, as_version=4))) + "\n"


def expected_copies(notebooks: list[Path], student_dir: Path) -> dict[Path, str]:
    """Each student copy's path and the text it should have."""
    return {student_dir / path.name: render(path) for path in notebooks}


def stale_copies(notebooks: list[Path], student_dir: Path) -> list[str]:
    """What is out of date in ``student_dir``: copies missing, different, or left from a removed notebook."""
    expected = expected_copies(notebooks, student_dir)
    problems = [
        f"{path.name} is missing" if not path.is_file() else f"{path.name} is out of date"
        for path, text in expected.items()
        if not path.is_file() or path.read_text(encoding="utf-8") != text
    ]
    leftovers = sorted(set(student_dir.glob("*.ipynb")) - set(expected))
    return problems + [f"{path.name} has no notebook in notebooks/" for path in leftovers]


def write_copies(notebooks: list[Path], student_dir: Path) -> list[Path]:
    """Write every student copy, remove copies of notebooks that no longer exist, return the paths written."""
    student_dir.mkdir(parents=True, exist_ok=True)
    expected = expected_copies(notebooks, student_dir)
    for leftover in set(student_dir.glob("*.ipynb")) - set(expected):
        leftover.unlink()
    for path, text in expected.items():
        path.write_text(text, encoding="utf-8")
    return sorted(expected)


def main() -> int:
    """Write the copies, or with ``--check`` report the stale ones and exit 1."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the copies are not current")
    arguments = parser.parse_args()
    if arguments.check:
        problems = stale_copies(series(), STUDENT_DIR)
        for problem in problems:
            print(f"workshop/student/{problem}")
        if problems:
            print("Run `make student-copies` and commit workshop/student/.")
            return 1
        print(f"The {len(series())} student copies are current.")
        return 0
    for path in write_copies(series(), STUDENT_DIR):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
