"""The command line: options reach the run, and every mistake in the input ends in one `error: ...` line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_texts

from qlora_tutorial.__main__ import PROFILE_OPTIONS, build_parser, main, profile_changes, training_overrides
from qlora_tutorial.settings import IDENTITY_FIELDS, Profile


def parse(*options: str):
    return build_parser().parse_args(["train", *options])


def test_every_budget_field_of_a_profile_has_an_option():
    budget_fields = {field.name for field in fields(Profile)} - set(IDENTITY_FIELDS)
    assert set(PROFILE_OPTIONS) == budget_fields


def test_budget_options_become_profile_changes_and_training_overrides():
    arguments = parse("--max-steps", "7", "--test-rows", "50", "--learning-rate", "5e-5", "--eval-steps", "3")
    assert profile_changes(arguments) == {"test_rows": 50, "learning_rate": 5e-5}
    assert training_overrides(arguments) == {"max_steps": 7, "eval_strategy": "steps", "eval_steps": 3}


def test_all_rows_is_a_change_to_none():
    assert profile_changes(parse("--test-rows", "all", "--train-pool-rows", "all")) == {
        "test_rows": None,
        "train_pool_rows": None,
    }


def test_a_step_budget_alone_validates_once_at_the_end():
    assert training_overrides(parse("--max-steps", "7")) == {"max_steps": 7, "eval_strategy": "no"}


def test_no_budget_options_change_nothing():
    arguments = parse()
    assert profile_changes(arguments) == {}
    assert training_overrides(arguments) == {}
    assert arguments.pad_to_max_length is False


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-steps", "-1", "must be a positive integer, got -1"),
        ("--test-rows", "-3", "must be a positive integer, got -3"),
        ("--learning-rate", "0", "must be a positive number, got 0"),
        ("--eval-steps", "0", "must be a positive integer, got 0"),
        ("--validation-fraction", "1.5", "must be a number between 0 and 1, got 1.5"),
        ("--seed", "-2", "must be zero or a positive integer, got -2"),
        (
            "--target-modules",
            "query,,value",
            "must be all-linear or layer names separated by commas, e.g. query,value; got 'query,,value'",
        ),
        ("--target-modules", "", "must be all-linear or layer names separated by commas"),
    ],
)
def test_a_bad_option_value_ends_in_one_error_line(option, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(option, value)
    assert exit_info.value.code == 2
    assert f"error: argument {option}: {message}" in capsys.readouterr().err.strip().splitlines()[-1]


def test_target_modules_are_all_linear_or_layer_names():
    assert parse().target_modules is None
    assert parse("--target-modules", "all-linear").target_modules == "all-linear"
    assert parse("--target-modules", "query,key,value").target_modules == ("query", "key", "value")


def test_target_modules_that_match_no_layer_end_in_one_error_line(tmp_path, capsys, tiny_bert_dir, tiny_data_dir):
    output = tmp_path / "run"
    arguments = ["train", "--profile", "smoke", "--model", str(tiny_bert_dir), "--data-dir", str(tiny_data_dir)]
    assert main([*arguments, "--target-modules", "q_proj,v_proj", "--output-dir", str(output)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: No layer of {tiny_bert_dir} matches the target modules q_proj, v_proj. Name its linear layers "
        "(a BERT's are query, key, value and dense), or pass all-linear."
    )
    assert not output.exists(), "nothing was trained"


def write_splits(folder: Path, train: pd.DataFrame, test: pd.DataFrame | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    train.to_parquet(folder / "train.parquet")
    (tiny_texts(40) if test is None else test).to_parquet(folder / "test.parquet")
    return folder


def wrong_columns(folder: Path) -> Path:
    frame = tiny_texts(40).rename(columns={"text": "headline", "label": "topic"})
    return write_splits(folder, frame, frame)


def labels_out_of_range(folder: Path) -> Path:
    return write_splits(folder, tiny_texts(40).assign(label=7))


def string_labels(folder: Path) -> Path:
    return write_splits(folder, tiny_texts(40).assign(label="Sports"))


def float_labels(folder: Path) -> Path:
    return write_splits(folder, tiny_texts(40).astype({"label": float}))


def csv_files(folder: Path) -> Path:
    folder.mkdir()
    tiny_texts(40).to_csv(folder / "train.csv", index=False)
    tiny_texts(40).to_csv(folder / "test.csv", index=False)
    return folder


def corrupt_parquet(folder: Path) -> Path:
    write_splits(folder, tiny_texts(40))
    (folder / "train.parquet").write_bytes(b"PAR1 this is not a parquet file")
    return folder


def empty_train_split(folder: Path) -> Path:
    return write_splits(folder, tiny_texts(0))


def null_texts(folder: Path) -> Path:
    frame = tiny_texts(40)
    frame.loc[3, "text"] = None
    return write_splits(folder, frame)


def null_labels(folder: Path) -> Path:
    frame = tiny_texts(40).astype({"label": "Int64"})
    frame.loc[5, "label"] = None
    return write_splits(folder, frame)


def numbers_as_texts(folder: Path) -> Path:
    return write_splits(folder, tiny_texts(40).assign(text=range(40)))


def missing_test_file(folder: Path) -> Path:
    write_splits(folder, tiny_texts(40))
    (folder / "test.parquet").unlink()
    return folder


def too_few_rows_to_split(folder: Path) -> Path:
    return write_splits(folder, tiny_texts(3))


# case: (how to make the folder, what the error line says). Every case but the last is refused before `datasets`
# prepares the files; the last only when the split is drawn, after its progress bars.
BAD_DATA: dict[str, tuple[Callable[[Path], Path], str]] = {
    "wrong column names": (wrong_columns, r"lacks the column\(s\) \['text', 'label'\]"),
    "labels outside 0 to 3": (labels_out_of_range, r"has labels \[7\] outside 0 to 3\. Map them to 0 World"),
    "string labels": (string_labels, r"`label` column of strings; it must hold integers 0 to 3\. Map the labels"),
    "float labels": (float_labels, r"`label` column of double values; it must hold integers"),
    "CSV files instead of parquet": (csv_files, r"Missing .*train\.parquet.*Found train\.csv, test\.csv instead"),
    "a corrupt parquet file": (corrupt_parquet, r"train\.parquet is not a readable parquet file"),
    "an empty train split": (empty_train_split, r"train\.parquet has no rows"),
    "null texts": (null_texts, r"train split of .* has 1 empty \(null\) value\(s\) in `text`"),
    "null labels": (null_labels, r"train split of .* has 1 empty \(null\) value\(s\) in `label`"),
    "numbers as texts": (numbers_as_texts, r"`text` column of int64 values; it must hold strings"),
    "a missing test file": (missing_test_file, r"Missing .*test\.parquet\. QLORA_DATA_DIR must name a folder"),
    "too few rows to split": (too_few_rows_to_split, r"train split of .* has too few rows to split by label: 3 rows"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_ends_in_one_error_line_that_names_the_file(case, tmp_path, capsys, tiny_bert_dir):
    make, message = BAD_DATA[case]
    folder = make(tmp_path / "ag_news")
    output = tmp_path / "run"
    arguments = ["train", "--profile", "smoke", "--model", str(tiny_bert_dir), "--data-dir", str(folder)]
    assert main([*arguments, "--output-dir", str(output)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and (len(lines) == 1 or case == "too few rows to split"), err
    line = lines[-1]
    assert line.startswith("error: ") and str(folder) in line
    assert re.search(message, line), line
    assert not output.exists(), "nothing was trained"


SMOKE = {"QLORA_PROFILE": "smoke"}


@pytest.mark.parametrize(
    ("arguments", "environment", "message"),
    [
        (["--profile", "huge"], {}, "error: Unknown profile 'huge'. Valid profiles: smoke, cpu, gpu"),
        ([], {"QLORA_PROFILE": "laptop"}, "error: Unknown profile 'laptop'. Valid profiles: smoke, cpu, gpu"),
        (["--precision", "int3"], SMOKE, "error: Unknown precision 'int3'. Valid precisions: fp32"),
        (["--precision", "nf4", "--no-lora"], SMOKE, "error: Full fine-tuning (--no-lora) cannot update nf4 weights"),
        (["--data-dir", "{tmp}/nowhere"], SMOKE, "error: The data folder {tmp}/nowhere does not exist"),
        (["--data-dir", "{tmp}/a_file"], SMOKE, "error: The data folder {tmp}/a_file is a file, not a folder"),
        ([], {**SMOKE, "QLORA_MODEL": "{tmp}/no/model"}, "error: QLORA_MODEL={tmp}/no/model is neither an existing"),
        (["--model", "{tmp}"], SMOKE, "error: model={tmp} is a folder without config.json"),
        (
            ["--precision", "fp32", "--no-lora", "--target-modules", "all-linear"],
            SMOKE,
            "error: --target-modules says which layers get LoRA adapters, and full fine-tuning (--no-lora) has none",
        ),
    ],
    ids=[
        "profile",
        "profile-env",
        "precision",
        "no-lora-4bit",
        "no-folder",
        "file",
        "model-env",
        "model-folder",
        "no-lora-targets",
    ],
)
def test_bad_settings_end_in_one_error_line_before_anything_loads(
    arguments, environment, message, tmp_path, monkeypatch, capsys
):
    (tmp_path / "a_file").touch()
    for name, value in environment.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    options = [option.format(tmp=tmp_path) for option in arguments]
    assert main(["train", *options, "--output-dir", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [captured.err.strip()], "exactly one line"
    assert captured.err.startswith(message.format(tmp=tmp_path))
    assert captured.out == "", "refused before the settings table, so before any work"


@pytest.mark.slow
def test_the_real_command_prints_no_traceback_for_a_bad_data_file(tmp_path, tiny_bert_dir):
    """The one test through `python -m qlora_tutorial` itself: what a learner sees in the terminal."""
    folder = string_labels(tmp_path / "ag_news")
    command = [sys.executable, "-m", "qlora_tutorial", "train", "--profile", "smoke", "--model", str(tiny_bert_dir)]
    finished = subprocess.run(
        [*command, "--data-dir", str(folder), "--output-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert finished.returncode == 2
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in finished.stderr, finished.stderr
    assert lines[0].startswith(f"error: The train split of {folder} has a `label` column of strings")


@pytest.mark.slow
def test_budget_options_reach_the_run(tiny_bert_dir: Path, tiny_data_dir: Path, tmp_path: Path):
    output = tmp_path / "run"
    options = ["--profile", "smoke", "--precision", "fp32", "--data-dir", str(tiny_data_dir)]
    options += ["--model", str(tiny_bert_dir), "--max-steps", "3", "--test-rows", "12", "--eval-steps", "2"]
    options += ["--learning-rate", "1e-4", "--max-length", "32"]
    assert main(["train", *options, "--pad-to-max-length", "--output-dir", str(output)]) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["train_steps"] == 3
    assert results["rows"]["test"] == 12
    assert results["settings"]["profile"]["learning_rate"] == 1e-4
    assert results["settings"]["profile"]["max_length"] == 32
    assert results["settings"]["model_name"] == str(tiny_bert_dir)
    validated_at = [entry["step"] for entry in results["log_history"] if "eval_accuracy" in entry]
    assert validated_at[0] == 2  # every 2 steps, then at the end
    assert set(validated_at) == {2, 3}


def test_the_default_run_goes_where_the_notebooks_look(monkeypatch, tiny_bert_dir, tmp_path):
    """Without --output-dir the reference QLoRA run lands in settings.run_dir("qlora"), other methods beside it."""
    saved, configs = [], []

    def train(settings, out, *arguments, lora_config=None, **options):
        saved.append(out)
        configs.append(lora_config and lora_config.target_modules)

    monkeypatch.setattr("qlora_tutorial.pipeline.train_and_evaluate", train)
    monkeypatch.setattr("qlora_tutorial.pipeline.format_summary", lambda results: "")
    monkeypatch.setenv("QLORA_MODEL", str(tiny_bert_dir))
    assert main(["train", "--profile", "smoke"]) == 0
    assert main(["train", "--profile", "smoke", "--precision", "fp32", "--no-lora"]) == 0
    assert main(["train", "--profile", "smoke", "--target-modules", "all-linear"]) == 0
    runs = tmp_path / "runs" / "smoke"
    assert saved == [runs / "qlora", runs / "full-fp32", runs / "qlora-nf4-dq-all-linear"]
    assert configs == [None, None, "all-linear"], "the adapters go where --target-modules says"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--profile", "huge"], "error: Unknown profile 'huge'. Valid profiles: smoke, cpu, gpu"),
        (["--profile", "smoke", "--precision", "int3"], "error: Unknown precision 'int3'. Valid precisions: fp32"),
        (["--profile", "smoke", "--model", "{tmp}"], "error: --model={tmp} is a folder without config.json"),
        (["--profile", "smoke", "--model", "{tmp}/no/model"], "error: --model={tmp}/no/model is neither an existing"),
        (["--profile", "smoke", "--data-dir", "{tmp}/nowhere"], "error: The data folder {tmp}/nowhere does not exist"),
    ],
    ids=["profile", "precision", "model-folder", "model-path", "no-data-folder"],
)
def test_bad_decoder_input_ends_in_one_error_line_before_anything_loads(arguments, message, tmp_path, capsys):
    options = [option.format(tmp=tmp_path) for option in arguments]
    assert main(["train-decoder", *options, "--output-dir", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [captured.err.strip()], "exactly one line"
    assert captured.err.startswith(message.format(tmp=tmp_path))
    assert captured.out == "", "refused before the settings table, so before any work"


def test_decoder_options_reach_the_run(monkeypatch, tmp_path, tiny_data_dir):
    runs = []

    def train(settings, profile, output_dir, precision, *, gradient_checkpointing):
        runs.append((settings, profile, output_dir, precision.value, gradient_checkpointing))
        return {"method": "LoRA (fp32 base)", "train_steps": 3, "tokens_per_second": 9.0, "peak_memory_bytes": 2**20}

    monkeypatch.setattr("qlora_tutorial.decoder_pipeline.train_decoder", train)
    options = ["--profile", "smoke", "--data-dir", str(tiny_data_dir), "--precision", "fp32", "--steps", "3"]
    assert main(["train-decoder", *options, "--gradient-checkpointing", "--model", "HuggingFaceTB/SmolLM2-360M"]) == 0
    assert main(["train-decoder", "--profile", "smoke", "--data-dir", str(tiny_data_dir)]) == 0
    assert main(["train-decoder", *options, "--no-gradient-checkpointing"]) == 0
    (settings, profile, output_dir, precision, checkpointing), default, unchecked = runs
    assert (profile.steps, profile.model_name, precision, checkpointing) == (
        3,
        "HuggingFaceTB/SmolLM2-360M",
        "fp32",
        True,
    )
    assert settings.data_dir == tiny_data_dir and output_dir == tmp_path / "runs" / "smoke" / "decoder"
    assert (default[1].steps, default[1].model_name, default[3]) == (4, "packaged:SmolLM2-135M-Instruct", "nf4-dq")
    assert default[4] is None and unchecked[4] is False, "unset: the profile's choice; --no-...: off"


def test_the_decoder_model_comes_from_the_environment_unless_model_is_given(monkeypatch, tmp_path, tiny_data_dir):
    runs = []
    monkeypatch.setattr(
        "qlora_tutorial.decoder_pipeline.train_decoder",
        lambda settings, profile, *args, **kwargs: (
            runs.append(profile.model_name)
            or {"method": "QLoRA (nf4-dq)", "train_steps": 1, "tokens_per_second": 1.0, "peak_memory_bytes": 1}
        ),
    )
    monkeypatch.setenv("QLORA_DECODER_MODEL", "meta-llama/Llama-3.1-8B-Instruct")
    options = ["train-decoder", "--profile", "smoke", "--data-dir", str(tiny_data_dir)]
    assert main(options) == 0 and main([*options, "--model", "owner/other"]) == 0
    assert runs == ["meta-llama/Llama-3.1-8B-Instruct", "owner/other"]


def test_a_decoder_model_variable_that_cannot_load_is_one_error_line(monkeypatch, tmp_path, tiny_data_dir, capsys):
    monkeypatch.setenv("QLORA_DECODER_MODEL", str(tmp_path / "no" / "model"))
    assert main(["train-decoder", "--profile", "smoke", "--data-dir", str(tiny_data_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: QLORA_DECODER_MODEL={tmp_path}/no/model is neither an existing folder")
    assert captured.out == ""


@pytest.mark.slow
def test_train_decoder_fine_tunes_a_tiny_llama(tiny_llama_dir, tiny_data_dir, tmp_path, capsys):
    output = tmp_path / "decoder"
    options = ["--profile", "smoke", "--model", str(tiny_llama_dir), "--data-dir", str(tiny_data_dir)]
    assert main(["train-decoder", *options, "--steps", "2", "--output-dir", str(output)]) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["method"] == "QLoRA (nf4-dq)" and results["train_steps"] == 2
    assert results["tokens_seen"] > 0 and results["tokens_per_second"] > 0
    assert (output / "adapter_config.json").is_file() and (output / "chat_template.jinja").is_file()
    assert not list(output.glob("checkpoint-*")), "a finished run removes its checkpoints"
    assert f"QLoRA (nf4-dq): 2 steps, {results['tokens_per_second']:.0f} tokens/s" in capsys.readouterr().out
