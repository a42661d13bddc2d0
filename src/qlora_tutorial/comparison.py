"""Full fine-tuning, LoRA, QLoRA and QLoRA on all linear layers trained on one budget, each in a fresh process.

Taught in notebook 06 and run by ``benchmarks/compare_methods.py``. This module
runs the comparison and keeps its rows. Every method trains on the same rows,
in the same order (same seed), for the same number of steps, through
``python -m qlora_tutorial train`` in a fresh process: every run then starts
from the same baseline memory, so the peaks compare (``same_baseline``), and a
peak is the run's own even where the mark cannot be reset. Notebook 04's QLoRA
run, trained in that notebook's kernel, is not reused. The parent reads each
``results.json``, times inference for all models in interleaved rounds, and
saves the rows (``comparison.json``) so that ``make benchmark`` reports the
very run notebook 06 made.

What the rows are judged by is in ``verdicts``, their Markdown tables in
``comparison_tables``, and the comparison of training recipes (not methods)
in ``recipes``.
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
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.inference import interleaved_latencies_ms, load_trained, merge_into_dequantized
from qlora_tutorial.memory import peak_is_own
from qlora_tutorial.modeling import Precision, load_classifier, load_tokenizer
from qlora_tutorial.pipeline import check_method, method_name
from qlora_tutorial.settings import Settings, changed_profile_fields, profile_option, with_profile_changes
from qlora_tutorial.timing import after_warmup
from qlora_tutorial.training import RESULTS_FILE, load_results, settings_record
from qlora_tutorial.uncertainty import Interval, Spread, accuracy_interval, macro_f1_interval, spread

MIB = 2**20
LOG_FILE = "train.log"
COMPARISON_FILE = "comparison.json"
SPREAD_KEYS = ("step_seconds", "latency_ms")
SAMPLE_KEYS = ("step_samples", "latency_samples")  # the timings themselves, for the paired tests
INTERVAL_KEYS = ("test_accuracy", "test_macro_f1")
MERGED = "QLoRA merged into its dequantized base (inference only)"
# Peaks within 5% of each other are "not settled" (verdicts.peak_verdict), and baselines within 5% are the same
# (same_baseline). Measured: the same fresh-process run three times each, one after another on a shared 2-core CPU
# (load 2 to 10, so 0.6 to 12 s per step), `python -m qlora_tutorial train --profile cpu --data-dir <ag_news>
# --precision nf4-dq|fp32 --max-steps 30 --test-rows 200`. Run-to-run spread, max minus min over the mean: peak by
# the end of training 1.8% for QLoRA (1,619 to 1,649 MiB) and 1.4% for LoRA (1,577 to 1,599 MiB); the run's final
# peak 1.6% and 1.4%; baseline 0.04% (560 MiB). 5% is over twice the larger spread: three runs per method
# cannot bound the spread tightly, so the rule keeps that margin.
PEAK_TOLERANCE = 0.05


@dataclass(frozen=True)
class Method:
    """One way to fine-tune: the base precision, adapters or all weights, and which layers get the adapters.

    ``target_modules`` is ``None`` for the reference recipe's query and value,
    ``"all-linear"`` for every linear layer (the QLoRA paper's choice, section
    4), or a tuple of layer names.
    """

    precision: Precision
    use_lora: bool = True
    target_modules: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_method(self.precision, self.use_lora)
        if not self.use_lora and self.target_modules is not None:
            raise UserInputError(
                "--target-modules says which layers get LoRA adapters, and full fine-tuning (--no-lora) has none: "
                "drop one of the two options."
            )

    @property
    def label(self) -> str:
        """The label the pipeline writes into results.json, e.g. ``QLoRA (nf4-dq)``."""
        return method_name(self.precision, self.use_lora, self.target_modules)

    @property
    def slug(self) -> str:
        """A folder name: ``full-fp32``, ``lora-fp32``, ``qlora-nf4-dq``, ``qlora-nf4-dq-all-linear``."""
        kind = "full" if not self.use_lora else ("qlora" if self.precision.is_quantized else "lora")
        targets = self.target_modules
        where = "" if targets is None else "-" + (targets if isinstance(targets, str) else "-".join(targets))
        return f"{kind}-{self.precision.value}{where}"

    @property
    def target_option(self) -> str | None:
        """The ``--target-modules`` value that trains these adapters (``None``: the default, query and value)."""
        targets = self.target_modules
        return targets if targets is None or isinstance(targets, str) else ",".join(targets)


FULL = Method(Precision.FP32, use_lora=False)
LORA = Method(Precision.FP32)
QLORA = Method(Precision.NF4_DQ)
QLORA_ALL_LINEAR = Method(Precision.NF4_DQ, target_modules="all-linear")
METHODS = (FULL, LORA, QLORA, QLORA_ALL_LINEAR)


@dataclass(frozen=True)
class Budget:
    """How much each compared run trains and measures on a profile.

    ``max_steps=None`` trains the profile's epochs (notebook 04's budget);
    ``test_rows=None`` tests on the whole official test split. Full fine-tuning trains at
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
    # one epoch (200 steps, half of notebook 04's two) and all 7,600 test rows, every method in its own process:
    # the four runs fit the workshop's 15 minutes on a 2-core CPU; the test rows keep the intervals at about
    # +-0.7 points, so the verdicts are still decided by McNemar's test (notebook 06 says what the half budget costs)
    "cpu": Budget(METHODS, max_steps=200, test_rows=None, latency_texts=16, eval_steps=50),
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
    if method.target_option is not None:
        command += ["--target-modules", method.target_option]
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

    Notebook 06 and ``make benchmark`` share their runs this way (each trained
    in its own process by ``train_method``).
    """
    for folder in folders:
        if (folder / RESULTS_FILE).is_file() and trained_on_budget(load_results(folder), settings, method, budget):
            return folder
    return None


def trained_results(settings: Settings, method: Method, root: Path, budget: Budget) -> tuple[Path, dict[str, Any]]:
    """Where ``method``'s run is and its results: this comparison's earlier run on this budget, else a new one.

    It prints a line as the run starts and one as it ends, with its time (the
    runs take minutes each on a CPU).
    """
    folder = root / method.slug
    if reusable_run(settings, method, [folder], budget) is not None:
        print(f"{method.label}: reused its run on this budget (trained earlier in its own process)", flush=True)
        return folder, load_results(folder)
    print(f"{method.label}: training in a new process ...", flush=True)
    started = perf_counter()
    results = train_method(settings, method, folder, budget)
    print(f"{method.label}: trained in {perf_counter() - started:.0f} s", flush=True)
    return folder, results


def scored_labels(settings: Settings, budget: Budget) -> np.ndarray:
    """The labels of the test rows every method is scored on."""
    return np.asarray(load_splits(budget_settings(settings, budget))["test"]["label"])


def longer_qlora_run(settings: Settings, budget: Budget) -> tuple[int, np.ndarray] | None:
    """Notebook 04's QLoRA run (the profile's epochs), as (its steps, correct per test row), for the budget's rows.

    Notebook 06 trains one epoch on the `cpu` profile, to fit a workshop's
    slot; 04 trains the same QLoRA recipe for the profile's two. Scored on the
    same test rows, the two say what the shorter budget costs (McNemar's
    test). None where 04 has not run, or its run is not on these test rows or
    is no longer than this budget.
    """
    folder = settings.run_dir("qlora")
    if not (folder / RESULTS_FILE).is_file():
        return None
    results = load_results(folder)
    labels = scored_labels(settings, budget)
    predictions = np.asarray(results.get("test_predictions", []))
    longer = budget.max_steps is not None and results.get("train_steps", 0) > budget.max_steps
    recorded = results.get("settings", {})
    same_run = recorded.get("profile") == asdict(settings.profile) and recorded.get("model_name") == settings.model_name
    if not (longer and same_run and predictions.shape == labels.shape):
        return None
    return results["train_steps"], predictions == labels


def memory_row(results: dict[str, Any]) -> dict[str, Any]:
    """The memory a run measured, in MiB: the baseline before loading, the peak by the end of training, its rise.

    ``peak_mib`` is the high-water mark read as training ended
    (``peak_after_training_bytes``: loading, the training steps and the
    validation at each epoch's end), not the run's final peak, which adds what
    comes after training: the prediction of the test rows, and a validation
    where training did not end with one. The rise is that peak minus the peak
    before training. Both are ``None`` where the peak is
    not the run's own (``memory.peak_is_own``: a run in a process that had been
    larger before it began, whose peak could not be reset).
    """
    own = peak_is_own(results["memory_baseline_bytes"], results["peak_at_start_bytes"])
    before, after = results["peak_before_training_bytes"], results["peak_after_training_bytes"]
    return {
        "baseline_mib": results["memory_baseline_bytes"] / MIB,
        "peak_mib": after / MIB if own else None,
        "training_increase_mib": max(0, after - before) / MIB if own else None,
        "peak_kind": results["peak_memory_kind"],
    }


def same_baseline(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """Whether two runs started from the same memory (within ``PEAK_TOLERANCE``), as fresh processes do.

    Only then do their peaks compare. A run in a notebook kernel starts
    higher, and its rise in training is not comparable either: the kernel's
    allocator reuses memory that earlier work freed, which a fresh process
    must first take from the system.
    """
    baselines = (first["baseline_mib"], second["baseline_mib"])
    return abs(baselines[0] - baselines[1]) <= PEAK_TOLERANCE * max(baselines)


def comparable_peak_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with only the peaks that compare kept: own peaks from the baseline of a fresh process.

    The reference baseline is the lowest among the runs with their own peak (a
    fresh process's). Any other row gets ``peak_mib`` ``None`` and a
    ``peak_note`` saying why, which ``plots.plot_method_comparison`` shows
    instead of a bar. Rows without a peak (inference only) pass unchanged.
    """
    own = [row for row in rows if row.get("peak_mib") is not None]
    reference = min(own, key=lambda row: row["baseline_mib"], default=None)
    kept = []
    for row in rows:
        if "peak_mib" not in row:
            kept.append(row)
        elif row["peak_mib"] is None:
            kept.append({**row, "peak_note": "not its own"})
        elif reference is not None and not same_baseline(row, reference):
            kept.append({**row, "peak_mib": None, "peak_note": "not comparable\n(other baseline)"})
        else:
            kept.append(row)
    return kept


def comparison_row(results: dict[str, Any], labels: np.ndarray, latencies: Sequence[float]) -> dict[str, Any]:
    """Everything the comparison shows for one trained run (memory in MiB, intervals at 95%).

    ``latencies`` are the run's model's milliseconds per text, in the order
    ``inference.interleaved_latencies_ms`` returns them; they and the step
    times after warm-up are kept (``SAMPLE_KEYS``) for the paired tests.
    """
    predictions = np.asarray(results["test_predictions"])
    steps = after_warmup(results["step_seconds"])
    return {
        "method": results["method"],
        "weight_mib": results["weight_bytes"] / MIB,
        "quant_state_mib": results["quant_state_bytes"] / MIB,
        **memory_row(results),
        "trainable_parameters": results["trainable_parameters"],
        "total_parameters": results["total_parameters"],
        "optimizer_mib": results["optimizer_state_bytes"] / MIB,
        "train_steps": results["train_steps"],
        "step_seconds": spread(steps),
        "step_samples": list(steps),
        "latency_ms": spread(latencies),
        "latency_samples": np.asarray(latencies, dtype=float).tolist(),
        "validation_accuracy": results["validation_accuracy"],
        "test_accuracy": accuracy_interval(predictions == labels),
        "test_macro_f1": macro_f1_interval(labels, predictions),
        "correct": predictions == labels,
        "learning_rate": results["settings"]["profile"]["learning_rate"],
    }


def compare_methods(settings: Settings, root: str | Path, budget: Budget | None = None) -> list[dict[str, Any]]:
    """Train every method of the budget (one process each), or reuse this comparison's run already trained on it.

    Then time all of them, plus the QLoRA adapter merged into its dequantized
    base (an inference-only row), in interleaved rounds on the same texts, and
    save the rows to ``root/comparison.json`` (``load_comparison``).
    """
    budget = budget or budget_for(settings)
    root = Path(root)
    load_before = os.getloadavg()[0]
    runs = {method: trained_results(settings, method, root, budget) for method in budget.methods}
    models = {method.label: load_for_inference(settings, folder, results) for method, (folder, results) in runs.items()}
    models[MERGED] = merge_into_dequantized(settings, runs[QLORA][0])
    texts = list(load_splits(budget_settings(settings, budget))["test"]["text"][: budget.latency_texts])
    timings = interleaved_latencies_ms(
        models, load_tokenizer(settings), texts, rounds=budget.latency_rounds, max_length=settings.profile.max_length
    )
    labels = scored_labels(settings, budget)
    rows = [comparison_row(results, labels, timings[method.label]) for method, (_, results) in runs.items()]
    rows.append({"method": MERGED, "latency_ms": spread(timings[MERGED]), "latency_samples": timings[MERGED].tolist()})
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
