"""Full fine-tuning, LoRA and QLoRA on one budget, each trained in its own process.

Taught in notebook 06 and run by ``benchmarks/compare_methods.py``. Every
method trains on the same data, seed, step budget and machine through
``python -m qlora_tutorial train`` in a fresh process: on the CPU a process's
peak resident memory can only grow, so one process per method is the only way
to read each method's own peak. The parent reads each ``results.json``, then
times inference the same way for all (``inference.latencies_ms``: batch size
1 on a small fixed set of test texts, best of three per text).

The second comparison is of recipes, not methods: the reference tutorial's
(pad every batch to 128 tokens, learning rate 5e-5) against ours (dynamic
padding, the profile's rate), as the time each needs to reach the same
validation accuracy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from qlora_tutorial.data import load_splits
from qlora_tutorial.inference import latencies_ms, load_trained, merge_full_precision
from qlora_tutorial.modeling import Precision, load_classifier, load_tokenizer
from qlora_tutorial.pipeline import check_method, method_name
from qlora_tutorial.settings import Settings, with_profile_changes
from qlora_tutorial.training import load_results

MIB = 2**20
REFERENCE_LEARNING_RATE = 5e-5  # the reference tutorial's rate, also BERT's usual full fine-tuning range (2e-5 to 5e-5)
LOG_FILE = "train.log"


@dataclass(frozen=True)
class Method:
    """One way to fine-tune: the base precision, and adapters or all weights."""

    precision: Precision
    use_lora: bool = True

    def __post_init__(self) -> None:
        check_method(self.precision, self.use_lora)

    @property
    def label(self) -> str:
        """The label the pipeline writes into results.json, e.g. ``QLoRA (nf4-dq)``."""
        return method_name(self.precision, self.use_lora)

    @property
    def slug(self) -> str:
        """A folder name: ``full-fp32``, ``lora-fp32``, ``qlora-nf4-dq``."""
        kind = "full" if not self.use_lora else ("qlora" if self.precision.is_quantized else "lora")
        return f"{kind}-{self.precision.value}"


FULL = Method(Precision.FP32, use_lora=False)
LORA = Method(Precision.FP32)
QLORA = Method(Precision.NF4_DQ)
CORE_METHODS = (FULL, LORA, QLORA)
ALL_METHODS = (*CORE_METHODS, Method(Precision.NF4), Method(Precision.FP4))


@dataclass(frozen=True)
class Budget:
    """How much each compared run trains and measures on a profile.

    Full fine-tuning trains at ``full_learning_rate``; the adapters at the
    profile's rate. ``eval_steps`` is how often the recipe comparison validates.
    """

    methods: tuple[Method, ...]
    max_steps: int
    test_rows: int | None
    latency_texts: int
    eval_steps: int
    full_learning_rate: float = 1e-4


BUDGETS: dict[str, Budget] = {
    "smoke": Budget(CORE_METHODS, max_steps=4, test_rows=40, latency_texts=8, eval_steps=2),
    "cpu": Budget(ALL_METHODS, max_steps=30, test_rows=400, latency_texts=16, eval_steps=6),
    "gpu": Budget(ALL_METHODS, max_steps=500, test_rows=None, latency_texts=64, eval_steps=50),
}


def budget_for(settings: Settings) -> Budget:
    """The comparison budget of the settings' profile."""
    try:
        return BUDGETS[settings.profile.name]
    except KeyError:
        raise ValueError(
            f"No comparison budget for profile {settings.profile.name!r}; known: {', '.join(BUDGETS)}. "
            "Add one to qlora_tutorial.comparison.BUDGETS."
        ) from None


def budget_settings(settings: Settings, budget: Budget) -> Settings:
    """The settings every compared run uses: the profile with the budget's test sample."""
    return with_profile_changes(settings, test_rows=budget.test_rows)


def train_command(settings: Settings, method: Method, output_dir: str | Path, budget: Budget, *extra: str) -> list[str]:
    """The ``python -m qlora_tutorial train`` command line that trains ``method`` on the budget."""
    command = [sys.executable, "-m", "qlora_tutorial", "train", "--profile", settings.profile.name]
    command += ["--precision", method.precision.value, "--output-dir", str(output_dir)]
    command += ["--max-steps", str(budget.max_steps)]
    if budget.test_rows is not None:
        command += ["--test-rows", str(budget.test_rows)]
    if settings.data_dir is not None:
        command += ["--data-dir", str(settings.data_dir)]
    if not method.use_lora:
        command += ["--no-lora", "--learning-rate", str(budget.full_learning_rate)]
    return command + list(extra)


def run_logged(command: Sequence[str], log_path: str | Path) -> float:
    """Run ``command`` in a new process with this environment, its output in ``log_path``; return seconds.

    A failed run raises with the end of its log, so the error shows in the notebook.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = perf_counter()
    with log_path.open("w") as log:
        finished = subprocess.run(list(command), stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    if finished.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command[:6])} ... failed (exit {finished.returncode}); log {log_path}:\n{tail}")
    return perf_counter() - started


def train_method(settings: Settings, method: Method, output_dir: str | Path, budget: Budget, *extra: str) -> dict:
    """Train ``method`` in its own process and return its results.json."""
    run_logged(train_command(settings, method, output_dir, budget, *extra), Path(output_dir) / LOG_FILE)
    return load_results(output_dir)


def load_for_inference(settings: Settings, output_dir: str | Path, results: dict[str, Any]) -> Any:
    """The trained model as the run saved it: a full checkpoint, or the base at its precision plus the adapter."""
    if results["lora"]:
        return load_trained(settings, output_dir, results["precision"])
    saved = replace(settings, model_name=str(output_dir), model_revision=None)
    return load_classifier(saved, Precision.FP32).eval()


def latency_texts(settings: Settings, count: int) -> list[str]:
    """The fixed texts every model is timed on: the first ``count`` of the (sampled) test split."""
    return list(load_splits(settings)["test"]["text"][:count])


def median_latency_ms(model: Any, settings: Settings, texts: Sequence[str], repeats: int = 3) -> float:
    """Milliseconds per text at batch size 1, measured the same way for every model.

    Each text is timed ``repeats`` times and its fastest time kept (other
    programs on a shared machine only ever add time), then the median over
    the texts is taken.
    """
    tokenizer = load_tokenizer(settings)
    length = settings.profile.max_length
    timings = np.stack([latencies_ms(model, tokenizer, texts, max_length=length) for _ in range(repeats)])
    return float(np.median(timings.min(axis=0)))


def comparison_row(results: dict[str, Any], latency_ms: float) -> dict[str, Any]:
    """The numbers the comparison table shows for one run (memory in MiB)."""
    return {
        "method": results["method"],
        "weight_mib": results["weight_bytes"] / MIB,
        "quant_state_mib": results["quant_state_bytes"] / MIB,
        "peak_mib": results["peak_memory_bytes"] / MIB,
        "peak_kind": results["peak_memory_kind"],
        "trainable_parameters": results["trainable_parameters"],
        "total_parameters": results["total_parameters"],
        "optimizer_mib": results["optimizer_state_bytes"] / MIB,
        "train_examples_per_second": results["train_examples_per_second"],
        "latency_ms": latency_ms,
        "validation_accuracy": results["validation_accuracy"],
        "test_accuracy": results["test_accuracy"],
        "train_steps": results["train_steps"],
        "learning_rate": results["settings"]["profile"]["learning_rate"],
    }


def compare_methods(settings: Settings, root: str | Path, budget: Budget | None = None) -> list[dict[str, Any]]:
    """Train every method of the budget in turn (one process each), then time each one's inference.

    Adds one inference-only row: the QLoRA adapter merged into a full-precision
    base (``inference.merge_full_precision``), to show what merging buys.
    """
    budget = budget or budget_for(settings)
    root = Path(root)
    texts = latency_texts(budget_settings(settings, budget), budget.latency_texts)
    rows = []
    for method in budget.methods:
        started = perf_counter()
        results = train_method(settings, method, root / method.slug, budget)
        model = load_for_inference(settings, root / method.slug, results)
        rows.append(comparison_row(results, median_latency_ms(model, settings, texts)))
        print(f"{method.label}: {perf_counter() - started:.0f} s", flush=True)
    merged = merge_full_precision(settings, root / QLORA.slug)
    rows.append(
        {
            "method": "QLoRA merged into fp32 base (inference only)",
            "latency_ms": median_latency_ms(merged, settings, texts),
        }
    )
    return rows


COLUMNS = (
    ("method", "method", "{}"),
    ("weight_mib", "weights (MiB)", "{:.1f}"),
    ("peak_mib", "peak training memory (MiB)", "{:,.0f}"),
    ("trainable_parameters", "trainable parameters", "{:,}"),
    ("optimizer_mib", "optimizer state (MiB)", "{:.2f}"),
    ("train_examples_per_second", "training (examples/s)", "{:.1f}"),
    ("latency_ms", "inference (ms/example)", "{:.1f}"),
    ("validation_accuracy", "validation accuracy", "{:.1%}"),
    ("test_accuracy", "test accuracy", "{:.1%}"),
)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a Markdown table; a value a row lacks (an inference-only row) shows as a dash."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def validation_curve(results: dict[str, Any]) -> list[tuple[int, float]]:
    """(step, validation accuracy) for each evaluation the ``Trainer`` ran while training."""
    curve: list[tuple[int, float]] = []
    for entry in results["log_history"]:
        if "train_runtime" in entry:  # the end of trainer.train(); later entries are the final evaluations
            break
        if "eval_accuracy" in entry:
            curve.append((int(entry["step"]), float(entry["eval_accuracy"])))
    return curve


def seconds_per_step(results: dict[str, Any]) -> float:
    """Mean wall-clock seconds of one training step, with the validation passes during training taken out."""
    history = results["log_history"]
    end = next((i for i, entry in enumerate(history) if "train_runtime" in entry), len(history))
    evaluating = sum(entry["eval_runtime"] for entry in history[:end] if "eval_runtime" in entry)
    return (results["train_seconds"] - evaluating) / results["train_steps"]


def steps_to_reach(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step with validation accuracy at or above ``target`` (``None``: never)."""
    return next((step for step, accuracy in curve if accuracy >= target), None)


def recipe_speedup(reference: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """How much sooner our recipe reaches the accuracy both recipes reach, from two runs' results.

    The target is the lower of the two best validation accuracies, so both
    reach it; time to it is the first evaluated step at or above it times the
    run's mean seconds per training step. Resolution is one evaluation interval.
    """
    curves = {"reference": validation_curve(reference), "ours": validation_curve(ours)}
    for name, curve in curves.items():
        if not curve:
            raise ValueError(f"The {name} run has no validation during training: train it with --eval-steps.")
    target = min(max(accuracy for _, accuracy in curve) for curve in curves.values())
    steps = {name: steps_to_reach(curve, target) for name, curve in curves.items()}
    per_step = {"reference": seconds_per_step(reference), "ours": seconds_per_step(ours)}
    seconds = {name: steps[name] * per_step[name] for name in curves}
    return {
        "target_validation_accuracy": target,
        "steps_to_target": steps,
        "seconds_per_step": per_step,
        "seconds_to_target": seconds,
        "step_time_ratio": per_step["reference"] / per_step["ours"],
        "speedup": seconds["reference"] / seconds["ours"],
        "curves": curves,
    }


def compare_recipes(settings: Settings, root: str | Path, budget: Budget | None = None) -> dict[str, Any]:
    """QLoRA trained with the reference recipe and with ours on the same budget, validating every ``eval_steps``.

    Reference: every row padded to the maximum length, learning rate 5e-5.
    Ours: dynamic padding, the profile's learning rate.
    """
    budget = budget or budget_for(settings)
    root = Path(root)
    every = ("--eval-steps", str(budget.eval_steps))
    reference_options = ("--pad-to-max-length", "--learning-rate", str(REFERENCE_LEARNING_RATE))
    reference = train_method(settings, QLORA, root / "reference", budget, *every, *reference_options)
    ours = train_method(settings, QLORA, root / "ours", budget, *every)
    return {
        "reference_recipe": f"pad to {settings.profile.max_length} tokens, learning rate {REFERENCE_LEARNING_RATE:g}",
        "our_recipe": f"dynamic padding, learning rate {settings.profile.learning_rate:g}",
        **recipe_speedup(reference, ours),
    }


def recipe_summary(recipes: dict[str, Any]) -> str:
    """The recipe comparison in two Markdown sentences."""
    steps, seconds = recipes["steps_to_target"], recipes["seconds_to_target"]
    return (
        f"QLoRA with the reference recipe ({recipes['reference_recipe']}) against ours ({recipes['our_recipe']}), "
        f"same model, data and step budget: both reach {recipes['target_validation_accuracy']:.1%} validation "
        f"accuracy, the reference at step {steps['reference']} ({seconds['reference']:.0f} s of training), ours at "
        f"step {steps['ours']} ({seconds['ours']:.0f} s). Ours gets there **{recipes['speedup']:.1f}x** sooner; "
        f"per step alone, padding to the maximum length costs {recipes['step_time_ratio']:.2f}x the time. "
        "Steps are resolved to one validation interval, so the ratio is a lower bound when ours reaches the "
        "target at its first validation."
    )
