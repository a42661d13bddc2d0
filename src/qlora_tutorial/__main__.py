"""Command line: ``python -m qlora_tutorial train [--profile ...] [--precision ...] [--no-lora]``.

The same pipeline the notebooks use (``qlora_tutorial.pipeline``), for a run
without Jupyter and for the benchmarks.
"""

from __future__ import annotations

import argparse
import sys

from qlora_tutorial.modeling import QLORA_PRECISION, Precision, parse_precision
from qlora_tutorial.settings import PROFILES, load_settings


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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the job, print its summary."""
    arguments = build_parser().parse_args(argv)
    try:
        settings = load_settings(arguments.profile, data_dir=arguments.data_dir)
        precision = parse_precision(arguments.precision)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(settings.table(), flush=True)
    from qlora_tutorial.pipeline import format_summary, train_and_evaluate

    results = train_and_evaluate(settings, arguments.output_dir, precision, use_lora=not arguments.no_lora)
    print("\n" + format_summary(results))
    print(f"\nSaved to {arguments.output_dir} (results.json beside the weights).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
