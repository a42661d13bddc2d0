"""Run the whole series on the current profile: ``make run`` (or ``make outputs`` to refresh the committed outputs).

Each notebook runs top to bottom in a fresh kernel, in order. Executed copies go
to ``runs/series/`` unless ``--in-place`` is given, which rewrites the notebooks
themselves with their new, cleaned outputs (how the committed outputs are made).

Each notebook's wall time, the peak memory of the kernel and its child
processes and the 1-minute load average before and after are recorded with
the machine's facts and merged, per notebook, into ``runs/series/series_times.json``,
or with ``--in-place`` into the committed ``notebooks/series_times.json``, from
which ``tools/render_times.py`` then renders every place that states the times.
The peak is *sampled*: the sum of the resident sets of every process under
this one (the kernel and what it starts) every 0.5 s, so a peak shorter than
that can be missed, and pages shared between processes count once per process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from datetime import date
from pathlib import Path

import psutil
from notebook_io import ROOT, execute, series
from render_times import TIMES_FILE, Entry, Machine, load_times, merge, render_all, save_times

from qlora_tutorial.cpu_packing import CPU_FLAG, cpu_flags
from qlora_tutorial.pipeline import format_summary
from qlora_tutorial.settings import load_settings
from qlora_tutorial.training import RESULTS_FILE, load_results

SERIES_OUTPUT = ROOT / "runs" / "series"
SAMPLE_SECONDS = 0.5
MIB = 1024**2


class TreePeak:
    """The largest sampled sum of resident memory of this process's descendants while the ``with`` block runs.

    The kernel that nbclient starts is a child of this process, and every
    process the kernel launches (``accelerate launch`` workers, fresh training
    processes) is under it, so the descendants are exactly the notebook's
    processes. This process itself is left out.
    """

    def __init__(self, interval_s: float = SAMPLE_SECONDS) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def tree_bytes() -> int:
        """The summed resident set of this process's descendants now (ones that exit while read are skipped)."""
        total = 0
        for child in psutil.Process().children(recursive=True):
            try:
                total += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _run(self) -> None:
        """Sample until stopped."""
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, self.tree_bytes())

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def machine_facts() -> Machine:
    """Logical CPUs, memory, and whether the CPU lists ``avx2``, ``avx512f`` and ``avx512_bf16``."""
    flags = cpu_flags()
    return {
        "cores": os.cpu_count() or 1,
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": CPU_FLAG in flags,
    }


def git_commit() -> str | None:
    """The checked-out commit, ``-dirty`` when the tree has changes (None outside a git checkout)."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    return described.stdout.strip() if described.returncode == 0 else None


def run_notebook(path: Path, destination: Path, profile: str, machine: Machine, commit: str | None) -> Entry:
    """Execute ``path`` into ``destination`` and return its measured entry."""
    before = os.getloadavg()[0]
    with TreePeak() as peak:
        seconds = execute(path, destination)
    return {
        "seconds": round(seconds, 1),
        "peak_memory_mib": round(peak.peak_bytes / MIB, 1),
        "load_average_before": round(before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "profile": profile,
        "date": date.today().isoformat(),
        "commit": commit,
        "machine": machine,
        "source": "measured by tools/run_series.py",
    }


def main() -> int:
    """Execute the notebooks in order, record each one's time and memory, then print the trained adapter's summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--in-place", action="store_true", help="write outputs back into notebooks/")
    parser.add_argument("names", nargs="*", help="only these notebooks (e.g. 04_training.ipynb)")
    arguments = parser.parse_args()
    settings = load_settings()
    print(settings.table(), flush=True)
    machine, commit = machine_facts(), git_commit()
    times_file = TIMES_FILE if arguments.in_place else SERIES_OUTPUT / TIMES_FILE.name
    chosen = [path for path in series() if not arguments.names or path.name in arguments.names]
    for path in chosen:
        destination = path if arguments.in_place else SERIES_OUTPUT / path.name
        print(f"running {path.name} ...", end=" ", flush=True)
        entry = run_notebook(path, destination, settings.profile.name, machine, commit)
        save_times(merge(load_times(times_file), {path.name: entry}), times_file)
        print(
            f"{entry['seconds']:.0f} s, peak {entry['peak_memory_mib']:,.0f} MiB -> {destination.relative_to(ROOT)}",
            flush=True,
        )
    print(f"times: {times_file.relative_to(ROOT)}")
    if arguments.in_place:
        for changed in render_all(load_times(times_file)):
            print(f"rendered {changed.relative_to(ROOT)}")
    adapter_dir = settings.run_dir("qlora")
    if (adapter_dir / RESULTS_FILE).is_file():
        print("\n" + format_summary(load_results(adapter_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
