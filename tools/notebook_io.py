"""Reading, executing and cleaning the series' notebooks (used by run_series and the tests)."""

from __future__ import annotations

from pathlib import Path
from time import perf_counter

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
KEPT_CELL_METADATA = ("tags", "jupyter", "mystnb")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"  # an ipywidgets output, e.g. a tqdm bar


def series() -> list[Path]:
    """The notebooks of the series, in order (00_... to 09_...)."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def clean(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Renumber execution counts 1, 2, 3... in cell order, drop run metadata and widget outputs.

    A committed notebook then differs only where outputs do. The counts stay
    (as a clean top-to-bottom run would have them) because nbval treats a cell
    without one as never run: it fails such a cell when it has outputs and
    never compares its outputs, so ``# NBVAL_CHECK_OUTPUT`` would check nothing.
    Widget outputs are the progress bars tqdm draws in Jupyter (tokenizing,
    loading weights): their state is not saved, so GitHub and the book would
    show each frozen at 0%, which reads as a stalled run; a learner running the
    notebook still sees them move.
    """
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    for cell in notebook.cells:
        cell.metadata = {key: value for key, value in cell.metadata.items() if key in KEPT_CELL_METADATA}
        if cell.cell_type == "code":
            cell.outputs = [output for output in cell.outputs if WIDGET_VIEW not in output.get("data", {})]
    for number, cell in enumerate(code_cells, start=1):
        cell.execution_count = number
        for output in cell.outputs:
            if "execution_count" in output:
                output.execution_count = number
    notebook.metadata.pop("widgets", None)
    notebook.metadata.get("language_info", {}).pop("version", None)
    return notebook


def execute(path: Path, destination: Path, timeout: int = 3600) -> float:
    """Run ``path`` top to bottom in a fresh kernel (cwd: its folder), write the cleaned result, return seconds."""
    notebook = nbformat.read(path, as_version=4)
    started = perf_counter()
    resources = {"metadata": {"path": str(path.parent)}}
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources=resources).execute()
    seconds = perf_counter() - started
    destination.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(clean(notebook), destination)
    return seconds
