"""The recipe comparison of ``make benchmark`` (``qlora_tutorial.recipes``), on made-up results (no training)."""

from __future__ import annotations

import pytest

from qlora_tutorial.recipes import compare_recipe_runs, left_chance, recipe_summary, validation_curve


def history(evaluations: list[tuple[int, float]]) -> list[dict]:
    """A log_history with evaluations during training, the train summary, then the pipeline's final evaluation."""
    during = [{"step": step, "eval_accuracy": accuracy} for step, accuracy in evaluations]
    return [*during, {"step": 99, "train_runtime": 1.0}, {"step": 99, "eval_accuracy": 0.99}]


def recipe_runs() -> tuple[dict, dict]:
    """The reference recipe's run (never left chance in 100 steps) and ours (90%), as results.json has them."""
    reference = {
        "log_history": history([(50, 0.26), (100, 0.27)]),
        "rows": {"validation": 800},
        "validation_accuracy": 0.27,
        "train_steps": 100,
        "step_seconds": [1.4] * 20,
    }
    ours = {
        "log_history": history([(50, 0.86), (100, 0.9)]),
        "validation_accuracy": 0.9,
        "step_seconds": [1.0] * 20,
    }
    return reference, ours


def test_validation_curve_stops_at_the_end_of_training():
    assert validation_curve({"log_history": history([(2, 0.5), (4, 0.7)])}) == [(2, 0.5), (4, 0.7)]


def test_recipe_comparison_reports_what_was_measured():
    found = compare_recipe_runs(*recipe_runs())
    assert found["reference_left_chance"] is False  # 27% on 800 rows: the interval reaches below 25%
    assert found["ours_steps_to_reference_accuracy"] == 50
    assert found["padding_step_cost"] == pytest.approx(1.4)
    assert "never left chance in 100 steps" in recipe_summary(
        {**found, "reference_recipe": "pad", "our_recipe": "dynamic"}
    )


def test_left_chance_needs_the_interval_above_a_quarter():
    assert left_chance(0.40, 800) and not left_chance(0.26, 800)


def test_recipe_comparison_needs_validation_during_training():
    run = {"log_history": [], "rows": {"validation": 8}, "validation_accuracy": 0.5, "step_seconds": [1.0]}
    with pytest.raises(ValueError, match="--eval-steps"):
        compare_recipe_runs(run, run)
