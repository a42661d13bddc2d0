"""Notebook hygiene, without running anything: the skeleton of CONTRIBUTING.md and committed cpu-profile outputs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from notebook_io import clean, series  # noqa: E402

NOTEBOOKS = series()
CONFIG = yaml.safe_load((REPO / "book" / "_config.yml").read_text(encoding="utf-8"))
COLAB = "https://colab.research.google.com/github/"
HEADING = re.compile(r"^(#{1,3})\s+(.+?)\s*$", re.MULTILINE)
EXERCISE = re.compile(r"^Exercise\s+(\d+)$")


def load(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def headings(notebook: nbformat.NotebookNode) -> list[tuple[int, str, int]]:
    """(level, text, cell index) of every markdown heading, in order."""
    return [
        (len(hashes), text, index)
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "markdown"
        for hashes, text in HEADING.findall(cell.source)
    ]


def colab_url(path: Path) -> str:
    """The Colab link of a notebook, from the one repository URL in book/_config.yml."""
    repository = CONFIG["repository"]
    slug = repository["url"].removeprefix("https://github.com/").strip("/")
    return f"{COLAB}{slug}/blob/{repository['branch']}/notebooks/{path.name}"


def tags(cell: nbformat.NotebookNode) -> list[str]:
    return cell.metadata.get("tags", [])


def test_the_series_is_there() -> None:
    assert NOTEBOOKS, "notebooks/ holds no NN_name.ipynb"
    numbers = [int(path.name[:2]) for path in NOTEBOOKS]
    assert numbers == list(range(len(numbers))), f"the series should be numbered 00, 01, ... without gaps: {numbers}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_title_cell_has_the_colab_badge(path: Path) -> None:
    first = load(path).cells[0]
    assert first.cell_type == "markdown"
    assert first.source.startswith(f"# {path.name[:2]} · "), "the first line should be '# NN · Title'"
    assert f"({colab_url(path)})" in first.source, f"the Colab badge should link to {colab_url(path)}"
    assert "You will learn" in first.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_colab_install_cell(path: Path) -> None:
    install = load(path).cells[1]
    assert install.cell_type == "code"
    assert "hide-output" in tags(install)
    assert install.source.startswith("# NBVAL_SKIP\n")
    assert 'if "google.colab" in sys.modules:' in install.source


def test_install_cells_are_identical() -> None:
    sources = {path.name: load(path).cells[1].source for path in NOTEBOOKS}
    assert len(set(sources.values())) <= 1, f"the Colab install cells differ: {sources}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_closing_sections_in_order(path: Path) -> None:
    level_two = [text for level, text, _ in headings(load(path)) if level == 2]
    closing = [text for text in level_two if text in ("Summary", "Exercises", "What's next")]
    assert closing == ["Summary", "Exercises", "What's next"]
    after = level_two[level_two.index("What's next") + 1 :]
    assert all(text.startswith("Appendix: ") for text in after), "only appendices may follow What's next"
    assert level_two[-3 - len(after) :] == closing + after, (
        "Summary, Exercises and What's next should close the notebook, before any appendix"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_each_exercise_has_a_solution_cell(path: Path) -> None:
    notebook = load(path)
    found = headings(notebook)
    start = next(index for level, text, index in found if level == 2 and text == "Exercises")
    end = next(index for level, text, index in found if level == 2 and text == "What's next")
    exercises = [(int(m.group(1)), index) for level, text, index in found if (m := EXERCISE.match(text)) and level == 3]
    assert 2 <= len(exercises) <= 4, f"2 to 4 exercises, found {len(exercises)}"
    assert [number for number, _ in exercises] == list(range(1, len(exercises) + 1))
    assert all(start <= index < end for _, index in exercises), "the exercises belong under '## Exercises'"
    solutions = [(index, cell) for index, cell in enumerate(notebook.cells) if "solution" in tags(cell)]
    assert len(solutions) == len(exercises), "one solution cell per exercise"
    for (number, heading_index), (index, cell) in zip(exercises, solutions, strict=True):
        assert index == heading_index + 1, f"the solution to exercise {number} should follow its prompt"
        assert cell.cell_type == "code"
        assert "hide-input" in tags(cell)
        assert cell.metadata.get("mystnb", {}).get("code_prompt_show") == "Show solution"
        assert cell.metadata.get("jupyter", {}).get("source_hidden") is True
        assert cell.source.startswith(f"# Solution to exercise {number}\n")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_outputs_are_clean(path: Path) -> None:
    code = [cell for cell in load(path).cells if cell.cell_type == "code"]
    numbers = list(range(1, len(code) + 1))
    assert [cell.execution_count for cell in code] == numbers, "execution counts should be renumbered 1, 2, 3..."
    for number, cell in zip(numbers, code, strict=True):
        assert all(output.get("execution_count", number) == number for output in cell.outputs)
    outputs = [output for cell in code for output in cell.outputs]
    errors = [f"{o.get('ename')}: {o.get('evalue')}" for o in outputs if o.output_type == "error"]
    assert not errors, f"committed error outputs: {errors}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_outputs_come_from_a_cpu_profile_run(path: Path) -> None:
    """The setup cell prints the settings table; its profile line says which profile made the outputs."""
    printed = "".join(
        output.get("text", "")
        for cell in load(path).cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream"
    )
    assert re.search(r"^profile\s+cpu \(", printed, re.MULTILINE), "commit outputs from a run of the cpu profile"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_colab_asks_for_a_t4(path: Path) -> None:
    metadata = load(path).metadata
    assert metadata.get("accelerator") == "GPU"
    assert metadata.get("colab", {}).get("gpuType") == "T4"


NOISE = {
    "an absolute path": re.compile(r"(?<![\w.~])/(?:work|root|home|tmp|Users|content|private|var)/"),
    "a path outside the repository (a reader of the book has no such folder)": re.compile(r"(?<![\w.])\.\./"),
    "tqdm's IProgress warning": re.compile(r"IProgress not found"),
    "a transformers LOAD REPORT": re.compile(r"LOAD REPORT"),
    "a FutureWarning": re.compile(r"FutureWarning"),
    "bitsandbytes' kernels line (import qlora_tutorial first)": re.compile(r"Failed to load CPU gemm_4bit_forward"),
    "an ANSI escape code": re.compile(r"\x1b\["),
    "an object repr instead of a table": re.compile(r"<pandas\.io\.formats\.style\.Styler at 0x"),
}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
PROGRESS_BAR = re.compile(r"\d+%\|[█▏▎▍▌▋▊▉ ]*\|")  # a bar printed as text (in Jupyter, ipywidgets draws it)


def output_texts(notebook: nbformat.NotebookNode) -> list[str]:
    """Every text a learner reads in the outputs: streams, plain text, Markdown, tracebacks."""
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append("".join(output.get("text", "")))
            data = output.get("data", {})
            texts += ["".join(data.get(kind, "")) for kind in ("text/plain", "text/markdown", "text/html")]
            texts += output.get("traceback", [])
    return texts


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_outputs_hold_nothing_a_learner_should_not_read(path: Path) -> None:
    notebook = load(path)
    texts = output_texts(notebook)
    found = {name for name, pattern in NOISE.items() for text in texts if pattern.search(text)}
    streams = ["".join(o.get("text", "")) for c in notebook.cells for o in c.get("outputs", []) if "text" in o]
    if any(PROGRESS_BAR.search(text) for text in streams):
        found.add("a progress bar dumped as text")
    if any(WIDGET_VIEW in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", [])):
        found.add("a widget (a progress bar frozen at its first frame: its state is not saved)")
    assert not found, f"{path.name}: committed outputs hold {', '.join(sorted(found))}; silence or fix it, then rerun"


def test_cleaning_drops_widget_outputs_and_keeps_the_rest() -> None:
    bar = nbformat.v4.new_output(
        "display_data", data={WIDGET_VIEW: {"model_id": "x"}, "text/plain": "Tokenizing:   0%|          | 0/8"}
    )
    printed = nbformat.v4.new_output("stream", name="stdout", text="tokenized 8 rows\n")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("tokenize()", outputs=[bar, printed])])
    cleaned = clean(notebook)
    assert cleaned.cells[0].outputs == [printed] and cleaned.cells[0].execution_count == 1
