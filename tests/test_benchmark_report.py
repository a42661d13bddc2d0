"""``benchmarks/compare_methods.py``'s JSON and Markdown, on made-up rows (no training).

The README's results block is this report verbatim (``test_readme``), so what
it says about the machine, the load and the recipe comparison is checked here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
from test_recipes import recipe_runs
from test_verdicts import rows

from qlora_tutorial.recipes import compare_recipe_runs
from qlora_tutorial.uncertainty import spread

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_methods.py"


def benchmark() -> ModuleType:
    """The benchmark script as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("compare_methods", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(recipes: dict | None, recipes_load: list[float] | None) -> dict:
    return {
        "profile": "cpu",
        "model": "packaged:all-MiniLM-L6-v2",
        "machine": "2-core CPU (test)",
        "methods_source": "notebook 06 (its saved comparison)",
        "load_average": [0.4, 1.9],
        "date": "2026-11-30",
        "budget": {"max_steps": None, "test_rows": None, "batch_size": 16},
        "rows": rows(qlora_wrong=10, lora_wrong=12),
        "recipes": recipes,
        "recipes_load_average": recipes_load,
    }


def test_the_machine_line_names_the_cpu_flag() -> None:
    assert "avx512_bf16" in benchmark().machine()


def test_spreads_and_numpy_numbers_become_json() -> None:
    ready = benchmark().json_ready({"step": spread([1.0, 2.0, 3.0]), "pairs": (np.float64(0.5), np.int64(3))})
    assert json.loads(json.dumps(ready)) == {
        "step": {"median": 2.0, "q1": 1.5, "q3": 2.5, "count": 3},
        "pairs": [0.5, 3],
    }


def test_the_report_says_what_ran_and_under_which_load() -> None:
    report = benchmark().markdown_report(record(None, None))
    assert "the profile's epochs, 40 steps of batch 16 per method" in report and "all test rows" in report
    assert "load average 0.4 before the methods were trained and 1.9 after" in report
    assert "recipe comparison was not run" in report

    recipes = {**compare_recipe_runs(*recipe_runs()), "reference_recipe": "pad", "our_recipe": "dynamic"}
    report = benchmark().markdown_report(record(recipes, [1.2, 2.3]))
    assert "never left chance in 100 steps" in report
    assert "(1-minute load average 1.2 before, 2.3 after.)" in report
