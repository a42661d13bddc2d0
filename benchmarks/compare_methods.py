"""Full fine-tuning vs LoRA vs QLoRA vs all-linear QLoRA, and the reference recipe vs ours: ``make benchmark``.

Not run by CI. The same comparison as notebook 06 (``qlora_tutorial.comparison``:
every method trained in its own process; ``verdicts``: speed judged by paired tests), on the
profile's budget (``QLORA_PROFILE``): where notebook 06 already measured it on
this budget (``runs/<profile>/comparison/comparison.json``), those very rows
are reported, so the README and the notebook state one run; then the recipe
comparison, which only this script trains. Written to
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
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qlora_tutorial.comparison import budget_for, compare_methods, load_comparison, row_to_json
from qlora_tutorial.comparison_tables import markdown_table, verdict_table
from qlora_tutorial.cpu_packing import CPU_FLAG, cpu_lists_avx512_bf16
from qlora_tutorial.recipes import compare_recipes, recipe_summary
from qlora_tutorial.settings import load_settings
from qlora_tutorial.training import library_versions, settings_record
from qlora_tutorial.verdicts import verdicts

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the architecture where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def machine() -> str:
    """The hardware the numbers come from, in words, with the CPU flag that changes bitsandbytes' CPU path."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} GPU"
    flag = "with" if cpu_lists_avx512_bf16() else "without"
    return (
        f"{os.cpu_count()}-core CPU ({cpu_model()}, {flag} {CPU_FLAG}, {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads)"
    )


def json_ready(value: Any) -> Any:
    """The recipe results as JSON: spreads as dicts, numpy scalars as numbers."""
    if is_dataclass(value):
        return asdict(value)
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def markdown_report(record: dict[str, Any]) -> str:
    """The results file the README includes: a one-line provenance, the table, the recipe comparison."""
    budget = record["budget"]
    trained = record["rows"][0]["train_steps"]
    steps = f"{trained} steps" if budget["max_steps"] else f"the profile's epochs, {trained} steps"
    load = record["load_average"]
    load_text = (
        f"1-minute load average {load[0]:.1f} before the methods were trained and {load[1]:.1f} after they were timed"
        if load
        else "load average not recorded"
    )
    if record["recipes"]:
        before, after = record["recipes_load_average"]
        recipes = f"{recipe_summary(record['recipes'])} (1-minute load average {before:.1f} before, {after:.1f} after.)"
    else:
        recipes = "The recipe comparison was not run this time (`make benchmark` with `--methods-only`)."
    return "\n\n".join(
        [
            f"Measured on the `{record['profile']}` profile ({record['model']}, {steps} of batch "
            f"{budget['batch_size']} per method, {budget['test_rows'] or 'all'} test rows) on a {record['machine']}, "
            f"{record['date']}, by {record['methods_source']}; {load_text}.",
            markdown_table(record["rows"]),
            verdict_table(record["rows"]),
            recipes,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run both comparisons on one profile and write its JSON and Markdown results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", help="smoke, cpu or gpu (default: $QLORA_PROFILE, else gpu/cpu)")
    parser.add_argument(
        "--runs-dir", help="where the trained runs go (default: runs/<profile>/comparison, shared with notebook 06)"
    )
    parser.add_argument("--results-dir", default=str(RESULTS), help="where <profile>.json and .md go")
    parser.add_argument("--methods-only", action="store_true", help="leave out the recipe comparison (two more runs)")
    arguments = parser.parse_args(argv)
    settings = load_settings(arguments.profile)
    budget = budget_for(settings)
    runs = Path(arguments.runs_dir) if arguments.runs_dir else settings.run_dir("comparison")
    print(settings.table(), flush=True)
    measured = load_comparison(runs, settings, budget)
    source = "notebook 06 (its saved comparison)" if measured else "`make benchmark`"
    if measured is None:
        compare_methods(settings, runs, budget)
        measured = load_comparison(runs, settings, budget)
    rows = measured["rows"]
    recipes, recipes_load = None, None
    if not arguments.methods_only:
        load_before = os.getloadavg()[0]
        recipes = compare_recipes(settings, runs / "recipes", budget)
        recipes_load = [load_before, os.getloadavg()[0]]
    record = {
        "profile": settings.profile.name,
        "model": settings.model_name,
        "machine": machine(),
        "cpu_flags": {CPU_FLAG: cpu_lists_avx512_bf16()},
        "methods_source": source,
        "load_average": measured["load_average"],
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "budget": {
            **asdict(budget),
            "methods": [method.label for method in budget.methods],
            "batch_size": settings.profile.batch_size,
        },
        "rows": [row_to_json(row) for row in rows],
        "verdicts": verdicts(rows),
        "recipes": json_ready(recipes) if recipes else None,
        "recipes_load_average": recipes_load,
        "settings": settings_record(settings),
        "versions": library_versions(),
    }
    results = Path(arguments.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{settings.profile.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    report = markdown_report({**record, "rows": rows, "recipes": recipes})
    (results / f"{settings.profile.name}.md").write_text(report + "\n")
    print("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
