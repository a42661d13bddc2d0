"""The whole run in one function: load, quantize, attach LoRA, train, evaluate, save.

``python -m qlora_tutorial train`` calls it; notebooks 04 and 06 and the
benchmarks reuse it, so a number in the README and one in a notebook come
from the same code.
"""

from __future__ import annotations

from pathlib import Path
from time import perf_counter
from typing import Any

from peft import LoraConfig
from transformers import Trainer

from qlora_tutorial.data import load_splits, tokenize_splits
from qlora_tutorial.distributed import data_parallel_arguments, parallel_record
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.memory import (
    count_parameters,
    format_bytes,
    optimizer_state_bytes,
    paged_state_bytes,
    peak_memory_bytes,
    reset_peak_memory,
    resident_bytes,
    weight_memory,
)
from qlora_tutorial.modeling import (
    QLORA_PRECISION,
    Precision,
    attach_lora,
    load_classifier,
    load_tokenizer,
    parse_precision,
)
from qlora_tutorial.settings import Settings
from qlora_tutorial.timing import StepTimer
from qlora_tutorial.training import make_trainer, save_results, settings_record

PEAK_KINDS = {
    "cpu": "process peak RSS",
    "cuda": "CUDA max allocated + paged optimizer state",
}


def check_method(precision: Precision, use_lora: bool) -> None:
    """Full fine-tuning needs trainable (full- or half-precision) base weights."""
    if not use_lora and precision.is_quantized:
        raise UserInputError(
            f"Full fine-tuning (--no-lora) cannot update {precision.value} weights: quantized weights are frozen. "
            "Use --precision fp32 (or bf16/fp16 on a GPU) with --no-lora, or drop --no-lora to train adapters."
        )


def method_name(precision: Precision, use_lora: bool) -> str:
    """A short label: ``full``, ``LoRA`` or ``QLoRA`` with the precision."""
    if not use_lora:
        return f"full fine-tuning ({precision.value})"
    return f"QLoRA ({precision.value})" if precision.is_quantized else f"LoRA ({precision.value} base)"


def final_validation(trainer: Trainer) -> dict[str, float] | None:
    """The validation metrics the ``Trainer`` logged at its last step, if it validated there (each epoch does)."""
    state = trainer.state
    logged = (entry for entry in reversed(state.log_history) if "eval_accuracy" in entry)
    return next((entry for entry in logged if entry.get("step") == state.global_step), None)


def train_and_evaluate(
    settings: Settings,
    output_dir: str | Path,
    precision: Precision | str = QLORA_PRECISION,
    *,
    use_lora: bool = True,
    lora_config: LoraConfig | None = None,
    pad_to_max_length: bool = False,
    **training_overrides: Any,
) -> dict[str, Any]:
    """Train one model as the settings say, evaluate it on validation and test, save it and its results.

    Returns the results that are also written to ``output_dir/results.json``.
    """
    precision = parse_precision(precision)
    check_method(precision, use_lora)
    started = perf_counter()
    baseline_bytes = resident_bytes(settings.device)
    splits = load_splits(settings)
    tokenizer = load_tokenizer(settings)
    tokenized = tokenize_splits(splits, tokenizer, settings.profile.max_length, pad_to_max_length=pad_to_max_length)
    reset_peak_memory(settings.device)
    model = load_classifier(settings, precision)
    weights = weight_memory(model)
    if use_lora:
        model = attach_lora(model, lora_config)
    parameters = count_parameters(model)
    overrides = {**data_parallel_arguments(settings), **training_overrides}  # under accelerate launch too (notebook 07)
    trainer = make_trainer(model, settings, tokenized, tokenizer, output_dir, **overrides)
    step_timer = StepTimer()
    trainer.add_callback(step_timer)
    peak_before_training = peak_memory_bytes(settings.device)
    train_started = perf_counter()
    train_output = trainer.train()
    train_seconds = perf_counter() - train_started
    paged = paged_state_bytes(trainer.optimizer)  # CUDA's peak does not see paged optimizer state
    peak_after_training = peak_memory_bytes(settings.device) + paged
    validation = final_validation(trainer) or trainer.evaluate()
    test_started = perf_counter()
    test = trainer.predict(tokenized["test"], metric_key_prefix="test")
    test_seconds = perf_counter() - test_started
    writes = trainer.is_world_process_zero()  # one copy of the files under accelerate launch: rank 0's
    if writes:
        trainer.model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    results = {
        "method": method_name(precision, use_lora),
        "precision": precision.value,
        "lora": use_lora,
        "rows": {name: len(split) for name, split in splits.items()},
        "validation_accuracy": validation["eval_accuracy"],
        "validation_macro_f1": validation["eval_macro_f1"],
        "test_accuracy": test.metrics["test_accuracy"],
        "test_macro_f1": test.metrics["test_macro_f1"],
        "test_predictions": test.predictions.argmax(axis=-1).tolist(),
        "train_seconds": train_seconds,
        "train_steps": train_output.global_step,
        "train_examples_per_second": train_output.metrics["train_samples_per_second"],
        "step_seconds": step_timer.seconds,
        # timed here: in Jupyter the Trainer's NotebookProgressCallback pops its *_samples_per_second keys
        "test_examples_per_second": len(tokenized["test"]) / test_seconds,
        "weight_bytes": weights.total_bytes,
        "quant_state_bytes": weights.quant_state_bytes,
        "trainable_parameters": parameters.trainable,
        "total_parameters": parameters.total,
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "paged_optimizer_state_bytes": paged,
        "memory_baseline_bytes": baseline_bytes,
        "peak_before_training_bytes": peak_before_training,
        "peak_after_training_bytes": peak_after_training,
        "peak_memory_bytes": peak_memory_bytes(settings.device) + paged,
        "peak_memory_kind": PEAK_KINDS["cuda" if settings.device == "cuda" else "cpu"],
        "total_seconds": perf_counter() - started,
        "log_history": trainer.state.log_history,
        "settings": settings_record(settings),
        **parallel_record(trainer, settings.device),
    }
    if writes:
        save_results(output_dir, results)
    return results


def format_summary(results: dict[str, Any]) -> str:
    """One screen of the results a learner looks at first."""
    rows = [
        ("method", results["method"]),
        ("profile", results["settings"]["profile"]["name"]),
        ("rows (train/val/test)", "/".join(str(n) for n in results["rows"].values())),
        ("validation accuracy", f"{results['validation_accuracy']:.2%}"),
        ("test accuracy", f"{results['test_accuracy']:.2%}"),
        ("test macro-F1", f"{results['test_macro_f1']:.2%}"),
        ("train time", f"{results['train_seconds']:.0f} s ({results['train_steps']} steps)"),
        ("weight memory", format_bytes(results["weight_bytes"])),
        ("trainable parameters", f"{results['trainable_parameters']:,} of {results['total_parameters']:,}"),
        ("optimizer state", format_bytes(results["optimizer_state_bytes"])),
        (f"peak memory ({results['peak_memory_kind']})", format_bytes(results["peak_memory_bytes"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
