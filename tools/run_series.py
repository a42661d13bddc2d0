"""Run the whole series on the current profile: ``make run`` (or ``make outputs`` to refresh the committed outputs).

Each notebook runs top to bottom in a fresh kernel, in order. Executed copies go
to ``runs/series/`` unless ``--in-place`` is given, which rewrites the notebooks
themselves with their new, cleaned outputs (how the committed outputs are made).
"""

from __future__ import annotations

import argparse
import sys

from notebook_io import ROOT, execute, series

from qlora_tutorial.pipeline import format_summary
from qlora_tutorial.settings import load_settings
from qlora_tutorial.training import RESULTS_FILE, load_results

SERIES_OUTPUT = ROOT / "runs" / "series"


def main() -> int:
    """Execute the notebooks in order, print each one's time, then the trained adapter's summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--in-place", action="store_true", help="write outputs back into notebooks/")
    parser.add_argument("names", nargs="*", help="only these notebooks (e.g. 04_training.ipynb)")
    arguments = parser.parse_args()
    settings = load_settings()
    print(settings.table(), flush=True)
    chosen = [path for path in series() if not arguments.names or path.name in arguments.names]
    for path in chosen:
        destination = path if arguments.in_place else SERIES_OUTPUT / path.name
        print(f"running {path.name} ...", end=" ", flush=True)
        seconds = execute(path, destination)
        print(f"{seconds:.0f} s -> {destination.relative_to(ROOT)}", flush=True)
    adapter_dir = settings.run_dir("qlora")
    if (adapter_dir / RESULTS_FILE).is_file():
        print("\n" + format_summary(load_results(adapter_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
