"""Full fine-tuning vs LoRA vs QLoRA, and the reference recipe vs ours: ``make benchmark`` (not run by CI).

The same comparison as notebook 06 (``qlora_tutorial.comparison``), on the
profile's budget (``QLORA_PROFILE``), written to
``benchmarks/results/<profile>.json`` and ``benchmarks/results/<profile>.md``
so the README's results table is generated, not typed. Every number is a
measurement of this run; speed is reported as ratios from one run, never
checked against a fixed time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from qlora_tutorial.comparison import budget_for, compare_methods, compare_recipes, markdown_table, recipe_summary
from qlora_tutorial.settings import load_settings
from qlora_tutorial.training import library_versions, settings_record

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """The hardware the numbers come from, in words."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} GPU"
    return f"{os.cpu_count()}-core CPU ({platform.machine()}, {torch.get_num_threads()} torch threads)"


def markdown_report(record: dict[str, Any]) -> str:
    """The results file the README includes: a one-line provenance, the table, the recipe comparison."""
    budget = record["budget"]
    return "\n\n".join(
        [
            f"Measured by `make benchmark` on the `{record['profile']}` profile ({record['model']}, "
            f"{budget['max_steps']} steps of batch {budget['batch_size']} per method, "
            f"{budget['test_rows'] or 'all'} test rows) on a {record['machine']}, {record['date']}.",
            markdown_table(record["methods"]),
            recipe_summary(record["recipes"]),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run both comparisons on one profile and write its JSON and Markdown results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", help="smoke, cpu or gpu (default: $QLORA_PROFILE, else gpu/cpu)")
    parser.add_argument("--runs-dir", help="where the trained runs go (default: runs/<profile>/benchmark)")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where <profile>.json and .md go")
    arguments = parser.parse_args(argv)
    settings = load_settings(arguments.profile)
    budget = budget_for(settings)
    runs = Path(arguments.runs_dir) if arguments.runs_dir else settings.run_dir("benchmark")
    print(settings.table(), flush=True)
    methods = compare_methods(settings, runs / "methods", budget)
    recipes = compare_recipes(settings, runs / "recipes", budget)
    record = {
        "profile": settings.profile.name,
        "model": settings.model_name,
        "machine": machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "budget": {
            **asdict(budget),
            "methods": [method.label for method in budget.methods],
            "batch_size": settings.profile.batch_size,
        },
        "methods": methods,
        "recipes": recipes,
        "settings": settings_record(settings),
        "versions": library_versions(),
    }
    results = Path(arguments.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{settings.profile.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    report = markdown_report(record)
    (results / f"{settings.profile.name}.md").write_text(report + "\n")
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
