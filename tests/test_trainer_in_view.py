"""Notebook 04 writes its training out in its own cells; these tests keep it equal to the package's.

The notebook builds ``TrainingArguments(...)`` in a cell tagged
``training-arguments`` and the ``Trainer(...)`` of its main run in a cell
tagged ``trainer``. The command line and notebook 06 use
``training.training_arguments`` and ``training.make_trainer`` instead, so a
change to one side that the other misses would make the notebook teach one
recipe and the package run another. Nothing here parses prose: the arguments
cell is executed as it stands and its ``TrainingArguments`` compared field by
field; the ``Trainer`` call is compared through Python's ``ast``.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import replace
from pathlib import Path

import nbformat
import pytest
import torch
from transformers import TrainingArguments

from qlora_tutorial.data import load_splits, tokenize_splits
from qlora_tutorial.modeling import QLORA_PRECISION, attach_lora, load_classifier, load_tokenizer
from qlora_tutorial.pipeline import method_name, train_and_evaluate
from qlora_tutorial.settings import Settings, load_settings
from qlora_tutorial.training import RunRecord, load_results, make_trainer, training_arguments

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "04_training.ipynb"
ARGUMENTS_TAG = "training-arguments"
TRAINER_TAG = "trainer"
T4 = {"device": "cuda", "compute_dtype": torch.float16, "optimizer": "paged_adamw_32bit"}
A100 = {"device": "cuda", "compute_dtype": torch.bfloat16, "optimizer": "paged_adamw_32bit"}
CPU = {"device": "cpu", "compute_dtype": torch.float32, "optimizer": "adamw_torch"}


def tagged_source(tag: str) -> str:
    """The source of the one code cell of notebook 04 that carries ``tag``."""
    cells = [
        cell
        for cell in nbformat.read(NOTEBOOK, as_version=4).cells
        if cell.cell_type == "code" and tag in cell.metadata.get("tags", [])
    ]
    assert len(cells) == 1, f"notebook 04 should have exactly one code cell tagged {tag!r}, found {len(cells)}"
    return cells[0].source


def notebook_arguments(settings: Settings) -> TrainingArguments:
    """Run the notebook's arguments cell with ``settings``; it may use only ``settings``, ``torch`` and the class."""
    namespace = {"settings": settings, "torch": torch, "TrainingArguments": TrainingArguments}
    exec(compile(tagged_source(ARGUMENTS_TAG), str(NOTEBOOK), "exec"), namespace)
    arguments = namespace.get("arguments")
    assert isinstance(arguments, TrainingArguments), "the cell should assign its TrainingArguments to `arguments`"
    assert namespace.get("adapter_dir") == settings.run_dir("qlora"), "the adapter goes where notebook 05 looks"
    return arguments


def trainer_call(tree: ast.AST) -> ast.Call:
    """The one ``Trainer(...)`` call in ``tree``."""
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Trainer"
    ]
    assert len(calls) == 1, f"expected one Trainer(...) call, found {len(calls)}"
    return calls[0]


def keywords(call: ast.Call) -> dict[str, str]:
    """A call's keyword arguments as source text."""
    return {keyword.arg: ast.unparse(keyword.value) for keyword in call.keywords if keyword.arg is not None}


@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu"])
@pytest.mark.parametrize("hardware", [CPU, T4, A100], ids=["cpu", "t4", "a100"])
def test_the_notebooks_training_arguments_equal_the_packages(
    profile: str, hardware: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every field, on every profile and every kind of device (optimizer, bf16/fp16, pinned memory)."""
    # TrainingArguments refuses bf16 where no GPU has it; this machine only stands in for an A100 here
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    settings = replace(load_settings(profile), **hardware)
    shown = notebook_arguments(settings).to_dict()
    packaged = training_arguments(settings, settings.run_dir("qlora")).to_dict()
    differing = {key: (shown.get(key), packaged.get(key)) for key in shown.keys() | packaged.keys()}
    differing = {key: pair for key, pair in differing.items() if pair[0] != pair[1]}
    assert not differing, f"notebook 04 (left) and training_arguments (right) differ: {differing}"


def test_the_notebooks_trainer_is_make_trainers() -> None:
    """The same datasets, collator, tokenizer and metrics; the notebook adds only its bookkeeping callback."""
    shown = trainer_call(ast.parse(tagged_source(TRAINER_TAG)))
    packaged = trainer_call(ast.parse(textwrap.dedent(inspect.getsource(make_trainer))))
    shown_keywords, packaged_keywords = keywords(shown), keywords(packaged)
    assert shown_keywords.pop("args") == "arguments", "the Trainer should take the arguments built in view"
    assert shown_keywords.pop("callbacks") == "[record]", "the only addition should be the RunRecord callback"
    packaged_keywords.pop("args")
    assert shown_keywords == packaged_keywords


def test_the_notebook_trains_in_view() -> None:
    """``trainer.train()`` is called in the notebook's own cell, not inside a helper."""
    tree = ast.parse(tagged_source(TRAINER_TAG))
    called = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call) and not node.args}
    assert "trainer.train" in called


def test_finish_needs_the_weights_measured_first(tiny_settings: Settings) -> None:
    with pytest.raises(RuntimeError, match="measure_weights"):
        RunRecord(tiny_settings).finish(*[None] * 4, "unused", method="m", precision="nf4-dq", lora=True)


@pytest.mark.slow
def test_the_notebooks_run_writes_what_the_pipeline_writes(tiny_settings: Settings, tmp_path: Path) -> None:
    """The steps of notebook 04's main run give a results.json with the pipeline's keys, and an adapter.

    Notebook 06 reuses notebook 04's run when its results hold what a pipeline run holds.
    """
    overrides = {"max_steps": 2, "disable_tqdm": True}
    piped = train_and_evaluate(tiny_settings, tmp_path / "pipeline", **overrides)

    record = RunRecord(tiny_settings)
    splits = load_splits(tiny_settings)
    tokenizer = load_tokenizer(tiny_settings)
    tokenized = tokenize_splits(splits, tokenizer, tiny_settings.profile.max_length)
    base = load_classifier(tiny_settings)
    record.measure_weights(base)
    trainer = make_trainer(attach_lora(base), tiny_settings, tokenized, tokenizer, tmp_path / "nb", **overrides)
    trainer.add_callback(record)
    output = trainer.train()
    identity = {"method": method_name(QLORA_PRECISION, True), "precision": QLORA_PRECISION.value, "lora": True}
    shown = record.finish(trainer, output, splits, tokenized, tmp_path / "notebook", **identity)

    assert set(shown) == set(piped)
    saved = load_results(tmp_path / "notebook")
    assert set(saved) == set(load_results(tmp_path / "pipeline"))
    assert (tmp_path / "notebook" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "notebook" / "tokenizer_config.json").is_file()
    same = ("method", "precision", "lora", "rows", "train_steps", "weight_bytes", "quant_state_bytes")
    same += ("trainable_parameters", "total_parameters", "optimizer_state_bytes", "settings")
    assert {key: shown[key] for key in same} == {key: piped[key] for key in same}
    # the same seeds, rows and steps: the same model, so the same predictions
    assert shown["test_predictions"] == piped["test_predictions"]
    assert shown["validation_accuracy"] == pytest.approx(piped["validation_accuracy"])
    assert len(shown["step_seconds"]) == shown["train_steps"]
    assert shown["peak_after_training_bytes"] >= shown["peak_before_training_bytes"] > 0
    assert shown["train_seconds"] > 0
