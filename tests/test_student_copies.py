"""The workshop's student copies (tools/make_student_copies.py): current, without solutions, and runnable."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from make_student_copies import (  # noqa: E402
    STUDENT_DIR,
    placeholder,
    render,
    stale_copies,
    student_copy,
    write_copies,
)
from notebook_io import series  # noqa: E402

NOTEBOOKS = series()


def exercise_notebook() -> nbformat.NotebookNode:
    """A small notebook in the series' shape: a badge, one output, two exercises with solutions."""
    badge = "https://colab.research.google.com/github/o/r/blob/main/notebooks/09_x.ipynb"
    solution_metadata = {"tags": ["solution", "hide-input"], "mystnb": {"code_prompt_show": "Show solution"}}
    cells = [
        nbformat.v4.new_markdown_cell(f"# 09 · X\n\n[![Open In Colab](badge.svg)]({badge})"),
        nbformat.v4.new_code_cell("print(1)", outputs=[nbformat.v4.new_output("stream", text="1\n")]),
        nbformat.v4.new_markdown_cell("## Exercises\n\n### Exercise 1\n\nPrint two."),
        nbformat.v4.new_code_cell("# Solution to exercise 1\nprint(2)", metadata=solution_metadata),
        nbformat.v4.new_markdown_cell("### Exercise 2\n\nPrint three."),
        nbformat.v4.new_code_cell("# Solution to exercise 2\nprint(3)", metadata=solution_metadata),
        nbformat.v4.new_markdown_cell("## What's next"),
    ]
    cells[1].execution_count = 4
    return nbformat.v4.new_notebook(cells=cells)


def test_solutions_become_numbered_empty_cells() -> None:
    copy = student_copy(exercise_notebook())
    sources = [cell.source for cell in copy.cells]
    assert "# Your solution to exercise 1" in sources
    assert "# Your solution to exercise 2" in sources
    assert not any("print(2)" in source or "print(3)" in source for source in sources)
    assert not any("solution" in cell.metadata.get("tags", []) for cell in copy.cells)
    assert "Print two." in sources[2] and "Print three." in sources[4], "the prompts stay"


def test_outputs_and_counts_are_cleared_and_the_badge_points_at_the_copy() -> None:
    copy = student_copy(exercise_notebook())
    code = [cell for cell in copy.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert "/blob/main/workshop/student/09_x.ipynb" in copy.cells[0].source


def test_the_copy_is_the_same_on_every_run(tmp_path: Path) -> None:
    path = tmp_path / "09_x.ipynb"
    nbformat.write(exercise_notebook(), path)
    assert render(path) == render(path)


def test_a_solution_without_an_exercise_heading_is_refused() -> None:
    notebook = exercise_notebook()
    del notebook.cells[2]
    with pytest.raises(ValueError, match="no '### Exercise N' heading"):
        student_copy(notebook)


def test_check_reports_missing_stale_and_leftover_copies(tmp_path: Path) -> None:
    source = tmp_path / "notebooks" / "09_x.ipynb"
    source.parent.mkdir()
    nbformat.write(exercise_notebook(), source)
    student = tmp_path / "student"
    assert stale_copies([source], student) == ["09_x.ipynb is missing"]
    write_copies([source], student)
    assert stale_copies([source], student) == []
    (student / "09_x.ipynb").write_text("{}", encoding="utf-8")
    (student / "08_old.ipynb").write_text("{}", encoding="utf-8")
    assert stale_copies([source], student) == [
        "09_x.ipynb is out of date",
        "08_old.ipynb has no notebook in notebooks/",
    ]
    write_copies([source], student)
    assert sorted(path.name for path in student.iterdir()) == ["09_x.ipynb"]


def test_committed_copies_are_current() -> None:
    """The copies in workshop/student are exactly what `make student-copies` writes from notebooks/ now."""
    assert NOTEBOOKS, "notebooks/ holds no NN_name.ipynb"
    assert stale_copies(NOTEBOOKS, STUDENT_DIR) == [], "run `make student-copies` and commit workshop/student/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_copy_has_no_solutions(path: Path) -> None:
    copy = nbformat.read(STUDENT_DIR / path.name, as_version=4)
    original = nbformat.read(path, as_version=4)
    solutions = [cell for cell in original.cells if "solution" in cell.metadata.get("tags", [])]
    assert not any("solution" in cell.metadata.get("tags", []) for cell in copy.cells)
    assert not any(cell.source.startswith("# Solution to exercise") for cell in copy.cells)
    placeholders = [cell.source + "\n" for cell in copy.cells if cell.source.startswith("# Your solution")]
    assert placeholders == [placeholder(number) for number in range(1, len(solutions) + 1)]
    assert len(copy.cells) == len(original.cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_a_copy_runs_the_code_that_nbval_runs(path: Path) -> None:
    """Every code cell of a copy, but the emptied solutions, is its notebook's cell as nbval runs it.

    So the full run of each notebook under nbval covers its student copy too,
    and no test needs to execute the copies again.
    """
    copy = nbformat.read(STUDENT_DIR / path.name, as_version=4)
    original = nbformat.read(path, as_version=4)
    for index, (ours, theirs) in enumerate(zip(copy.cells, original.cells, strict=True)):
        assert ours.cell_type == theirs.cell_type, f"cell {index}"
        if ours.cell_type == "code" and "solution" not in theirs.metadata.get("tags", []):
            assert ours.source == theirs.source, f"cell {index} of the copy differs from {path.name}"
