"""The series' times, from one file: render every place that states them (``python tools/render_times.py``).

``tools/run_series.py`` measures each notebook it runs (wall time in a fresh
kernel, the sampled peak memory of the kernel and its child processes, the
load average around it, the machine) and merges the entries into
:data:`TIMES_FILE`; with ``--in-place`` it then calls :func:`render_all`. What
is rendered from that file, and nowhere typed by hand:

* the first line of each notebook's ``**Time:**`` paragraph (the lines after
  it are the notebook's own explanation and stay as they are);
* the table in notebook 00, section 6, and its copy in ``README.md``, between
  :data:`TABLE_BEGIN` and :data:`TABLE_END`;
* the slot plan of a 3-hour workshop in ``book/instructor.md``, between
  :data:`PLAN_BEGIN` and :data:`PLAN_END`.

Run this file to render them again without running any notebook, e.g. after
editing :data:`SLOTS`. ``tests/test_series_times.py`` fails when a committed
copy differs from what this renders, so a hand edit cannot drift.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import NamedTuple, TypedDict

import nbformat
from notebook_io import NOTEBOOKS, ROOT, series

TIMES_FILE = NOTEBOOKS / "series_times.json"
README = ROOT / "README.md"
INSTRUCTOR = ROOT / "book" / "instructor.md"
TABLE_BEGIN, TABLE_END = "<!-- series-times:begin -->", "<!-- series-times:end -->"
PLAN_BEGIN, PLAN_END = "<!-- slot-plan:begin -->", "<!-- slot-plan:end -->"
TIME_LINE = re.compile(r"^\*\*Time:\*\*.*$", re.MULTILINE)
ABOUT = (
    "Each notebook's wall time in a fresh kernel, the peak memory of the kernel and its child processes (sum of "
    "resident sets, sampled every 0.5 s), the 1-minute load average before and after, and the machine; written by "
    "tools/run_series.py --in-place, one entry per notebook, rendered by tools/render_times.py."
)
QUIET_LOAD_PER_CORE = 1.25
"""A notebook alone can keep every core busy (load average = cores); a run above this much per core had company."""
MINUTES_FROM_S = 100
"""Times from this many seconds on also state minutes."""
WORKSHOP_MINUTES = 180


class Machine(TypedDict):
    """The machine an entry was measured on: logical CPUs, memory and the CPU flags that decide the kernels used."""

    cores: int
    memory_gib: float | None
    avx2: bool
    avx512f: bool
    avx512_bf16: bool


class Entry(TypedDict):
    """One notebook's measurement (``None`` where a seeded entry did not record it)."""

    seconds: float
    peak_memory_mib: float | None
    load_average_before: float | None
    load_average_after: float | None
    profile: str
    date: str | None
    commit: str | None
    machine: Machine
    source: str


class Slot(NamedTuple):
    """A slot of the workshop: its label, start and length in minutes, and the notebooks (two-digit numbers) in it."""

    label: str
    start: int
    minutes: int
    notebooks: tuple[str, ...]


SLOTS = (  # minutes; 00-03 compute for seconds and are read, the later slots are sized to their measured compute
    Slot("1 · setup, quantization, adapters", 0, 35, ("00", "01", "02", "03")),
    Slot("2 · training and testing", 35, 40, ("04", "05")),
    Slot("break", 75, 10, ()),
    Slot("3 · comparing and scaling", 85, 45, ("06", "07")),
    Slot("4 · decoders and 7B", 130, 50, ("08", "09")),
)


def load_times(path: Path = TIMES_FILE) -> dict[str, Entry]:
    """The entries of ``path`` by notebook file name (none when the file does not exist yet)."""
    if not path.is_file():
        return {}
    return json.loads(path.read_text())["notebooks"]


def merge(old: dict[str, Entry], new: dict[str, Entry]) -> dict[str, Entry]:
    """``old`` with the notebooks of ``new`` replaced, the rest kept: a partial run updates only what it ran."""
    merged = {**old, **new}
    return {name: merged[name] for name in sorted(merged)}


def save_times(entries: dict[str, Entry], path: Path = TIMES_FILE) -> None:
    """Write ``entries`` to ``path`` with :data:`ABOUT`, keys sorted, so a rerun changes only measured values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"about": ABOUT, "notebooks": entries}, indent=2, sort_keys=True) + "\n")


def format_seconds(seconds: float) -> str:
    """``64 s``, or ``2,189 s (36.5 min)`` from :data:`MINUTES_FROM_S` on."""
    text = f"{seconds:,.0f} s"
    return f"{text} ({seconds / 60:.1f} min)" if seconds >= MINUTES_FROM_S else text


def format_memory(mib: float | None) -> str:
    """A peak in GiB with one decimal, or ``not recorded``."""
    return "not recorded" if mib is None else f"{mib / 1024:.1f} GiB"


def format_load(entry: Entry) -> str:
    """The 1-minute load average before and after the notebook, or ``not recorded``."""
    before, after = entry["load_average_before"], entry["load_average_after"]
    return "not recorded" if before is None or after is None else f"{before:.1f} / {after:.1f}"


def cpu_kind(machine: Machine) -> str:
    """The CPU's vector extensions in words: ``avx512_bf16`` decides bitsandbytes' CPU path (notebook 02)."""
    if machine["avx512_bf16"]:
        return "`avx512_bf16`"
    if machine["avx512f"]:
        return "`avx512f` but not `avx512_bf16`"
    return "`avx2` but not AVX-512" if machine["avx2"] else "neither `avx2` nor AVX-512"


def is_quiet(entry: Entry) -> bool:
    """Whether the load average stayed within :data:`QUIET_LOAD_PER_CORE` per core (False when not recorded)."""
    loads = (entry["load_average_before"], entry["load_average_after"])
    limit = QUIET_LOAD_PER_CORE * entry["machine"]["cores"]
    return all(load is not None and load <= limit for load in loads)


def machine_phrase(entry: Entry) -> str:
    """``a quiet 2-core CPU with `avx512_bf16```: "quiet" only where the load average shows it."""
    quiet = "quiet " if is_quiet(entry) else ""
    return f"a {quiet}{entry['machine']['cores']}-core CPU with {cpu_kind(entry['machine'])}"


def time_line(name: str, entry: Entry | None) -> str:
    """The generated first line of notebook ``name``'s ``**Time:**`` paragraph (00 points at its own section 6)."""
    where = "section 6" if name.startswith("00_") else "00's table"
    if entry is None:
        return f"**Time:** not measured yet by `tools/run_series.py` (every measured notebook in {where})."
    peak = "" if entry["peak_memory_mib"] is None else f", peak memory {format_memory(entry['peak_memory_mib'])}"
    return (
        f"**Time:** {format_seconds(entry['seconds'])} on {machine_phrase(entry)} (`{entry['profile']}` profile, "
        f"measured by `tools/run_series.py`{peak}; every notebook in {where})."
    )


def notebook_titles() -> dict[str, str]:
    """Each notebook's title (``00 · Overview and setup``), from the heading of its first cell."""
    return {
        path.name: nbformat.read(path, as_version=4).cells[0].source.splitlines()[0].removeprefix("# ")
        for path in series()
    }


def run_key(entry: Entry) -> str:
    """What makes two entries one run: machine, profile, date, commit and source."""
    fields = ("machine", "profile", "date", "commit", "source")
    return json.dumps({field: entry[field] for field in fields}, sort_keys=True)


def run_letters(entries: dict[str, Entry]) -> dict[str, str]:
    """A letter per distinct run, ``a`` first, in notebook order, so mixed sources show in the table."""
    letters: dict[str, str] = {}
    for name in sorted(entries):
        letters.setdefault(run_key(entries[name]), "abcdefghijklmnopqrstuvwxyz"[len(letters)])
    return letters


def describe_run(entry: Entry) -> str:
    """One run's facts in words, for the legend under the table."""
    machine = entry["machine"]
    flags = ", ".join(f"`{flag}` {'yes' if machine[flag] else 'no'}" for flag in ("avx2", "avx512f", "avx512_bf16"))
    memory = "memory not recorded" if machine["memory_gib"] is None else f"{machine['memory_gib']:.1f} GiB"
    when = f"on {entry['date']}" if entry["date"] else "date not recorded"
    commit = f"commit `{entry['commit']}`" if entry["commit"] else "commit not recorded"
    return (
        f"{machine['cores']} logical CPUs ({flags}), {memory}; `{entry['profile']}` profile; {when}, {commit}; "
        f"{entry['source']}."
    )


def first_of_run(entries: dict[str, Entry], key: str) -> str:
    """The first notebook whose entry belongs to run ``key``."""
    return next(name for name, entry in entries.items() if run_key(entry) == key)


def times_table(entries: dict[str, Entry], titles: dict[str, str], link_prefix: str) -> str:
    """Notebook 00's table (and README's copy): one row per measured notebook, the total of exactly those rows."""
    letters = run_letters(entries)
    rows = [
        "| notebook | time | peak memory, kernel and its child processes | 1-minute load before / after | run |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, entry in entries.items():
        link = f"[{titles.get(name, name)}]({link_prefix}{name})"
        cells = (format_seconds(entry["seconds"]), format_memory(entry["peak_memory_mib"]), format_load(entry))
        rows.append(f"| {link} | {' | '.join(cells)} | {letters[run_key(entry)]} |")
    total = sum(entry["seconds"] for entry in entries.values())
    rows.append(f"| total of the {len(entries)} above | {format_seconds(total)} | | | |")
    legend = [f"- **{letter}**: {describe_run(entries[first_of_run(entries, key)])}" for key, letter in letters.items()]
    lines = [*rows, "", "Runs:", "", *legend]
    missing = [titles[name] for name in titles if name not in entries]
    if missing:
        lines += ["", f"Not measured by `tools/run_series.py` yet: {'; '.join(missing)}."]
    return "\n".join(lines)


def clock(minutes: int) -> str:
    """Minutes from the workshop's start as ``h:mm``."""
    return f"{minutes // 60}:{minutes % 60:02d}"


def slot_plan(entries: dict[str, Entry], titles: dict[str, str]) -> str:
    """The 3-hour plan: per slot its notebooks, their summed compute time and largest peak, then what to watch."""
    by_number = {name[:2]: name for name in titles}
    rows = [
        "| slot | from - to | notebooks | compute, measured | peak memory, largest |",
        "| --- | --- | --- | --- | --- |",
    ]
    notes = []
    for slot in SLOTS:
        names = [by_number[number] for number in slot.notebooks]
        measured = [entries[name] for name in names if name in entries]
        compute = sum(entry["seconds"] for entry in measured)
        peaks = [entry["peak_memory_mib"] for entry in measured if entry["peak_memory_mib"] is not None]
        unmeasured = [name[:2] for name in names if name not in entries]
        compute_text = format_seconds(compute) if names else ""
        if unmeasured:
            compute_text += f" + {', '.join(unmeasured)} not measured"
            notes.append(f"Slot {slot.label}: {', '.join(unmeasured)} has no measured time yet.")
        if compute > slot.minutes * 60 / 2:  # more than half the slot: little time left to teach
            notes.append(
                f"Slot {slot.label}: its notebooks compute for {compute / 60:.1f} of its {slot.minutes} minutes; "
                "start the longest as the slot opens, or run it on the `smoke` profile and read the committed outputs."
            )
        peak_text = (format_memory(max(peaks)) if peaks else "not recorded") if names else ""
        rows.append(
            f"| {slot.label} | {clock(slot.start)} - {clock(slot.start + slot.minutes)} | "
            f"{', '.join(slot.notebooks)} | {compute_text} | {peak_text} |"
        )
    profiles = ", ".join(f"`{profile}`" for profile in sorted({entry["profile"] for entry in entries.values()}))
    notes.append(
        f"Compute is the sum of the slot's times in `notebooks/series_times.json` ({profiles} profile, the machines "
        "of notebook 00's table); peak memory is the largest peak of the kernel and its child processes."
    )
    if all(entry["machine"]["avx512_bf16"] for entry in entries.values()):
        notes.append(
            "Every time here was measured on a CPU with `avx512_bf16`. On a CPU without it, `tools/run_series.py` "
            "has not measured these notebooks: run `make run` on one of the room's laptops before the workshop."
        )
    return "\n".join([*rows, "", *(f"- {note}" for note in notes)])


def replace_block(text: str, begin: str, end: str, body: str) -> str:
    """``text`` with what lies between the ``begin`` and ``end`` markers replaced by ``body``."""
    pattern = re.compile(f"{re.escape(begin)}\n(?:.*?\n)?{re.escape(end)}", re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"expected one {begin} ... {end} block")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text)


def replace_time_line(text: str, line: str) -> str:
    """``text`` with its one ``**Time:**`` line replaced by ``line`` (unchanged where it has none)."""
    if len(TIME_LINE.findall(text)) > 1:
        raise ValueError("more than one **Time:** line in one cell")
    return TIME_LINE.sub(lambda _: line, text)


def render_cell(name: str, source: str, entries: dict[str, Entry], titles: dict[str, str]) -> str:
    """A notebook cell's source as rendered: its Time line, and in 00 the table between the markers."""
    source = replace_time_line(source, time_line(name, entries.get(name)))
    if TABLE_BEGIN in source:
        source = replace_block(source, TABLE_BEGIN, TABLE_END, times_table(entries, titles, ""))
    return source


def render_readme(text: str, entries: dict[str, Entry], titles: dict[str, str]) -> str:
    """README.md with its copy of 00's table rendered (links from the repository root)."""
    return replace_block(text, TABLE_BEGIN, TABLE_END, times_table(entries, titles, "notebooks/"))


def render_instructor(text: str, entries: dict[str, Entry], titles: dict[str, str]) -> str:
    """book/instructor.md with its slot plan rendered."""
    return replace_block(text, PLAN_BEGIN, PLAN_END, slot_plan(entries, titles))


def render_notebook(path: Path, entries: dict[str, Entry], titles: dict[str, str]) -> bool:
    """Render ``path``'s markdown cells in one quick read-modify-write; True when something changed."""
    notebook = nbformat.read(path, as_version=4)
    changed = False
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            rendered = render_cell(path.name, cell.source, entries, titles)
            changed |= rendered != cell.source
            cell.source = rendered
    if changed:
        nbformat.write(notebook, path)
    return changed


def render_all(entries: dict[str, Entry]) -> list[Path]:
    """Render every notebook, README.md and book/instructor.md from ``entries``; return the files that changed."""
    titles = notebook_titles()
    changed = [path for path in series() if render_notebook(path, entries, titles)]
    for path, render in ((README, render_readme), (INSTRUCTOR, render_instructor)):
        text = path.read_text()
        rendered = render(text, entries, titles)
        if rendered != text:
            path.write_text(rendered)
            changed.append(path)
    return changed


def main() -> int:
    """Render everything from :data:`TIMES_FILE` and name the files that changed."""
    for path in render_all(load_times()):
        print(f"rendered {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
