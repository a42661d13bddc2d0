"""The command line's argument types and its one way to report a mistake in the input.

Shared by ``__main__`` (``train``, ``train-decoder``) and ``memory_cli``
(``measure``, ``fits``, notebook 09), which ``__main__`` imports, so they live
apart from both. A type raises ``argparse.ArgumentTypeError`` with what was
expected and what was given; ``fail`` prints a mistake as one ``error: ...``
line on stderr and returns the exit status argparse uses for a bad option.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USER_ERROR = 2  # as argparse exits for a bad option


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer above zero."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An ``argparse`` type: an integer of zero or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """An ``argparse`` type: a number above zero."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """An ``argparse`` type: a number of zero or more."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    """An ``argparse`` type: a number strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {text}")
    return value


def fail(error: Exception) -> int:
    """Print a mistake in the input as one line on stderr; return the exit status."""
    print(f"error: {error}", file=sys.stderr)
    return EXIT_USER_ERROR
