"""Command line: ``python -m qlora_tutorial train [--profile ...] [--precision ...] [--no-lora]``.

The same pipeline the notebooks use (``qlora_tutorial.pipeline``), for a run
without Jupyter and for the benchmarks. The budget options (``--max-steps``,
``--test-rows``, ``--eval-steps``, ``--learning-rate``, ``--pad-to-max-length``)
let notebook 06 and ``benchmarks/compare_methods.py`` run every method on the
same smaller budget, each in its own process.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qlora_tutorial.modeling import QLORA_PRECISION, Precision, parse_precision
from qlora_tutorial.settings import PROFILES, load_settings, with_profile_changes


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer above zero."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """An ``argparse`` type: a number above zero."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one sub-command per job."""
    parser = argparse.ArgumentParser(prog="python -m qlora_tutorial", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="fine-tune on AG News, evaluate, save the adapter and results.json")
    train.add_argument("--profile", help=f"one of {', '.join(PROFILES)} (default: $QLORA_PROFILE, else gpu/cpu)")
    train.add_argument(
        "--precision",
        default=QLORA_PRECISION.value,
        help=f"base weights: {', '.join(p.value for p in Precision)} (default: {QLORA_PRECISION.value})",
    )
    train.add_argument("--no-lora", action="store_true", help="full fine-tuning instead of LoRA adapters")
    train.add_argument("--output-dir", default="runs/qlora", help="where the adapter and results.json go")
    train.add_argument("--data-dir", help="folder with train/test parquet files (default: $QLORA_DATA_DIR, else Hub)")
    train.add_argument("--max-steps", type=positive_int, help="stop after N steps (default: the profile's epochs)")
    train.add_argument("--test-rows", type=positive_int, help="sample this many test rows (default: the profile's)")
    train.add_argument("--learning-rate", type=positive_float, help="peak learning rate (default: the profile's)")
    train.add_argument("--eval-steps", type=positive_int, help="validate every N steps (default: each epoch)")
    train.add_argument(
        "--pad-to-max-length", action="store_true", help="pad every row to max length (the reference recipe)"
    )
    return parser


def profile_changes(arguments: argparse.Namespace) -> dict[str, Any]:
    """The profile fields the options change (only those given)."""
    changes = {"test_rows": arguments.test_rows, "learning_rate": arguments.learning_rate}
    return {name: value for name, value in changes.items() if value is not None}


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


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the job, print its summary."""
    arguments = build_parser().parse_args(argv)
    from qlora_tutorial.pipeline import check_method, format_summary, train_and_evaluate

    try:
        settings = with_profile_changes(
            load_settings(arguments.profile, data_dir=arguments.data_dir), **profile_changes(arguments)
        )
        precision = parse_precision(arguments.precision)
        check_method(precision, use_lora=not arguments.no_lora)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(settings.table(), flush=True)

    results = train_and_evaluate(
        settings,
        arguments.output_dir,
        precision,
        use_lora=not arguments.no_lora,
        pad_to_max_length=arguments.pad_to_max_length,
        **training_overrides(arguments),
    )
    print("\n" + format_summary(results))
    print(f"\nSaved to {arguments.output_dir} (results.json beside the weights).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
