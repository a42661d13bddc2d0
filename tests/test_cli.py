import json
from pathlib import Path

import pytest

from qlora_tutorial.__main__ import build_parser, main, profile_changes, training_overrides


def parse(*options: str):
    return build_parser().parse_args(["train", *options])


def test_budget_options_become_profile_changes_and_training_overrides():
    arguments = parse("--max-steps", "7", "--test-rows", "50", "--learning-rate", "5e-5", "--eval-steps", "3")
    assert profile_changes(arguments) == {"test_rows": 50, "learning_rate": 5e-5}
    assert training_overrides(arguments) == {"max_steps": 7, "eval_strategy": "steps", "eval_steps": 3}


def test_a_step_budget_alone_validates_once_at_the_end():
    assert training_overrides(parse("--max-steps", "7")) == {"max_steps": 7, "eval_strategy": "no"}


def test_no_budget_options_change_nothing():
    arguments = parse()
    assert profile_changes(arguments) == {}
    assert training_overrides(arguments) == {}
    assert arguments.pad_to_max_length is False


@pytest.mark.parametrize(
    ("option", "value"), [("--max-steps", "0"), ("--test-rows", "-3"), ("--learning-rate", "0"), ("--eval-steps", "0")]
)
def test_non_positive_budget_is_refused(option, value, capsys):
    with pytest.raises(SystemExit):
        parse(option, value)
    assert "must be a positive" in capsys.readouterr().err


def test_full_finetuning_of_quantized_weights_is_refused_before_any_work(capsys, tmp_path):
    assert main(["train", "--profile", "smoke", "--precision", "nf4", "--no-lora", "--output-dir", str(tmp_path)]) == 2
    assert "cannot update nf4 weights" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_budget_options_reach_the_run(tiny_settings, tiny_data_dir: Path, tmp_path: Path):
    output = tmp_path / "run"
    options = ["--profile", "smoke", "--precision", "fp32", "--data-dir", str(tiny_data_dir)]
    options += ["--max-steps", "3", "--test-rows", "12", "--eval-steps", "2", "--learning-rate", "1e-4"]
    assert main(["train", *options, "--pad-to-max-length", "--output-dir", str(output)]) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["train_steps"] == 3
    assert results["rows"]["test"] == 12
    assert results["settings"]["profile"]["learning_rate"] == 1e-4
    validated_at = [entry["step"] for entry in results["log_history"] if "eval_accuracy" in entry]
    assert validated_at[0] == 2  # every 2 steps, then at the end
    assert set(validated_at) == {2, 3}
