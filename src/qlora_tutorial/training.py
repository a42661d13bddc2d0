"""Training with the transformers ``Trainer``, and saving what a run produced.

Taught in notebook 04, which builds the ``TrainingArguments`` and the
``Trainer`` in its own cells; ``training_arguments`` and ``make_trainer`` are
the same construction for the command line and notebook 06 (a test keeps the
notebook's arguments equal to ``training_arguments``). The ``Trainer`` runs the
loop, the evaluation each epoch and the progress bars; this module only
chooses its arguments for the profile (paged AdamW on CUDA, plain AdamW
elsewhere), measures a run around it (``RunRecord``) and saves the adapter
with a small JSON of results beside it.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PredictionOutput, TrainOutput

from qlora_tutorial.data import make_collator, shortest_first
from qlora_tutorial.distributed import parallel_record
from qlora_tutorial.memory import (
    count_parameters,
    optimizer_state_bytes,
    paged_state_bytes,
    peak_memory_bytes,
    reset_peak_memory,
    resident_bytes,
    weight_memory,
)
from qlora_tutorial.metrics import compute_metrics
from qlora_tutorial.settings import Settings
from qlora_tutorial.timing import StepTimer

RESULTS_FILE = "results.json"
STACK = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "scikit-learn")
PEAK_KINDS = {
    "cpu": "process peak RSS",
    "cuda": "CUDA max allocated + paged optimizer state",
}


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
        "disable_tqdm": False,  # unset, transformers hides the bars whenever its logging is quieter than warnings
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
        eval_dataset=shortest_first(tokenized["validation"])[0],  # the metrics do not depend on the order
        data_collator=make_collator(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )


def predict_shortest_first(trainer: Trainer, dataset: Dataset, metric_key_prefix: str = "test") -> PredictionOutput:
    """``trainer.predict`` over the rows sorted by length (``data.shortest_first``), returned in the dataset's order.

    The same predictions and metrics as ``trainer.predict(dataset)``, in about
    half the time on AG News, because each batch pads less.
    """
    ordered, order = shortest_first(dataset)
    output = trainer.predict(ordered, metric_key_prefix=metric_key_prefix)
    restore = np.argsort(order)
    label_ids = None if output.label_ids is None else output.label_ids[restore]
    return PredictionOutput(output.predictions[restore], label_ids, output.metrics)


def final_validation(trainer: Trainer) -> dict[str, float] | None:
    """The validation metrics the ``Trainer`` logged at its last step, if it validated there (each epoch does)."""
    state = trainer.state
    logged = (entry for entry in reversed(state.log_history) if "eval_accuracy" in entry)
    return next((entry for entry in logged if entry.get("step") == state.global_step), None)


class RunRecord(StepTimer):
    """What ``results.json`` keeps about one training run, measured around the ``Trainer`` without changing it.

    Taught in notebook 04. Create it before the model is loaded (it starts the
    clock and reads the memory baseline), give it the base model once loaded
    (``measure_weights``, before adapters are attached), pass it to the
    ``Trainer`` in ``callbacks`` (it times every optimizer step, as
    ``timing.StepTimer``, and reads the peak memory when training starts and
    ends), and after ``trainer.train()`` call ``finish``: it takes the last
    validation, predicts the test split once, saves the adapter (or model) and
    the tokenizer, and writes ``results.json``.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.started = perf_counter()
        self.baseline_bytes = resident_bytes(settings.device)
        reset_peak_memory(settings.device)
        self.peak_at_start = peak_memory_bytes(settings.device)  # above the baseline: the reset failed
        self.weights: dict[str, int] | None = None
        self.peak_before_training = 0
        self.peak_after_training = 0
        self.train_seconds = 0.0
        self._train_started = 0.0

    def measure_weights(self, model: PreTrainedModel) -> None:
        """The base model's weight memory (quantization state included), before any adapter is attached."""
        weights = weight_memory(model)
        self.weights = {"weight_bytes": weights.total_bytes, "quant_state_bytes": weights.quant_state_bytes}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """The peak so far (the model loaded, nothing trained), and the start of the training clock."""
        self.peak_before_training = peak_memory_bytes(self.settings.device)
        self._train_started = perf_counter()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """The training clock (the evaluations each epoch included) and the peak with the optimizer state."""
        self.train_seconds = perf_counter() - self._train_started
        optimizer = kwargs.get("optimizer")
        paged = paged_state_bytes(optimizer) if optimizer is not None else 0
        self.peak_after_training = peak_memory_bytes(self.settings.device) + paged  # CUDA's peak misses paged state

    def base_weights(self) -> dict[str, int]:
        """The base model's weight memory from ``measure_weights``; a clear error when it was never measured."""
        if self.weights is None:
            raise RuntimeError("Call measure_weights(base_model) after loading the base model, before training.")
        return self.weights

    def measurements(self, trainer: Trainer) -> dict[str, Any]:
        """What every run's results hold, whatever it trained (the classifier here, notebook 08's decoder).

        The base's weights, the parameters and the optimizer state, the memory
        baseline and peaks (paged optimizer state added: CUDA's peak misses
        it), the training log and the settings. Read when the run is done.
        """
        device = self.settings.device
        parameters = count_parameters(trainer.model)
        paged = paged_state_bytes(trainer.optimizer)
        return {
            **self.base_weights(),
            "trainable_parameters": parameters.trainable,
            "total_parameters": parameters.total,
            "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
            "paged_optimizer_state_bytes": paged,
            "memory_baseline_bytes": self.baseline_bytes,
            "peak_at_start_bytes": self.peak_at_start,
            "peak_before_training_bytes": self.peak_before_training,
            "peak_after_training_bytes": self.peak_after_training,
            "peak_memory_bytes": peak_memory_bytes(device) + paged,
            "peak_memory_kind": PEAK_KINDS["cuda" if device == "cuda" else "cpu"],
            "log_history": trainer.state.log_history,
            "settings": settings_record(self.settings),
        }

    def finish(
        self,
        trainer: Trainer,
        train_output: TrainOutput,
        splits: DatasetDict,
        tokenized: DatasetDict,
        output_dir: str | Path,
        *,
        method: str,
        precision: str,
        lora: bool,
    ) -> dict[str, Any]:
        """Validate (the last epoch's metrics), predict the test split, save the model and ``results.json``.

        ``method``, ``precision`` and ``lora`` say what was trained
        (``pipeline.method_name``). Returns the results also written to
        ``output_dir/results.json``.
        """
        self.base_weights()  # before the test split is predicted: fail early when the weights were never measured
        device = self.settings.device
        validation = final_validation(trainer) or trainer.evaluate()
        test_started = perf_counter()
        test = predict_shortest_first(trainer, tokenized["test"])
        test_seconds = perf_counter() - test_started
        writes = trainer.is_world_process_zero()  # one copy of the files under accelerate launch: rank 0's
        if writes:
            trainer.model.save_pretrained(output_dir)
            if trainer.processing_class is not None:
                trainer.processing_class.save_pretrained(output_dir)
        results = {
            "method": method,
            "precision": precision,
            "lora": lora,
            "rows": {name: len(split) for name, split in splits.items()},
            "validation_accuracy": validation["eval_accuracy"],
            "validation_macro_f1": validation["eval_macro_f1"],
            "test_accuracy": test.metrics["test_accuracy"],
            "test_macro_f1": test.metrics["test_macro_f1"],
            "test_predictions": test.predictions.argmax(axis=-1).tolist(),
            "train_seconds": self.train_seconds,
            "train_steps": train_output.global_step,
            "train_examples_per_second": train_output.metrics["train_samples_per_second"],
            "step_seconds": self.seconds,
            # timed here: in Jupyter the Trainer's NotebookProgressCallback pops its *_samples_per_second keys
            "test_examples_per_second": len(tokenized["test"]) / test_seconds,
            **self.measurements(trainer),
            "total_seconds": perf_counter() - self.started,
            **parallel_record(trainer, device),
        }
        if writes:
            save_results(output_dir, results)
        return results


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
