"""Command line: ``python -m qlora_tutorial train [--profile ...] [--precision ...] [--no-lora] [...]``.

The same pipeline the notebooks use (``qlora_tutorial.pipeline``), for a run
without Jupyter and for the benchmarks. Every budget field of the profile has an
option (``--test-rows``, ``--learning-rate``, ``--max-length``, ...), and
``--model``/``--revision`` choose the model, so notebook 06 and
``benchmarks/compare_methods.py`` can run each method in its own process with
exactly the parent's settings (``comparison.train_command`` writes the command).
``--max-steps`` and ``--eval-steps`` set the ``Trainer``'s step budget, and
``--target-modules`` where the adapters go (``all-linear``: every linear layer,
notebook 06's fourth method).

A mistake in the input (an unknown profile or precision, a missing folder, a
data file with the wrong columns or types, a model path that does not exist)
ends in one ``error: ...`` line on stderr and exit status 2, before any model
loads (target modules that match no layer of the model: once it has loaded);
no traceback, since it is not a bug.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora_tutorial.cli_types import (
    fail,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from qlora_tutorial.decoder_profile import DECODER_MODEL_ENV
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.memory_cli import MEMORY_COMMANDS, add_memory_parsers, run_memory_command
from qlora_tutorial.modeling import (
    QLORA_PRECISION,
    REFERENCE_TARGETS,
    Precision,
    parse_precision,
    reference_lora_config,
)
from qlora_tutorial.settings import (
    MODEL_ENV,
    PROFILES,
    Settings,
    load_settings,
    profile_option,
    with_profile_changes,
)
from qlora_tutorial.sources import check_model_name

MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def target_modules(text: str) -> str | tuple[str, ...]:
    """An ``argparse`` type: ``all-linear``, or layer names separated by commas (``query,key,value``)."""
    if text == "all-linear":
        return text
    names = tuple(text.split(","))
    if not all(MODULE_NAME.fullmatch(name) for name in names):
        raise argparse.ArgumentTypeError(
            f"must be all-linear or layer names separated by commas, e.g. {','.join(REFERENCE_TARGETS)}; got {text!r}"
        )
    return names


def rows_or_all(text: str) -> int | None:
    """An ``argparse`` type: a positive number of rows, or ``all`` (``None``: every row)."""
    return None if text == "all" else positive_int(text)


# One option per budget field of a Profile (tests/test_cli.py checks that none is missing): the type that
# parses it, and its help. comparison.train_command spells each changed field the same way (profile_option).
PROFILE_OPTIONS: dict[str, tuple[Callable[[str], Any], str]] = {
    "train_pool_rows": (rows_or_all, "rows drawn from the official train split before the split ('all': every row)"),
    "test_rows": (rows_or_all, "rows sampled from the official test split ('all': every row)"),
    "validation_fraction": (fraction, "share of the drawn rows kept for validation"),
    "epochs": (positive_float, "training epochs"),
    "batch_size": (positive_int, "training batch size"),
    "eval_batch_size": (positive_int, "evaluation batch size"),
    "learning_rate": (positive_float, "peak learning rate"),
    "warmup_ratio": (non_negative_float, "share of the steps spent warming the learning rate up"),
    "weight_decay": (non_negative_float, "AdamW weight decay"),
    "logging_steps": (positive_int, "log the training loss every N steps"),
    "max_length": (positive_int, "truncate texts at N tokens"),
    "seed": (non_negative_int, "seed of the sampling, the initialisation and the Trainer"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one sub-command per job."""
    parser = argparse.ArgumentParser(
        prog="python -m qlora_tutorial", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune on AG News, evaluate, save the adapter and results.json")
    train.add_argument("--profile", help=f"one of {', '.join(PROFILES)} (default: $QLORA_PROFILE, else gpu/cpu)")
    train.add_argument(
        "--precision",
        default=QLORA_PRECISION.value,
        help=f"base weights: {', '.join(p.value for p in Precision)} (default: {QLORA_PRECISION.value})",
    )
    train.add_argument("--no-lora", action="store_true", help="full fine-tuning instead of LoRA adapters")
    train.add_argument(
        "--target-modules",
        type=target_modules,
        help=f"the layers that get adapters: all-linear, or names such as {','.join(REFERENCE_TARGETS)} "
        "(default: query,value)",
    )
    train.add_argument("--model", help=f"a model folder or Hub id (default: ${MODEL_ENV}, else the profile's)")
    train.add_argument("--revision", help="the Hub revision of the model (default: the profile's pin, if any)")
    train.add_argument(
        "--output-dir",
        help="where the adapter and results.json go (default: runs/<profile>/qlora for QLoRA nf4-dq, "
        "runs/<profile>/<method> for another method, e.g. full-fp32)",
    )
    train.add_argument("--data-dir", help="folder with train/test parquet files (default: $QLORA_DATA_DIR, else Hub)")
    budget = train.add_argument_group("budget", "each defaults to the profile's value")
    for name, (parse, help_text) in PROFILE_OPTIONS.items():
        budget.add_argument(profile_option(name), dest=name, type=parse, default=argparse.SUPPRESS, help=help_text)
    budget.add_argument("--max-steps", type=positive_int, help="stop after N steps (default: the profile's epochs)")
    budget.add_argument("--eval-steps", type=positive_int, help="validate every N steps (default: each epoch)")
    budget.add_argument(
        "--pad-to-max-length", action="store_true", help="pad every row to max length (the reference recipe)"
    )
    add_decoder_parser(commands)
    add_memory_parsers(commands)
    return parser


def add_decoder_parser(commands: argparse._SubParsersAction) -> None:
    """``train-decoder``: notebook 08's instruction tuning of the decoder, as ``train`` is 04's classifier."""
    decoder = commands.add_parser(
        "train-decoder", help="instruction-tune the decoder LLM (notebook 08) on AG News, save the adapter"
    )
    decoder.add_argument("--profile", help=f"one of {', '.join(PROFILES)} (default: $QLORA_PROFILE, else gpu/cpu)")
    decoder.add_argument(
        "--precision",
        default=QLORA_PRECISION.value,
        help=f"base weights: fp32 for LoRA, {QLORA_PRECISION.value} for QLoRA (default: {QLORA_PRECISION.value})",
    )
    decoder.add_argument(
        "--model",
        help=f"a decoder folder or Hub id, e.g. meta-llama/Llama-3.1-8B-Instruct (gated: set HF_TOKEN) "
        f"(default: ${DECODER_MODEL_ENV}, else the profile's SmolLM2)",
    )
    decoder.add_argument("--revision", help="the Hub revision of the decoder")
    decoder.add_argument("--data-dir", help="folder with train/test parquet files (default: $QLORA_DATA_DIR, else Hub)")
    decoder.add_argument("--steps", type=positive_int, help="optimizer steps (default: the profile's)")
    decoder.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="recompute activations in the backward pass (default: the profile's, on for gpu)",
    )
    decoder.add_argument("--output-dir", help="where the adapter and results.json go (default: runs/<profile>/decoder)")


def profile_changes(arguments: argparse.Namespace) -> dict[str, Any]:
    """The profile fields the options change: only those given (``all`` rows is a change to ``None``)."""
    given = vars(arguments)
    return {name: given[name] for name in PROFILE_OPTIONS if name in given}


def training_overrides(arguments: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainingArguments`` fields the options change (only those given).

    A step budget that ends mid-epoch would make the ``Trainer`` validate at
    the stop and the pipeline validate again; without ``--eval-steps`` it
    validates once, at the end.
    """
    overrides: dict[str, Any] = {}
    if arguments.max_steps is not None:
        overrides.update(max_steps=arguments.max_steps, eval_strategy="no")
    if arguments.eval_steps is not None:
        overrides.update(eval_strategy="steps", eval_steps=arguments.eval_steps)
    return overrides


def settings_from_arguments(arguments: argparse.Namespace) -> Settings:
    """The run's settings: the profile, model and data the options name, with the budget options applied."""
    settings = load_settings(
        arguments.profile, data_dir=arguments.data_dir, model=arguments.model, revision=arguments.revision
    )
    return with_profile_changes(settings, **profile_changes(arguments))


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, check every input, run the job, print its summary."""
    arguments = build_parser().parse_args(argv)
    if arguments.command == "train-decoder":
        return train_decoder_command(arguments)
    if arguments.command in MEMORY_COMMANDS:
        return run_memory_command(arguments)
    from qlora_tutorial.comparison import QLORA, Method
    from qlora_tutorial.distributed import is_first_rank
    from qlora_tutorial.pipeline import format_summary, train_and_evaluate

    try:
        settings = settings_from_arguments(arguments)
        method = Method(
            parse_precision(arguments.precision),
            use_lora=not arguments.no_lora,
            target_modules=arguments.target_modules,
        )
    except UserInputError as error:  # an unknown profile or precision, a missing folder, a bad model name
        return fail(error)
    default_dir = settings.run_dir("qlora" if method == QLORA else method.slug)
    output_dir = Path(arguments.output_dir) if arguments.output_dir else default_dir
    targets = method.target_modules
    lora_config = None if targets is None else reference_lora_config(target_modules=targets)
    first_rank = is_first_rank()  # under `accelerate launch`, every process runs this: only one speaks
    if first_rank:
        print(settings.table(), flush=True)
    try:
        results = train_and_evaluate(
            settings,
            output_dir,
            method.precision,
            use_lora=method.use_lora,
            lora_config=lora_config,
            pad_to_max_length=arguments.pad_to_max_length,
            **training_overrides(arguments),
        )
    except UserInputError as error:  # a data file the checks refuse, or target modules that match no layer
        return fail(error)
    if first_rank:
        print("\n" + format_summary(results))
        print(f"\nSaved to {output_dir} (results.json beside the weights).")
    return 0


def train_decoder_command(arguments: argparse.Namespace) -> int:
    """Run ``train-decoder``: check the inputs, train, print what the run measured."""
    from qlora_tutorial.decoder_pipeline import train_decoder
    from qlora_tutorial.decoder_profile import decoder_profile
    from qlora_tutorial.memory import format_bytes

    try:
        settings = load_settings(arguments.profile, data_dir=arguments.data_dir)
        precision = parse_precision(arguments.precision)
        changes: dict[str, Any] = {"steps": arguments.steps} if arguments.steps else {}
        if arguments.model:
            check_model_name(arguments.model, "--model")
            changes.update(model_name=arguments.model, model_revision=arguments.revision)
        profile = decoder_profile(settings, **changes)
    except UserInputError as error:
        return fail(error)
    output_dir = Path(arguments.output_dir) if arguments.output_dir else settings.run_dir("decoder")
    print(settings.table(), flush=True)
    try:
        results = train_decoder(
            settings, profile, output_dir, precision, gradient_checkpointing=arguments.gradient_checkpointing
        )
    except UserInputError as error:  # a data file the checks refuse, a missing decoder package, a gated model
        return fail(error)
    print(
        f"\n{results['method']}: {results['train_steps']} steps, {results['tokens_per_second']:.0f} tokens/s, "
        f"peak memory {format_bytes(results['peak_memory_bytes'])}; saved to {output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
