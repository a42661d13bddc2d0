"""Training with the transformers ``Trainer``, and saving what a run produced.

Taught in notebook 04. The ``Trainer`` runs the loop, the evaluation each
epoch and the progress bars; this module only chooses its arguments for the
profile (paged AdamW on CUDA, plain AdamW elsewhere) and saves the adapter
with a small JSON of results beside it.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from qlora_tutorial.data import make_collator
from qlora_tutorial.metrics import compute_metrics
from qlora_tutorial.settings import Settings

RESULTS_FILE = "results.json"
STACK = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "scikit-learn")


def training_arguments(settings: Settings, output_dir: str | Path, **overrides: Any) -> TrainingArguments:
    """The ``TrainingArguments`` of the profile; ``overrides`` change single fields (e.g. ``max_steps``)."""
    profile = settings.profile
    on_gpu = settings.device == "cuda"
    arguments: dict[str, Any] = {
        "output_dir": str(output_dir),
        "num_train_epochs": profile.epochs,
        "per_device_train_batch_size": profile.batch_size,
        "per_device_eval_batch_size": profile.eval_batch_size,
        "learning_rate": profile.learning_rate,
        "lr_scheduler_type": "linear",
        "warmup_steps": profile.warmup_ratio,
        "weight_decay": profile.weight_decay,
        "optim": settings.optimizer,
        "eval_strategy": "epoch",
        "save_strategy": "no",
        "logging_strategy": "steps",
        "logging_steps": profile.logging_steps,
        "report_to": "none",
        "seed": profile.seed,
        "data_seed": profile.seed,
        "bf16": on_gpu and settings.compute_dtype == torch.bfloat16,
        "fp16": on_gpu and settings.compute_dtype == torch.float16,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": on_gpu,
    }
    arguments.update(overrides)
    return TrainingArguments(**arguments)


def make_trainer(
    model: PreTrainedModel,
    settings: Settings,
    tokenized: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    **overrides: Any,
) -> Trainer:
    """A ``Trainer`` over the tokenized train and validation splits, with dynamic padding and our metrics."""
    return Trainer(
        model=model,
        args=training_arguments(settings, output_dir, **overrides),
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        data_collator=make_collator(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )


def library_versions() -> dict[str, str]:
    """Versions of the pinned stack, for the results file."""
    versions = {name: version(name) for name in STACK}
    versions["python"] = platform.python_version()
    return versions


def settings_record(settings: Settings) -> dict[str, Any]:
    """The settings as JSON-ready values."""
    return {
        "profile": asdict(settings.profile),
        "model_name": settings.model_name,
        "model_revision": settings.model_revision,
        "data_dir": str(settings.data_dir) if settings.data_dir else None,
        "device": settings.device,
        "compute_dtype": str(settings.compute_dtype).removeprefix("torch."),
        "optimizer": settings.optimizer,
    }


def save_results(output_dir: str | Path, results: dict[str, Any]) -> Path:
    """Write ``results.json`` (with library versions added) into ``output_dir``."""
    path = Path(output_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**results, "versions": library_versions()}, indent=2) + "\n")
    return path


def load_results(output_dir: str | Path) -> dict[str, Any]:
    """Read a run's ``results.json``."""
    path = Path(output_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No {RESULTS_FILE} in {output_dir}. "
            f"Train first: `python -m qlora_tutorial train --output-dir {output_dir}`."
        )
    return json.loads(path.read_text())
