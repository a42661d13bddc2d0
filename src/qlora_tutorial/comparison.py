"""Full fine-tuning, LoRA and QLoRA trained on one budget, measured side by side, and judged by stated rules.

Taught in notebook 06 and run by ``benchmarks/compare_methods.py``. Every
method trains on the same rows, in the same order (same seed), for the same
number of steps, through ``python -m qlora_tutorial train`` in a fresh process:
on the CPU a process's peak resident memory can only grow, so one process per
method is the only way to read each method's own peak. QLoRA reuses notebook
04's run when it was trained on this very budget. The parent reads each
``results.json``, times inference for all models in interleaved rounds, and
states each verdict by the rules of ``uncertainty``.

The second comparison is of recipes, not methods: the reference recipe (pad
every batch to the maximum length, learning rate 5e-5, the usual BERT
fine-tuning rate) against ours (dynamic padding, the profile's rate), at the
same full budget, in ``make benchmark`` only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from qlora_tutorial.data import load_splits
from qlora_tutorial.inference import interleaved_latencies_ms, load_trained, merge_into_dequantized
from qlora_tutorial.memory import peak_is_own
from qlora_tutorial.modeling import Precision, load_classifier, load_tokenizer
from qlora_tutorial.pipeline import check_method, method_name
from qlora_tutorial.settings import Settings, changed_profile_fields, profile_option, with_profile_changes
from qlora_tutorial.timing import after_warmup
from qlora_tutorial.training import RESULTS_FILE, load_results, settings_record
from qlora_tutorial.uncertainty import (
    NOT_SETTLED,
    Interval,
    Spread,
    accuracy_interval,
    faster,
    macro_f1_interval,
    mcnemar,
    more_accurate,
    smaller,
    spread,
)

MIB = 2**20
REFERENCE_LEARNING_RATE = 5e-5  # BERT's usual full fine-tuning range (2e-5 to 5e-5), the reference recipe's rate
LOG_FILE = "train.log"
COMPARISON_FILE = "comparison.json"
SPREAD_KEYS = ("step_seconds", "latency_ms")
INTERVAL_KEYS = ("test_accuracy", "test_macro_f1")
MERGED = "QLoRA merged into its dequantized base (inference only)"
PEAK_TOLERANCE = 0.05  # peak memories within 5% of each other are "not settled" (run-to-run spread of peak RSS)


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
METHODS = (FULL, LORA, QLORA)


@dataclass(frozen=True)
class Budget:
    """How much each compared run trains and measures on a profile.

    ``max_steps=None`` trains the profile's epochs, the budget notebook 04's
    QLoRA run used, so that run can be reused; ``test_rows=None`` tests on the
    whole official test split. Full fine-tuning trains at
    ``full_learning_rate``, the adapters at the profile's rate.
    ``eval_steps`` is how often the recipe comparison validates.
    """

    methods: tuple[Method, ...]
    max_steps: int | None
    test_rows: int | None
    latency_texts: int
    eval_steps: int
    latency_rounds: int = 3
    full_learning_rate: float = 1e-4


BUDGETS: dict[str, Budget] = {
    "smoke": Budget(METHODS, max_steps=4, test_rows=40, latency_texts=4, eval_steps=2),
    # the profile's two epochs (400 steps) and all 7,600 test rows: notebook 04's QLoRA run, reused, and full
    # fine-tuning and LoRA trained alike (about 0.7 and 0.5 s per step on a quiet 2-core CPU)
    "cpu": Budget(METHODS, max_steps=None, test_rows=None, latency_texts=16, eval_steps=50),
    "gpu": Budget(METHODS, max_steps=None, test_rows=None, latency_texts=64, eval_steps=500),
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
    """The ``python -m qlora_tutorial train`` command line that trains ``method`` on the budget.

    It names everything the run depends on: the profile, the model and its
    revision, the data folder, and every profile field changed from the named
    profile (``with_profile_changes``), then the budget's own test rows and
    learning rate for full fine-tuning. The new process so trains with the
    parent's settings whatever its environment (``QLORA_MODEL``, ``QLORA_PROFILE``) says.
    """
    command = [sys.executable, "-m", "qlora_tutorial", "train", "--profile", settings.profile.name]
    command += ["--model", settings.model_name]
    if settings.model_revision is not None:
        command += ["--revision", settings.model_revision]
    if settings.data_dir is not None:
        command += ["--data-dir", str(settings.data_dir)]
    command += ["--precision", method.precision.value, "--output-dir", str(output_dir)]
    changes = changed_profile_fields(budget_settings(settings, budget).profile)
    if not method.use_lora:
        command.append("--no-lora")
        changes["learning_rate"] = budget.full_learning_rate
    for name, value in changes.items():
        command += [profile_option(name), "all" if value is None else str(value)]
    if budget.max_steps is not None:
        command += ["--max-steps", str(budget.max_steps)]
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


def method_settings(settings: Settings, method: Method, budget: Budget) -> Settings:
    """The settings ``method``'s run trains with: the budget's test sample, and full fine-tuning's own rate."""
    chosen = budget_settings(settings, budget)
    return chosen if method.use_lora else with_profile_changes(chosen, learning_rate=budget.full_learning_rate)


def trained_on_budget(results: dict[str, Any], settings: Settings, method: Method, budget: Budget) -> bool:
    """Whether a saved run is ``method`` trained on exactly this budget, with everything the comparison reads."""
    expected_steps = budget.max_steps
    if expected_steps is None:  # whole epochs
        batches = -(-results["rows"]["train"] // settings.profile.batch_size)
        expected_steps = int(batches * settings.profile.epochs)
    return (
        results.get("method") == method.label
        and results.get("settings") == settings_record(method_settings(settings, method, budget))
        and results.get("train_steps") == expected_steps
        and "test_predictions" in results
        and "step_seconds" in results
        and "peak_at_start_bytes" in results
    )


def reusable_run(settings: Settings, method: Method, folders: Sequence[Path], budget: Budget) -> Path | None:
    """The first of ``folders`` holding ``method`` trained on exactly this budget, if any.

    Notebook 06 and ``make benchmark`` share their runs this way, and QLoRA
    reuses notebook 04's run when 04 trained on the comparison's budget.
    """
    for folder in folders:
        if (folder / RESULTS_FILE).is_file() and trained_on_budget(load_results(folder), settings, method, budget):
            return folder
    return None


def trained_results(settings: Settings, method: Method, root: Path, budget: Budget) -> tuple[Path, dict[str, Any]]:
    """Where ``method``'s run is and its results: an earlier run on this budget when there is one, else a new one."""
    folders = [root / method.slug] + ([settings.run_dir("qlora")] if method == QLORA else [])
    reused = reusable_run(settings, method, folders, budget)
    if reused is not None:
        return reused, load_results(reused)
    return root / method.slug, train_method(settings, method, root / method.slug, budget)


def scored_labels(settings: Settings, budget: Budget) -> np.ndarray:
    """The labels of the test rows every method is scored on."""
    return np.asarray(load_splits(budget_settings(settings, budget))["test"]["label"])


def memory_row(results: dict[str, Any]) -> dict[str, Any]:
    """The memory a run measured, in MiB: the baseline before loading, the peak, and its rise in training.

    The peak and the rise are ``None`` where the peak is not the run's own
    (``memory.peak_is_own``: a run in a process that had been larger before it
    began, whose peak could not be reset).
    """
    own = peak_is_own(results["memory_baseline_bytes"], results["peak_at_start_bytes"])
    before, after = results["peak_before_training_bytes"], results["peak_after_training_bytes"]
    return {
        "baseline_mib": results["memory_baseline_bytes"] / MIB,
        "peak_mib": results["peak_memory_bytes"] / MIB if own else None,
        "training_increase_mib": max(0, after - before) / MIB if own else None,
        "peak_kind": results["peak_memory_kind"],
    }


def peak_verdict(qlora: dict[str, Any], lora: dict[str, Any]) -> tuple[str, str]:
    """What was measured of the two runs' peak memory, and the verdict: within ``PEAK_TOLERANCE`` is not settled.

    Peaks are compared only between runs that started from the same baseline
    (fresh processes). A run reused from a notebook kernel starts higher, and
    its rise in training is not comparable either: the kernel's allocator
    reuses memory that earlier work freed, which a fresh process must first
    take from the system. Then no verdict is drawn, and the text says why.
    """
    peaks = (qlora["peak_mib"], lora["peak_mib"])
    if None in peaks:
        shown = " vs ".join("not its own" if peak is None else f"{peak:,.0f} MiB" for peak in peaks)
        return f"peak {shown}", "peak: not measured on equal terms (a run shared its process with earlier training)"
    measured = f"peak {peaks[0]:,.0f} vs {peaks[1]:,.0f} MiB"
    baselines = (qlora["baseline_mib"], lora["baseline_mib"])
    if abs(baselines[0] - baselines[1]) > PEAK_TOLERANCE * max(baselines):
        verdict = "peak: not measured on equal terms (the runs started from different baselines)"
        return f"{measured} ({baselines[0]:,.0f} vs {baselines[1]:,.0f} MiB before loading)", verdict
    return measured, f"peak: {smaller(*peaks, 'QLoRA', 'LoRA', PEAK_TOLERANCE * max(peaks))}"


def comparison_row(results: dict[str, Any], labels: np.ndarray, latency: Spread) -> dict[str, Any]:
    """Everything the comparison shows for one trained run (memory in MiB, intervals at 95%)."""
    predictions = np.asarray(results["test_predictions"])
    return {
        "method": results["method"],
        "weight_mib": results["weight_bytes"] / MIB,
        "quant_state_mib": results["quant_state_bytes"] / MIB,
        **memory_row(results),
        "trainable_parameters": results["trainable_parameters"],
        "total_parameters": results["total_parameters"],
        "optimizer_mib": results["optimizer_state_bytes"] / MIB,
        "train_steps": results["train_steps"],
        "step_seconds": spread(after_warmup(results["step_seconds"])),
        "latency_ms": latency,
        "validation_accuracy": results["validation_accuracy"],
        "test_accuracy": accuracy_interval(predictions == labels),
        "test_macro_f1": macro_f1_interval(labels, predictions),
        "correct": predictions == labels,
        "learning_rate": results["settings"]["profile"]["learning_rate"],
    }


def compare_methods(settings: Settings, root: str | Path, budget: Budget | None = None) -> list[dict[str, Any]]:
    """Train every method of the budget (one process each), or reuse a run already trained on it.

    Then time all of them, plus the QLoRA adapter merged into its dequantized
    base (an inference-only row), in interleaved rounds on the same texts, and
    save the rows to ``root/comparison.json`` (``load_comparison``).
    """
    budget = budget or budget_for(settings)
    root = Path(root)
    load_before = os.getloadavg()[0]
    runs = {}
    for method in budget.methods:
        started = perf_counter()
        runs[method] = trained_results(settings, method, root, budget)
        print(f"{method.label}: {perf_counter() - started:.0f} s", flush=True)
    models = {method.label: load_for_inference(settings, folder, results) for method, (folder, results) in runs.items()}
    models[MERGED] = merge_into_dequantized(settings, runs[QLORA][0])
    texts = list(load_splits(budget_settings(settings, budget))["test"]["text"][: budget.latency_texts])
    timings = interleaved_latencies_ms(
        models, load_tokenizer(settings), texts, rounds=budget.latency_rounds, max_length=settings.profile.max_length
    )
    labels = scored_labels(settings, budget)
    rows = [comparison_row(results, labels, spread(timings[method.label])) for method, (_, results) in runs.items()]
    rows.append({"method": MERGED, "latency_ms": spread(timings[MERGED])})
    save_comparison(rows, root, settings, budget, (load_before, os.getloadavg()[0]))
    return rows


def row_to_json(row: dict[str, Any]) -> dict[str, Any]:
    """A comparison row as JSON values: spreads and intervals as dicts, per-row correctness as a list."""
    converted = {key: asdict(value) if key in SPREAD_KEYS + INTERVAL_KEYS else value for key, value in row.items()}
    if "correct" in row:
        converted["correct"] = np.asarray(row["correct"]).tolist()
    return converted


def row_from_json(saved: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``row_to_json``."""
    row = dict(saved)
    for key in SPREAD_KEYS:
        if key in row:
            row[key] = Spread(**row[key])
    for key in INTERVAL_KEYS:
        if key in row:
            row[key] = Interval(**row[key])
    if "correct" in row:
        row["correct"] = np.asarray(row["correct"], dtype=bool)
    return row


def comparison_key(settings: Settings, budget: Budget) -> dict[str, Any]:
    """What a saved comparison must match to be reused: the settings and the budget."""
    return {"settings": settings_record(budget_settings(settings, budget)), "budget": repr(budget)}


def save_comparison(
    rows: Sequence[dict[str, Any]], root: str | Path, settings: Settings, budget: Budget, load: tuple[float, float]
) -> Path:
    """Write the rows, with what they were measured on and the 1-minute load average before and after."""
    path = Path(root) / COMPARISON_FILE
    record = {**comparison_key(settings, budget), "load_average": list(load), "rows": [row_to_json(r) for r in rows]}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def load_comparison(root: str | Path, settings: Settings, budget: Budget) -> dict[str, Any] | None:
    """Notebook 06's rows and load averages on this budget, so ``make benchmark`` reports that run; else ``None``."""
    path = Path(root) / COMPARISON_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if {key: record.get(key) for key in ("settings", "budget")} != comparison_key(settings, budget):
        return None
    rows = [row_from_json(row) for row in record["rows"]]
    return {"rows": rows, "load_average": record.get("load_average")}  # None: a run that did not record it


def by_method(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The comparison rows keyed by method label."""
    return {row["method"]: row for row in rows}


def verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """QLoRA against LoRA on the five questions a LoRA-vs-QLoRA table asks, each answered by its stated rule.

    * trainable parameters: counted exactly, so equal or not;
    * memory: weights counted exactly; peak memory within 5% of each other is not settled;
    * training and inference speed: faster only when the interquartile ranges do not overlap;
    * accuracy: different only when McNemar's test on the same test rows gives p < 0.05.
    """
    found = by_method(rows)
    qlora, lora = found[QLORA.label], found[LORA.label]
    test = mcnemar(qlora["correct"], lora["correct"])
    same_trainable = qlora["trainable_parameters"] == lora["trainable_parameters"]
    peak_measured, peak = peak_verdict(qlora, lora)
    return [
        {
            "question": "Does QLoRA train fewer parameters than LoRA?",
            "measured": f"{qlora['trainable_parameters']:,} vs {lora['trainable_parameters']:,}",
            "verdict": "no: the same adapters" if same_trainable else "yes",
        },
        {
            "question": "Does QLoRA need less memory than LoRA?",
            "measured": f"weights {qlora['weight_mib']:.1f} vs {lora['weight_mib']:.1f} MiB; {peak_measured}",
            "verdict": f"weights: {smaller(qlora['weight_mib'], lora['weight_mib'], 'QLoRA', 'LoRA', 0)}; {peak}",
        },
        {
            "question": "Does QLoRA train faster than LoRA?",
            "measured": f"{qlora['step_seconds'].format('s')} vs {lora['step_seconds'].format('s')} per step",
            "verdict": faster(qlora["step_seconds"], lora["step_seconds"], "QLoRA", "LoRA"),
        },
        {
            "question": "Is QLoRA's inference faster than LoRA's?",
            "measured": f"{qlora['latency_ms'].format('ms', 0)} vs {lora['latency_ms'].format('ms', 0)} per text",
            "verdict": faster(qlora["latency_ms"], lora["latency_ms"], "QLoRA", "LoRA"),
        },
        {
            "question": "Does QLoRA keep LoRA's accuracy?",
            "measured": f"test {qlora['test_accuracy']} vs {lora['test_accuracy']}; McNemar p = {test.p_value:.2f} "
            f"({test.only_first_right} rows only QLoRA got right, {test.only_second_right} only LoRA)",
            "verdict": more_accurate(test, "QLoRA", "LoRA").replace(NOT_SETTLED, "no difference found"),
        },
    ]


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
    ("peak_mib", "peak memory (MiB)"),
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


def validation_curve(results: dict[str, Any]) -> list[tuple[int, float]]:
    """(step, validation accuracy) for each evaluation the ``Trainer`` ran while training."""
    curve: list[tuple[int, float]] = []
    for entry in results["log_history"]:
        if "train_runtime" in entry:  # the end of trainer.train(); later entries are the final evaluations
            break
        if "eval_accuracy" in entry:
            curve.append((int(entry["step"]), float(entry["eval_accuracy"])))
    return curve


def left_chance(accuracy: float, rows: int, classes: int = 4) -> bool:
    """Whether a validation accuracy on ``rows`` rows is above chance: its 95% interval lies above 1/classes."""
    hits = round(accuracy * rows)
    return bool(accuracy_interval([True] * hits + [False] * (rows - hits)).low > 1 / classes)


def compare_recipe_runs(reference: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """What the reference recipe reached, how soon ours reached it, and what padding costs per step.

    The per-step cost compares the two runs' median step times (both QLoRA on
    the same model: only the padding changes the work, not the rate).
    """
    curves = {"reference": validation_curve(reference), "ours": validation_curve(ours)}
    for name, curve in curves.items():
        if not curve:
            raise ValueError(f"The {name} run has no validation during training: train it with --eval-steps.")
    validation_rows = reference["rows"]["validation"]
    final = reference["validation_accuracy"]
    steps_needed = next((step for step, accuracy in curves["ours"] if accuracy >= final), None)
    step_seconds = {
        name: spread(after_warmup(run["step_seconds"])) for name, run in (("reference", reference), ("ours", ours))
    }
    return {
        "reference_steps": reference["train_steps"],
        "reference_final_validation_accuracy": final,
        "reference_left_chance": left_chance(final, validation_rows),
        "ours_steps_to_reference_accuracy": steps_needed,
        "ours_seconds_to_reference_accuracy": None
        if steps_needed is None
        else steps_needed * step_seconds["ours"].median,
        "ours_final_validation_accuracy": ours["validation_accuracy"],
        "step_seconds": step_seconds,
        "padding_step_cost": step_seconds["reference"].median / step_seconds["ours"].median,
        "curves": curves,
    }


def compare_recipes(settings: Settings, root: str | Path, budget: Budget | None = None) -> dict[str, Any]:
    """QLoRA trained with the reference recipe and with ours on the same full budget, validating every ``eval_steps``.

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
        **compare_recipe_runs(reference, ours),
    }


def recipe_summary(recipes: dict[str, Any]) -> str:
    """The recipe comparison in Markdown sentences that state only what was measured."""
    steps, final = recipes["reference_steps"], recipes["reference_final_validation_accuracy"]
    if recipes["reference_left_chance"]:
        reached = f"reached {final:.1%} validation accuracy after {steps} steps"
    else:
        reached = f"never left chance in {steps} steps (final validation accuracy {final:.1%})"
    needed = recipes["ours_steps_to_reference_accuracy"]
    ours = (
        f"Ours reached that accuracy at its first validation at or above it, step {needed} "
        f"({recipes['ours_seconds_to_reference_accuracy']:.0f} s of training at its median step time)"
        if needed is not None
        else "Ours never reached that accuracy"
    )
    timing = recipes["step_seconds"]
    return (
        f"QLoRA with the usual BERT fine-tuning recipe ({recipes['reference_recipe']}) {reached}. {ours}, and ended at "
        f"{recipes['ours_final_validation_accuracy']:.1%}. Per step, padding to the maximum length costs "
        f"{recipes['padding_step_cost']:.2f}x the time of dynamic padding "
        f"({timing['reference'].format('s')} against {timing['ours'].format('s')})."
    )
