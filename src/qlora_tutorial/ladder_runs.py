"""Notebook 09's ladder: every (shape, method) predicted first, started only where the prediction fits.

``scale_runs`` measures one run and ``estimator`` predicts one; this module
walks the ladder of ``scale_profile.ScaleProfile`` with both: for each run it
writes the prediction down, compares it with the memory this machine has
available at that moment (less the profile's margin), and either starts the
run in a fresh process or records why it was not started. The rows it returns
are what 09's table, verdicts and plot read.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import psutil

from qlora_tutorial.errors import UserInputError
from qlora_tutorial.estimator import METHODS, RunSpec, check_fits, estimate_peak
from qlora_tutorial.scale_profile import ScaleProfile
from qlora_tutorial.scale_runs import measure_in_fresh_process, process_baseline_bytes, scale_spec
from qlora_tutorial.shapes import get_decoder_shape

GIB = 2**30


def ladder_specs(ladder: ScaleProfile) -> list[RunSpec]:
    """Every shape of the ladder with every method, smallest shape first, gradient checkpointing on."""
    return [
        scale_spec(
            get_decoder_shape(name),
            method,
            batch_size=ladder.batch_size,
            seq_len=ladder.seq_len,
            lora_r=ladder.lora_r,
        )
        for name in ladder.shapes
        for method in METHODS
    ]


def run_or_predict(
    spec: RunSpec,
    steps: int,
    margin: float,
    available_bytes: int | None = None,
    process_bytes: int | None = None,
) -> dict[str, Any]:
    """Predict ``spec``'s peak; run it in a fresh process if it fits, else keep the prediction and the reason.

    The prediction starts from ``process_bytes``, a fresh measuring process's
    resident set (None: measured on this machine, ``process_baseline_bytes``),
    and is compared with ``available_bytes`` (None: available now).

    The row holds the shape and its parameters, the method's name, the
    prediction (``predicted_bytes``), and for a run that ran its measured peak
    (``measured_bytes``: the kernel's ``VmHWM``), the anonymous and
    file-backed parts, the step time and the relative error of the
    prediction; ``line`` is one sentence to print.
    """
    if steps < 1:
        raise UserInputError(
            f"A ladder run trains at least one step, got {steps}; to measure a load alone, call "
            "scale_runs.measure_in_fresh_process(spec, 0)."
        )
    estimate = estimate_peak(spec, process_baseline_bytes() if process_bytes is None else process_bytes)
    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    verdict = check_fits(estimate, available, margin)
    row: dict[str, Any] = {
        "shape": spec.shape.name,
        "parameters": spec.shape.parameters,
        "method": METHODS[spec.method],
        "compute dtype": spec.compute_dtype,
        "checkpointing": spec.gradient_checkpointing,
        "predicted_bytes": estimate.total_bytes,
        "measured_bytes": None,
        "anon_bytes": None,
        "file_bytes": None,
        "step_seconds": None,
        "error": None,
        "run": None,
    }
    if not verdict.fits:
        return {**row, "line": verdict.message}
    run = measure_in_fresh_process(spec, steps, margin=margin)
    measured = run["peak_bytes"]
    error = (estimate.total_bytes - measured) / measured
    row.update(
        measured_bytes=measured,
        anon_bytes=run["peak_anon_bytes"],
        file_bytes=max(run["load"]["file_bytes"] or 0, run["train"]["file_bytes"] or 0) or None,
        step_seconds=run["median_step_seconds"],
        error=error,
        run=run,
    )
    line = (
        f"{spec.describe()}: predicted {estimate.total_gib:.2f} GiB, measured {measured / GIB:.2f} GiB "
        f"({error:+.1%}), {run['median_step_seconds']:.2f} s/step"
    )
    return {**row, "line": line}


def ladder_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The rows as a table a learner reads: GiB with two decimals, the error in percent, '-' where nothing ran."""

    def gib(value: int | None) -> str:
        return "-" if value is None else f"{value / GIB:.2f}"

    table = pd.DataFrame(
        {
            "shape": row["shape"],
            "method": row["method"] + (f" ({row['compute dtype']})" if row["method"] == "QLoRA" else ""),
            "predicted (GiB)": gib(row["predicted_bytes"]),
            "measured (GiB)": gib(row["measured_bytes"]),
            "anon / file (GiB)": "-"
            if row["anon_bytes"] is None
            else f"{gib(row['anon_bytes'])} / {gib(row['file_bytes'])}",
            "error": "predicted only" if row["error"] is None else f"{row['error']:+.1%}",
            "s/step": "-" if row["step_seconds"] is None else f"{row['step_seconds']:.2f}",
        }
        for row in rows
    )
    return table.set_index(["shape", "method"])
