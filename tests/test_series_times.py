"""The series' times come from one file: notebooks/series_times.json (tools/run_series.py, tools/render_times.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from notebook_io import series  # noqa: E402
from render_times import (  # noqa: E402
    INSTRUCTOR,
    README,
    SLOTS,
    TIME_LINE,
    TIMES_FILE,
    WORKSHOP_MINUTES,
    Entry,
    load_times,
    merge,
    notebook_titles,
    render_cell,
    render_instructor,
    render_readme,
    save_times,
    slot_plan,
    time_line,
    times_table,
)


def entry(seconds: float, peak: float | None = 2048.0, bf16: bool = True, source: str = "test run") -> Entry:
    return {
        "seconds": seconds,
        "peak_memory_mib": peak,
        "load_average_before": 0.1,
        "load_average_after": 1.9,
        "profile": "cpu",
        "date": "2026-12-05",
        "commit": "abc123",
        "machine": {"cores": 2, "memory_gib": 23.4, "avx2": True, "avx512f": bf16, "avx512_bf16": bf16},
        "source": source,
    }


TITLES = {"00_a.ipynb": "00 · A", "01_b.ipynb": "01 · B", "02_c.ipynb": "02 · C"}


@pytest.mark.parametrize("path", series(), ids=lambda path: path.name)
def test_committed_time_line_is_rendered(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    lines = [line for cell in notebook.cells for line in TIME_LINE.findall(cell.source)]
    assert lines == [time_line(path.name, load_times().get(path.name))]


def test_committed_table_of_00_is_rendered() -> None:
    notebook = nbformat.read(series()[0], as_version=4)
    entries, titles = load_times(), notebook_titles()
    for cell in notebook.cells:
        assert render_cell(series()[0].name, cell.source, entries, titles) == cell.source
    assert sum("<!-- series-times:begin -->" in cell.source for cell in notebook.cells) == 1


def test_committed_readme_table_is_rendered() -> None:
    text = README.read_text()
    assert render_readme(text, load_times(), notebook_titles()) == text


def test_committed_slot_plan_is_rendered() -> None:
    text = INSTRUCTOR.read_text()
    assert render_instructor(text, load_times(), notebook_titles()) == text


def test_every_entry_names_a_notebook_of_the_series() -> None:
    assert set(load_times()) <= {path.name for path in series()}
    assert TIMES_FILE.is_file()


def test_slots_cover_the_series_once_in_three_hours() -> None:
    numbers = [number for slot in SLOTS for number in slot.notebooks]
    assert numbers == [path.name[:2] for path in series()]
    assert [slot.start for slot in SLOTS] == [sum(s.minutes for s in SLOTS[:i]) for i in range(len(SLOTS))]
    assert sum(slot.minutes for slot in SLOTS) == WORKSHOP_MINUTES


def test_merge_replaces_only_the_notebooks_run() -> None:
    old = {"00_a.ipynb": entry(10), "01_b.ipynb": entry(20)}
    merged = merge(old, {"01_b.ipynb": entry(25, bf16=False), "02_c.ipynb": entry(5)})
    assert list(merged) == ["00_a.ipynb", "01_b.ipynb", "02_c.ipynb"]
    assert merged["00_a.ipynb"] == old["00_a.ipynb"]
    assert merged["01_b.ipynb"]["seconds"] == 25 and not merged["01_b.ipynb"]["machine"]["avx512_bf16"]


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    entries = {"00_a.ipynb": entry(10, peak=None)}
    save_times(entries, tmp_path / "times.json")
    assert load_times(tmp_path / "times.json") == entries
    assert load_times(tmp_path / "missing.json") == {}


def test_time_line_states_time_machine_and_peak() -> None:
    assert time_line("01_b.ipynb", entry(2189)) == (
        "**Time:** 2,189 s (36.5 min) on a quiet 2-core CPU with `avx512_bf16` (`cpu` profile, measured by "
        "`tools/run_series.py`, peak memory 2.0 GiB; every notebook in 00's table)."
    )
    busy = {**entry(64, peak=None, bf16=False), "load_average_after": 3.0}
    assert time_line("00_a.ipynb", busy) == (
        "**Time:** 64 s on a 2-core CPU with `avx2` but not AVX-512 (`cpu` profile, measured by "
        "`tools/run_series.py`; every notebook in section 6)."
    )
    assert "not measured yet" in time_line("02_c.ipynb", None)


def test_table_totals_exactly_the_listed_rows_and_shows_each_run() -> None:
    entries = {"00_a.ipynb": entry(11, peak=None), "01_b.ipynb": entry(100, bf16=False, source="other run")}
    table = times_table(entries, TITLES, "notebooks/")
    assert "| [00 · A](notebooks/00_a.ipynb) | 11 s | not recorded | 0.1 / 1.9 | a |" in table
    assert "| [01 · B](notebooks/01_b.ipynb) | 100 s (1.7 min) | 2.0 GiB | 0.1 / 1.9 | b |" in table
    assert "| total of the 2 above | 111 s (1.9 min) | | | |" in table
    assert "Not measured by `tools/run_series.py` yet: 02 · C." in table
    assert "**b**: 2 logical CPUs (`avx2` yes, `avx512f` no, `avx512_bf16` no)" in table


def test_slot_plan_sums_slots_and_says_what_is_unmeasured(monkeypatch: pytest.MonkeyPatch) -> None:
    import render_times

    monkeypatch.setattr(render_times, "SLOTS", (render_times.Slot("one", 0, 10, ("00", "01", "02")),))
    plan = slot_plan({"00_a.ipynb": entry(300, peak=1024.0), "01_b.ipynb": entry(60)}, TITLES)
    assert "| one | 0:00 - 0:10 | 00, 01, 02 | 360 s (6.0 min) + 02 not measured | 2.0 GiB |" in plan
    assert "02 has no measured time yet" in plan
    assert "compute for 6.0 of its 10 minutes" in plan
    assert "On a CPU without it, `tools/run_series.py` has not measured" in plan
    mixed = slot_plan({"00_a.ipynb": entry(300), "01_b.ipynb": entry(60, bf16=False)}, TITLES)
    assert "On a CPU without it" not in mixed


def test_render_refuses_a_document_without_its_markers() -> None:
    with pytest.raises(ValueError, match="series-times"):
        render_readme("no table here", {}, TITLES)
