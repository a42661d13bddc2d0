import json
import re
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from qlora_tutorial.__main__ import build_parser, settings_from_arguments
from qlora_tutorial.comparison import (
    BUDGETS,
    FULL,
    MERGED,
    METHODS,
    QLORA,
    QLORA_ALL_LINEAR,
    Budget,
    Method,
    budget_for,
    budget_settings,
    comparison_row,
    load_comparison,
    load_for_inference,
    longer_qlora_run,
    reusable_run,
    run_logged,
    save_comparison,
    scored_labels,
    train_command,
    train_method,
    trained_on_budget,
    trained_results,
)
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.inference import predict_proba
from qlora_tutorial.modeling import Precision, load_tokenizer
from qlora_tutorial.settings import PROFILES, Settings, load_settings, with_profile_changes
from qlora_tutorial.uncertainty import Interval, spread


def test_methods_have_distinct_folders_and_labels():
    """Each method's run gets its own folder and row, so none overwrites another."""
    assert len({method.slug for method in METHODS}) == len(METHODS)
    assert len({method.label for method in METHODS}) == len(METHODS)


def test_all_linear_qlora_is_a_method_of_its_own():
    assert QLORA_ALL_LINEAR in METHODS
    assert (QLORA_ALL_LINEAR.label, QLORA_ALL_LINEAR.slug) == (
        "QLoRA (nf4-dq, all linear layers)",
        "qlora-nf4-dq-all-linear",
    )
    names = Method(Precision.NF4_DQ, target_modules=("query", "key"))
    assert (names.label, names.slug, names.target_option) == (
        "QLoRA (nf4-dq, on key, query)",
        "qlora-nf4-dq-query-key",
        "query,key",
    )


def test_target_modules_without_adapters_are_refused():
    with pytest.raises(UserInputError, match=r"full fine-tuning \(--no-lora\) has none"):
        Method(Precision.FP32, use_lora=False, target_modules="all-linear")


def test_full_finetuning_of_a_4bit_base_is_refused():
    with pytest.raises(ValueError, match="cannot update nf4 weights"):
        Method(Precision.NF4, use_lora=False)


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_profile_has_a_budget_whose_test_sample_the_runs_use(profile):
    settings = load_settings(profile)
    budget = budget_for(settings)
    assert budget_settings(settings, budget).profile.test_rows == budget.test_rows


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
    assert "--target-modules" not in train_command(settings, QLORA, "out", budget)
    assert "--target-modules all-linear" in " ".join(train_command(settings, QLORA_ALL_LINEAR, "out", budget))


def child_settings(command: list[str]) -> Settings:
    """The settings the new process would run with: its arguments parsed as `python -m qlora_tutorial` does."""
    assert command[:3] == [sys.executable, "-m", "qlora_tutorial"]
    return settings_from_arguments(build_parser().parse_args(command[3:]))


@pytest.mark.parametrize("method", [QLORA, FULL, QLORA_ALL_LINEAR], ids=lambda method: method.slug)
def test_the_new_process_trains_with_the_parents_settings_whatever_its_environment(
    monkeypatch, tiny_bert_dir, tiny_data_dir, method
):
    parent = load_settings("smoke", data_dir=tiny_data_dir, model=str(tiny_bert_dir))
    parent = with_profile_changes(parent, learning_rate=3e-4, max_length=64, train_pool_rows=None, seed=7)
    monkeypatch.setenv("QLORA_PROFILE", "cpu")  # what the child inherits must not matter
    monkeypatch.setenv("QLORA_MODEL", "prajjwal1/bert-tiny")
    budget = Budget((method,), max_steps=3, test_rows=None, latency_texts=2, eval_steps=1, full_learning_rate=2e-5)
    command = train_command(parent, method, "out", budget)
    child = child_settings(command)
    assert build_parser().parse_args(command[3:]).target_modules == method.target_modules
    expected = budget_settings(parent, budget)
    if not method.use_lora:
        expected = with_profile_changes(expected, learning_rate=budget.full_learning_rate)
    assert child == expected


def test_the_new_process_keeps_the_pinned_revision():
    parent = load_settings("gpu")
    child = child_settings(train_command(parent, QLORA, "out", budget_for(parent)))
    assert (child.model_name, child.model_revision) == (parent.model_name, parent.model_revision)


def test_qlora_trains_in_a_new_process_even_where_notebook_04_left_a_run_on_the_budget(monkeypatch, tmp_path, capsys):
    """04's run trained in that notebook's kernel, from another baseline: 06 no longer reuses it."""
    settings, budget = load_settings("smoke"), BUDGETS["smoke"]
    notebook_04 = settings.run_dir("qlora")  # as if 04 had trained QLoRA on this very budget
    monkeypatch.setattr(
        "qlora_tutorial.comparison.reusable_run",
        lambda s, m, folders, b: notebook_04 if notebook_04 in folders else None,
    )
    trained = []
    monkeypatch.setattr(
        "qlora_tutorial.comparison.train_method", lambda s, method, folder, b: trained.append(folder) or {"new": 1}
    )
    folder, results = trained_results(settings, QLORA, tmp_path / "comparison", budget)
    assert (folder, results) == (tmp_path / "comparison" / QLORA.slug, {"new": 1})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{QLORA.label}: training in a new process ..."
    assert re.fullmatch(rf"{re.escape(QLORA.label)}: trained in \d+ s", printed[1])


def test_failed_run_raises_with_the_end_of_its_log(tmp_path):
    command = [sys.executable, "-c", "import sys; print('loading'); sys.exit('the data folder is missing')"]
    with pytest.raises(RuntimeError, match=r"(?s)exit 1.*the data folder is missing"):
        run_logged(command, tmp_path / "train.log")


@pytest.mark.slow
def test_a_method_trains_in_its_own_process_with_the_parents_settings(tiny_settings, tmp_path: Path):
    """A real run of the command train_command writes: its results record the parent's settings, so it is reused."""
    budget = Budget((QLORA,), max_steps=2, test_rows=8, latency_texts=2, eval_steps=1)
    results = train_method(tiny_settings, QLORA, tmp_path / "q", budget)
    assert (results["method"], results["train_steps"], results["rows"]["test"]) == (QLORA.label, 2, 8)
    assert trained_on_budget(results, tiny_settings, QLORA, budget)
    assert reusable_run(tiny_settings, QLORA, [tmp_path / "q"], budget) == tmp_path / "q"
    assert reusable_run(tiny_settings, QLORA, [tmp_path / "q"], replace(budget, max_steps=3)) is None
    labels = scored_labels(tiny_settings, budget)
    row = comparison_row(results, labels, [3.0])
    assert row["trainable_parameters"] < row["total_parameters"]
    assert row["test_accuracy"].low <= row["test_accuracy"].estimate <= row["test_accuracy"].high
    model = load_for_inference(tiny_settings, tmp_path / "q", results)
    assert predict_proba(model, load_tokenizer(tiny_settings), ["a short headline"]).shape == (1, 4)


def test_a_saved_comparison_comes_back_only_for_its_own_settings_and_budget(tmp_path: Path):
    settings, budget = load_settings("smoke"), BUDGETS["smoke"]
    rows = [
        {
            "method": QLORA.label,
            "step_seconds": spread([0.5, 0.6, 0.7]),
            "test_accuracy": Interval(0.75, 0.6, 0.85),
            "correct": np.array([True, False, True]),
        },
        {"method": MERGED, "latency_ms": spread([2.0, 3.0])},
    ]
    save_comparison(rows, tmp_path, settings, budget, (1.5, 2.5))
    saved = load_comparison(tmp_path, settings, budget)
    assert saved is not None and saved["load_average"] == [1.5, 2.5]
    loaded = saved["rows"]
    assert [row["method"] for row in loaded] == [QLORA.label, MERGED]
    assert (
        loaded[0]["step_seconds"] == rows[0]["step_seconds"] and loaded[0]["test_accuracy"] == rows[0]["test_accuracy"]
    )
    assert loaded[0]["correct"].tolist() == [True, False, True] and loaded[1]["latency_ms"] == rows[1]["latency_ms"]
    assert load_comparison(tmp_path, settings, replace(budget, max_steps=5)) is None
    assert load_comparison(tmp_path / "elsewhere", settings, budget) is None


def test_notebook_04s_longer_run_is_read_only_where_it_scored_the_same_rows_on_the_same_recipe(
    tiny_settings: Settings, tmp_path: Path
):
    settings, budget = replace(tiny_settings, runs_dir=tmp_path), BUDGETS["smoke"]
    assert longer_qlora_run(settings, budget) is None  # 04 has not run
    labels = scored_labels(settings, budget)
    predictions = labels.copy()
    predictions[:3] = (labels[:3] + 1) % 4  # three rows wrong
    folder = settings.run_dir("qlora")
    folder.mkdir(parents=True)

    def record(steps: int, model_name: str = settings.model_name, rows: int = len(labels)) -> None:
        recorded = {"profile": asdict(settings.profile), "model_name": model_name}
        results = {"train_steps": steps, "test_predictions": predictions[:rows].tolist(), "settings": recorded}
        (folder / "results.json").write_text(json.dumps(results))

    record(budget.max_steps * 2)
    steps, correct = longer_qlora_run(settings, budget)
    assert steps == budget.max_steps * 2 and correct.sum() == len(labels) - 3
    for not_comparable in (
        dict(steps=budget.max_steps),
        dict(steps=99, model_name="another-model"),
        dict(steps=99, rows=len(labels) - 1),
    ):
        record(**not_comparable)
        assert longer_qlora_run(settings, budget) is None, not_comparable
