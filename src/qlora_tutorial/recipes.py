"""The usual BERT fine-tuning recipe against this series': QLoRA trained with each on one budget, side by side.

Notebook 04 teaches the two choices that differ (dynamic padding, section 2;
the learning rate, section 5) and notebook 00 (section 2) states both recipes; only
``make benchmark`` (``benchmarks/compare_methods.py``) trains them, and the
README reports the result. The reference recipe pads every batch to the
maximum length and trains at 5e-5, the usual BERT fine-tuning rate; ours pads
each batch to its longest text and trains at the profile's rate. Both runs
are QLoRA on the same budget (``comparison.train_method``, a fresh process
each), validated every ``eval_steps``: the comparison is of recipes, not
methods, and states only what the curves and step times show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlora_tutorial.comparison import QLORA, Budget, budget_for, train_method
from qlora_tutorial.settings import Settings
from qlora_tutorial.timing import after_warmup
from qlora_tutorial.uncertainty import accuracy_interval, spread

REFERENCE_LEARNING_RATE = 5e-5  # BERT's usual full fine-tuning range (2e-5 to 5e-5), the reference recipe's rate


def validation_curve(results: dict[str, Any]) -> list[tuple[int, float]]:
    """(step, validation accuracy) for each evaluation the ``Trainer`` ran while training."""
    curve: list[tuple[int, float]] = []
    for entry in results["log_history"]:
        if "train_runtime" in entry:  # the end of trainer.train(); later entries are the final evaluations
            break
        if "eval_accuracy" in entry:
            curve.append((int(entry["step"]), float(entry["eval_accuracy"])))
    return curve


def left_chance(accuracy: float, rows: int, classes: int = 4) -> bool:
    """Whether a validation accuracy on ``rows`` rows is above chance: its 95% interval lies above 1/classes."""
    hits = round(accuracy * rows)
    return bool(accuracy_interval([True] * hits + [False] * (rows - hits)).low > 1 / classes)


def compare_recipe_runs(reference: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """What the reference recipe reached, how soon ours reached it, and what padding costs per step.

    The per-step cost compares the two runs' median step times (both QLoRA on
    the same model: only the padding changes the work, not the rate).
    """
    curves = {"reference": validation_curve(reference), "ours": validation_curve(ours)}
    for name, curve in curves.items():
        if not curve:
            raise ValueError(f"The {name} run has no validation during training: train it with --eval-steps.")
    validation_rows = reference["rows"]["validation"]
    final = reference["validation_accuracy"]
    steps_needed = next((step for step, accuracy in curves["ours"] if accuracy >= final), None)
    step_seconds = {
        name: spread(after_warmup(run["step_seconds"])) for name, run in (("reference", reference), ("ours", ours))
    }
    return {
        "reference_steps": reference["train_steps"],
        "reference_final_validation_accuracy": final,
        "reference_left_chance": left_chance(final, validation_rows),
        "ours_steps_to_reference_accuracy": steps_needed,
        "ours_seconds_to_reference_accuracy": None
        if steps_needed is None
        else steps_needed * step_seconds["ours"].median,
        "ours_final_validation_accuracy": ours["validation_accuracy"],
        "step_seconds": step_seconds,
        "padding_step_cost": step_seconds["reference"].median / step_seconds["ours"].median,
        "curves": curves,
    }


def compare_recipes(settings: Settings, root: str | Path, budget: Budget | None = None) -> dict[str, Any]:
    """QLoRA trained with the reference recipe and with ours on the same full budget, validating every ``eval_steps``.

    Reference: every row padded to the maximum length, learning rate 5e-5.
    Ours: dynamic padding, the profile's learning rate.
    """
    budget = budget or budget_for(settings)
    root = Path(root)
    every = ("--eval-steps", str(budget.eval_steps))
    reference_options = ("--pad-to-max-length", "--learning-rate", str(REFERENCE_LEARNING_RATE))
    reference = train_method(settings, QLORA, root / "reference", budget, *every, *reference_options)
    ours = train_method(settings, QLORA, root / "ours", budget, *every)
    return {
        "reference_recipe": f"pad to {settings.profile.max_length} tokens, learning rate {REFERENCE_LEARNING_RATE:g}",
        "our_recipe": f"dynamic padding, learning rate {settings.profile.learning_rate:g}",
        **compare_recipe_runs(reference, ours),
    }


def recipe_summary(recipes: dict[str, Any]) -> str:
    """The recipe comparison in Markdown sentences that state only what was measured."""
    steps, final = recipes["reference_steps"], recipes["reference_final_validation_accuracy"]
    if recipes["reference_left_chance"]:
        reached = f"reached {final:.1%} validation accuracy after {steps} steps"
    else:
        reached = f"never left chance in {steps} steps (final validation accuracy {final:.1%})"
    needed = recipes["ours_steps_to_reference_accuracy"]
    ours = (
        f"Ours reached that accuracy at its first validation at or above it, step {needed} "
        f"({recipes['ours_seconds_to_reference_accuracy']:.0f} s of training at its median step time)"
        if needed is not None
        else "Ours never reached that accuracy"
    )
    timing = recipes["step_seconds"]
    return (
        f"QLoRA with the usual BERT fine-tuning recipe ({recipes['reference_recipe']}) {reached}. {ours}, and ended at "
        f"{recipes['ours_final_validation_accuracy']:.1%}. Per step, padding to the maximum length costs "
        f"{recipes['padding_step_cost']:.2f}x the time of dynamic padding "
        f"({timing['reference'].format('s')} against {timing['ours'].format('s')})."
    )
