"""The whole run in one function: load, quantize, attach LoRA, train, evaluate, save.

``python -m qlora_tutorial train`` calls it, and through it notebook 06, notebook 07
and the benchmark; notebook 05 calls it when no adapter was saved. Notebook 04
writes the same steps out in its own cells (``training.RunRecord``,
``tests/test_trainer_in_view.py``), so a number in the README and one in a
notebook come from the same code.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from peft import LoraConfig
from peft.utils.error import NoMatchingPeftModuleError

from qlora_tutorial.data import load_splits, tokenize_splits
from qlora_tutorial.distributed import data_parallel_arguments
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.memory import format_bytes
from qlora_tutorial.modeling import (
    QLORA_PRECISION,
    REFERENCE_TARGETS,
    Precision,
    attach_lora,
    load_classifier,
    load_tokenizer,
    parse_precision,
)
from qlora_tutorial.settings import Settings
from qlora_tutorial.training import RunRecord, make_trainer


def check_method(precision: Precision, use_lora: bool) -> None:
    """Full fine-tuning needs trainable (full- or half-precision) base weights."""
    if not use_lora and precision.is_quantized:
        raise UserInputError(
            f"Full fine-tuning (--no-lora) cannot update {precision.value} weights: quantized weights are frozen. "
            "Use --precision fp32 (or bf16/fp16 on a GPU) with --no-lora, or drop --no-lora to train adapters."
        )


def method_name(precision: Precision, use_lora: bool, target_modules: str | Collection[str] | None = None) -> str:
    """A short label: ``full``, ``LoRA`` or ``QLoRA`` with the precision, and the adapted layers unless the reference's.

    ``target_modules`` as ``LoraConfig`` takes it: ``None`` or query and value
    (the reference recipe) add nothing, ``"all-linear"`` adds "all linear
    layers" (notebook 06), a list of names adds them, sorted.
    """
    if not use_lora:
        return f"full fine-tuning ({precision.value})"
    where = f"{precision.value}" if precision.is_quantized else f"{precision.value} base"
    if target_modules == "all-linear":
        where += ", all linear layers"
    elif target_modules is not None and set(target_modules) != set(REFERENCE_TARGETS):
        where += f", on {', '.join(sorted(target_modules))}"
    return f"{'QLoRA' if precision.is_quantized else 'LoRA'} ({where})"


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

    The same steps as notebook 04's cells (``RunRecord`` measures around the
    ``Trainer``). Returns the results that are also written to
    ``output_dir/results.json``.
    """
    precision = parse_precision(precision)
    check_method(precision, use_lora)
    record = RunRecord(settings)
    splits = load_splits(settings)
    tokenizer = load_tokenizer(settings)
    tokenized = tokenize_splits(splits, tokenizer, settings.profile.max_length, pad_to_max_length=pad_to_max_length)
    model = load_classifier(settings, precision)
    record.measure_weights(model)
    targets = None if lora_config is None else lora_config.target_modules
    if use_lora:
        try:
            model = attach_lora(model, lora_config)
        except NoMatchingPeftModuleError as error:  # the names a learner passed match no layer of this model
            named = targets if isinstance(targets, str) else ", ".join(sorted(targets or ()))
            raise UserInputError(
                f"No layer of {settings.model_name} matches the target modules {named}. Name its "
                "linear layers (a BERT's are query, key, value and dense), or pass all-linear."
            ) from error
    overrides = {**data_parallel_arguments(settings), **training_overrides}  # under accelerate launch too (notebook 07)
    trainer = make_trainer(model, settings, tokenized, tokenizer, output_dir, **overrides)
    trainer.add_callback(record)
    train_output = trainer.train()
    return record.finish(
        trainer,
        train_output,
        splits,
        tokenized,
        output_dir,
        method=method_name(precision, use_lora, targets),
        precision=precision.value,
        lora=use_lora,
    )


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
