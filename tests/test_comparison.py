import sys
from pathlib import Path

import pytest

from qlora_tutorial.comparison import (
    ALL_METHODS,
    BUDGETS,
    FULL,
    QLORA,
    Budget,
    Method,
    budget_for,
    comparison_row,
    load_for_inference,
    markdown_table,
    median_latency_ms,
    recipe_speedup,
    recipe_summary,
    run_logged,
    seconds_per_step,
    train_command,
    train_method,
    validation_curve,
)
from qlora_tutorial.modeling import Precision
from qlora_tutorial.settings import load_settings, with_profile_changes


def history(evaluations, train_seconds=100.0, steps=10, eval_runtime=5.0):
    """A log_history with evaluations during training, the train summary, then the pipeline's final one."""
    entries = [{"step": step, "eval_accuracy": acc, "eval_runtime": eval_runtime} for step, acc in evaluations]
    entries.append({"step": steps, "train_runtime": train_seconds})
    entries.append({"step": steps, "eval_accuracy": 0.99, "eval_runtime": eval_runtime})
    return {"log_history": entries, "train_seconds": train_seconds, "train_steps": steps}


def test_methods_have_distinct_folders_and_the_pipelines_labels():
    assert [m.slug for m in ALL_METHODS] == ["full-fp32", "lora-fp32", "qlora-nf4-dq", "qlora-nf4", "qlora-fp4"]
    assert QLORA.label == "QLoRA (nf4-dq)"
    assert FULL.label == "full fine-tuning (fp32)"


def test_full_finetuning_of_a_4bit_base_is_refused():
    with pytest.raises(ValueError, match="cannot update nf4 weights"):
        Method(Precision.NF4, use_lora=False)


def test_smoke_budget_is_smaller_than_cpu_budget():
    assert BUDGETS["smoke"].max_steps < BUDGETS["cpu"].max_steps
    assert BUDGETS["smoke"].test_rows < BUDGETS["cpu"].test_rows
    assert budget_for(load_settings("cpu")) is BUDGETS["cpu"]


def test_unknown_profile_budget_says_where_to_add_it():
    settings = load_settings("smoke")
    renamed = with_profile_changes(settings, name="laptop")
    with pytest.raises(ValueError, match=r"No comparison budget for profile 'laptop'.*BUDGETS"):
        budget_for(renamed)


def test_train_command_carries_the_budget_and_gives_full_finetuning_its_own_rate(tiny_data_dir):
    settings = load_settings("smoke", data_dir=tiny_data_dir)
    budget = Budget((FULL,), max_steps=7, test_rows=30, latency_texts=2, eval_steps=3, full_learning_rate=2e-5)
    command = train_command(settings, FULL, "out", budget, "--eval-steps", "3")
    assert command[:4] == [sys.executable, "-m", "qlora_tutorial", "train"]
    text = " ".join(command)
    for part in ("--profile smoke", "--precision fp32", "--max-steps 7", "--test-rows 30", "--no-lora"):
        assert part in text
    assert "--learning-rate 2e-05" in text and f"--data-dir {tiny_data_dir}" in text
    assert command[-2:] == ["--eval-steps", "3"]
    assert "--no-lora" not in train_command(settings, QLORA, "out", budget)


def test_failed_run_raises_with_the_end_of_its_log(tmp_path):
    command = [sys.executable, "-c", "import sys; print('loading'); sys.exit('the data folder is missing')"]
    with pytest.raises(RuntimeError, match=r"(?s)exit 1.*the data folder is missing"):
        run_logged(command, tmp_path / "train.log")


def test_a_method_trains_in_its_own_process_and_reloads_for_inference(tiny_settings, tmp_path: Path):
    budget = Budget((QLORA,), max_steps=2, test_rows=8, latency_texts=2, eval_steps=1)
    results = train_method(tiny_settings, QLORA, tmp_path / "q", budget)
    assert (results["method"], results["train_steps"], results["rows"]["test"]) == ("QLoRA (nf4-dq)", 2, 8)
    row = comparison_row(results, latency_ms=3.0)
    assert row["trainable_parameters"] < row["total_parameters"]
    assert row["weight_mib"] == pytest.approx(results["weight_bytes"] / 2**20)
    model = load_for_inference(tiny_settings, tmp_path / "q", results)
    assert median_latency_ms(model, tiny_settings, ["a short headline", "another one"]) > 0


def test_markdown_table_dashes_what_an_inference_only_row_lacks():
    table = markdown_table([{"method": "merged", "latency_ms": 2.25}])
    assert table.splitlines()[-1] == "| merged | - | - | - | - | - | 2.2 | - | - |"


def test_validation_curve_stops_at_the_end_of_training():
    assert validation_curve(history([(2, 0.5), (4, 0.7)])) == [(2, 0.5), (4, 0.7)]


def test_seconds_per_step_leaves_out_validation_time():
    assert seconds_per_step(history([(5, 0.5), (10, 0.6)], train_seconds=60, steps=10, eval_runtime=5)) == 5.0


def test_speedup_compares_time_to_the_accuracy_both_recipes_reach():
    reference = history([(2, 0.3), (4, 0.5), (6, 0.6)], train_seconds=60, steps=6, eval_runtime=0)  # 10 s/step
    ours = history([(2, 0.6), (4, 0.8), (6, 0.9)], train_seconds=30, steps=6, eval_runtime=0)  # 5 s/step
    result = recipe_speedup(reference, ours)
    assert result["target_validation_accuracy"] == 0.6
    assert result["steps_to_target"] == {"reference": 6, "ours": 2}
    assert result["step_time_ratio"] == 2.0
    assert result["speedup"] == 6.0


def test_speedup_needs_validation_during_training():
    with pytest.raises(ValueError, match="--eval-steps"):
        recipe_speedup(history([]), history([(2, 0.5)]))


def test_recipe_summary_states_target_steps_and_ratios():
    recipes = {
        "reference_recipe": "pad to 128 tokens, learning rate 5e-05",
        "our_recipe": "dynamic padding, learning rate 0.001",
        "target_validation_accuracy": 0.6,
        "steps_to_target": {"reference": 6, "ours": 2},
        "seconds_to_target": {"reference": 60.0, "ours": 10.0},
        "speedup": 6.0,
        "step_time_ratio": 2.0,
    }
    summary = recipe_summary(recipes)
    for part in ("both reach 60.0%", "at step 6 (60 s", "at step 2 (10 s)", "**6.0x** sooner", "costs 2.00x"):
        assert part in summary
