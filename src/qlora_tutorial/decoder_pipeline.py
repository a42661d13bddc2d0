"""The decoder's run in one function: data as chat turns, load, attach LoRA, train with the ``Trainer``, save.

Taught in notebook 08, which writes the same steps out in its cells, as 04 does
for the classifier, and reuses this module for what it runs more than once
(its exercise trains two more adapters). ``python -m qlora_tutorial
train-decoder`` calls ``train_decoder``.

A run saves a checkpoint every ``save_steps`` steps into its output folder;
started again after an interruption (a Colab runtime that disconnected), it
resumes from the last one (``train_resuming``). The checkpoints are removed
once the run finishes: the adapter saved beside them is the result.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from transformers import (
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint

from qlora_tutorial.chat import instruction_collator, tokenize_instructions
from qlora_tutorial.data import load_splits, stratified_indices
from qlora_tutorial.decoder import attach_decoder_lora, decoder_config, load_decoder, load_decoder_tokenizer
from qlora_tutorial.decoder_fit import (
    available_memory,
    batch_verdicts,
    micro_batch_size,
    shape_from_config,
    training_spec,
)
from qlora_tutorial.decoder_profile import DecoderProfile
from qlora_tutorial.decoder_shipping import save_adapter
from qlora_tutorial.modeling import QLORA_PRECISION, Precision, parse_precision
from qlora_tutorial.settings import Settings
from qlora_tutorial.timing import after_warmup
from qlora_tutorial.training import RunRecord, save_results, training_arguments


def decoder_splits(settings: Settings, profile: DecoderProfile) -> DatasetDict:
    """``train``: a class-balanced sample of the classifier's training split; ``test``: one of its test split.

    The test rows are a subset of the rows the classifier of 04 and 05 is
    tested on, so the two models can be compared row by row (McNemar).
    """
    splits = load_splits(settings)
    seed = settings.profile.seed
    train = splits["train"].select(stratified_indices(np.asarray(splits["train"]["label"]), profile.train_rows, seed))
    test_rows = stratified_indices(np.asarray(splits["test"]["label"]), profile.eval_rows, seed)
    return DatasetDict(train=train, test=splits["test"].select(np.sort(test_rows)))


def decoder_training_arguments(
    settings: Settings, profile: DecoderProfile, output_dir: str | Path, **overrides: Any
) -> TrainingArguments:
    """The classifier's ``TrainingArguments`` (optimizer, precision flags, seeds) with the decoder's budget.

    No evaluation during training: the model is scored after it, on the test
    rows. ``include_num_input_tokens_seen`` counts the real (unpadded) tokens
    trained on, for the tokens-per-second figure. Gradient checkpointing is the
    profile's (on for `gpu`), and a checkpoint (adapter, optimizer and
    scheduler state) is saved every ``save_steps`` steps, only the last kept.
    """
    arguments: dict[str, Any] = {
        "max_steps": profile.steps,
        "per_device_train_batch_size": profile.batch_size,
        "learning_rate": profile.learning_rate,
        "warmup_steps": profile.warmup_steps,
        "eval_strategy": "no",
        "logging_steps": max(1, profile.steps // 10),
        "include_num_input_tokens_seen": "non_padding",
        "activation_checkpointing": profile.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "save_strategy": "steps",
        "save_steps": profile.save_steps,
        "save_total_limit": 1,
    }
    return training_arguments(settings, output_dir, **{**arguments, **overrides})


def decoder_trainer(
    model: Any, arguments: TrainingArguments, train: Dataset, tokenizer: PreTrainedTokenizerBase
) -> Trainer:
    """A ``Trainer`` over the instruction examples, padding each batch to its longest row (labels with -100)."""
    return Trainer(
        model=model,
        args=arguments,
        train_dataset=train,
        data_collator=instruction_collator(tokenizer),
        processing_class=tokenizer,
    )


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``Trainer``'s checkpoint folders (``checkpoint-<step>``) in ``output_dir``, none if it does not exist."""
    folder = Path(output_dir)
    return sorted(folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")) if folder.is_dir() else []


class NoFinalCheckpoint(TrainerCallback):
    """Skip the checkpoint the ``Trainer`` saves at the last step: the adapter is saved right after, and ships.

    For a 7-8B model that checkpoint is hundreds of MB of optimizer state,
    written only to be removed; in a short run (notebook 08's exercise) it would
    also be the only checkpoint, and its writing part of the run's time.
    """

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Cancel the save the default flow asked for, at the last step only."""
        if state.global_step >= state.max_steps:
            control.should_save = False


def train_resuming(trainer: Trainer) -> TrainOutput:
    """``trainer.train()``, resumed from the last checkpoint in its output folder if one is there.

    A checkpoint is left only by a run that did not finish, because a finished
    run removes its checkpoints here; so a run that was cut off continues where
    its last checkpoint was saved (the adapter, the optimizer's state, the
    learning-rate schedule and the data order), and any other run starts fresh.
    """
    output_dir = trainer.args.output_dir
    last = get_last_checkpoint(output_dir) if checkpoints(output_dir) else None
    if last is not None:
        print(f"resuming from {Path(last).name} (a run in {output_dir} was interrupted)", flush=True)
    trainer.add_callback(NoFinalCheckpoint)
    output = trainer.train(resume_from_checkpoint=last)
    for folder in checkpoints(output_dir):
        shutil.rmtree(folder)
    return output


def decoder_results(
    record: RunRecord, trainer: Trainer, train_output: TrainOutput, *, method: str, gradient_checkpointing: bool
) -> dict[str, Any]:
    """What a decoder run measured: step times and tokens per second, with ``RunRecord``'s weights and peaks."""
    tokens = trainer.state.num_input_tokens_seen
    return {
        "method": method,
        "gradient_checkpointing": gradient_checkpointing,
        "train_steps": train_output.global_step,
        "train_seconds": record.train_seconds,
        "step_seconds": record.seconds,
        "tokens_seen": tokens,
        "tokens_per_second": tokens / sum(record.seconds) if record.seconds else 0.0,
        "median_step_seconds": float(np.median(after_warmup(record.seconds))),
        "train_loss": train_output.training_loss,
        **record.measurements(trainer),
    }


def decoder_method_name(precision: Precision) -> str:
    """``QLoRA (nf4-dq)`` or ``LoRA (fp32 base)``."""
    return f"QLoRA ({precision.value})" if precision.is_quantized else f"LoRA ({precision.value} base)"


def train_decoder(
    settings: Settings,
    profile: DecoderProfile,
    output_dir: str | Path,
    precision: Precision | str = QLORA_PRECISION,
    *,
    gradient_checkpointing: bool | None = None,
) -> dict[str, Any]:
    """Fine-tune the decoder with LoRA on every linear layer, save the adapter and ``results.json``; return the results.

    The same steps as notebook 08's cells. ``precision`` fp32 gives LoRA on a
    full-precision base, nf4-dq gives QLoRA. ``gradient_checkpointing``
    ``None`` keeps the profile's. As in notebook 08, before the model loads the
    estimator picks the largest micro-batch that fits the device
    (``decoder_fit``), and gradient accumulation makes up the profile's batch;
    none fitting is refused (``RunWouldNotFit``) before anything is allocated.
    An interrupted run resumes (``train_resuming``).
    """
    precision = parse_precision(precision)
    if gradient_checkpointing is None:
        gradient_checkpointing = profile.gradient_checkpointing
    record = RunRecord(settings)
    tokenizer = load_decoder_tokenizer(settings, profile)
    train = tokenize_instructions(decoder_splits(settings, profile)["train"], tokenizer, profile.max_text_tokens)
    shape = shape_from_config(decoder_config(settings, profile), profile.model_name)
    spec = training_spec(settings, profile, shape, max(len(ids) for ids in train["input_ids"]))
    available, where = available_memory(settings)
    verdicts = batch_verdicts(replace(spec, gradient_checkpointing=gradient_checkpointing), available, where)
    micro_batch = micro_batch_size(verdicts)
    model = load_decoder(settings, profile, precision)
    record.measure_weights(model)
    model = attach_decoder_lora(model, settings, profile)
    arguments = decoder_training_arguments(
        settings,
        profile,
        output_dir,
        activation_checkpointing=gradient_checkpointing,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=profile.batch_size // micro_batch,
    )
    trainer = decoder_trainer(model, arguments, train, tokenizer)
    trainer.add_callback(record)
    train_output = train_resuming(trainer)
    save_adapter(trainer.model, tokenizer, output_dir)
    results = decoder_results(
        record,
        trainer,
        train_output,
        method=decoder_method_name(precision),
        gradient_checkpointing=gradient_checkpointing,
    )
    save_results(output_dir, results)
    return results
