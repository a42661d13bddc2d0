"""Notebook 06's comparison as Markdown tables: one row per method, one per verdict.

Taught in notebook 06 (sections 3 and 5); ``make benchmark`` writes the same
tables into ``benchmarks/results/<profile>.md``, which the README quotes
verbatim, so the numbers there are generated, never typed. Only the formatting
lives here: the rows come from ``comparison``, the verdicts from ``verdicts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qlora_tutorial.uncertainty import Spread
from qlora_tutorial.verdicts import verdicts


def verdict_table(rows: Sequence[dict[str, Any]]) -> str:
    """The verdicts as a Markdown table (notebook 06, the README and the book quote it word for word)."""
    lines = ["| question | measured | verdict (by the stated rule) |", "| --- | --- | --- |"]
    lines += [f"| {v['question']} | {v['measured']} | {v['verdict']} |" for v in verdicts(rows)]
    return "\n".join(lines)


def cell(row: dict[str, Any], key: str) -> str:
    """One table cell; a value a row lacks (the inference-only row) shows as a dash."""
    value = row.get(key)
    if value is None:
        return "-"
    formats = {
        "weight_mib": "{:.1f}",
        "baseline_mib": "{:,.0f}",
        "peak_mib": "{:,.0f}",
        "training_increase_mib": "{:,.0f}",
        "trainable_parameters": "{:,}",
        "optimizer_mib": "{:.2f}",
        "train_steps": "{:,}",
    }
    if isinstance(value, Spread):
        return value.format("s" if key == "step_seconds" else "ms", 3 if key == "step_seconds" else 0)
    return formats[key].format(value) if key in formats else str(value)


COLUMNS = (
    ("method", "method"),
    ("weight_mib", "weights (MiB)"),
    ("baseline_mib", "memory before loading (MiB)"),
    ("peak_mib", "peak by the end of training (MiB)"),
    ("training_increase_mib", "peak rise in training (MiB)"),
    ("trainable_parameters", "trainable parameters"),
    ("optimizer_mib", "optimizer state (MiB)"),
    ("train_steps", "steps"),
    ("step_seconds", "seconds per step, median (IQR)"),
    ("latency_ms", "ms per text, median (IQR)"),
    ("test_accuracy", "test accuracy [95% CI]"),
    ("test_macro_f1", "test macro-F1 [95% CI]"),
)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a Markdown table."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row, key) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)
