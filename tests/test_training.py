from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from qlora_tutorial.data import load_splits, tokenize_splits
from qlora_tutorial.inference import load_trained, predict_proba
from qlora_tutorial.metrics import classification_metrics, compute_metrics
from qlora_tutorial.modeling import attach_lora, load_classifier, load_tokenizer
from qlora_tutorial.pipeline import train_and_evaluate
from qlora_tutorial.settings import Settings
from qlora_tutorial.training import (
    load_results,
    make_trainer,
    predict_shortest_first,
    save_results,
    training_arguments,
)


def test_classification_metrics_on_a_known_case() -> None:
    metrics = classification_metrics(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 2]))
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["macro_f1"] == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)


def test_compute_metrics_takes_the_argmax_of_logits_and_accepts_a_tuple() -> None:
    logits = np.array([[2.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1.0], [0, 0, 0, 5.0]])
    labels = np.array([0, 1, 2, 3])
    plain = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    as_tuple = compute_metrics(EvalPrediction(predictions=(logits, None), label_ids=labels))
    assert plain == as_tuple
    assert plain["accuracy"] == pytest.approx(0.75)


T4 = {"device": "cuda", "compute_dtype": torch.float16, "optimizer": "paged_adamw_32bit"}  # a GPU without bf16
CPU = {"device": "cpu", "compute_dtype": torch.float32, "optimizer": "adamw_torch"}


@pytest.mark.parametrize("hardware", [CPU, T4], ids=["cpu", "t4"])
def test_training_arguments_follow_the_settings_and_take_overrides(
    tiny_settings: Settings, tmp_path: Path, hardware: dict
) -> None:
    """The device decides the optimizer, mixed precision and pinned memory, whatever machine runs the test."""
    settings = replace(tiny_settings, **hardware)
    arguments = training_arguments(settings, tmp_path, max_steps=7)
    assert arguments.max_steps == 7
    assert arguments.learning_rate == settings.profile.learning_rate
    assert arguments.per_device_train_batch_size == settings.profile.batch_size
    assert arguments.optim.value == hardware["optimizer"]
    on_gpu = hardware["device"] == "cuda"
    assert (arguments.fp16, arguments.bf16, arguments.dataloader_pin_memory) == (on_gpu, False, on_gpu)


@pytest.mark.slow
def test_loss_falls_and_the_reloaded_adapter_predicts_the_same(tiny_settings: Settings, tmp_path: Path) -> None:
    splits = load_splits(tiny_settings)
    tokenizer = load_tokenizer(tiny_settings)
    tokenized = tokenize_splits(splits, tokenizer, tiny_settings.profile.max_length)
    model = attach_lora(load_classifier(tiny_settings))
    trainer = make_trainer(
        model,
        tiny_settings,
        tokenized,
        tokenizer,
        tmp_path / "trainer",
        max_steps=20,
        learning_rate=3e-2,  # a random-init tiny BERT needs a large step to move in 20 steps
        eval_strategy="no",
        disable_tqdm=True,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) >= 4
    assert losses[-1] < losses[0]

    texts = splits["test"]["text"]
    before = predict_proba(trainer.model, tokenizer, texts)
    trainer.model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    after = predict_proba(load_trained(tiny_settings, tmp_path / "adapter"), tokenizer, texts)
    np.testing.assert_allclose(after, before, atol=1e-6)
    assert (after.argmax(axis=1) == before.argmax(axis=1)).all()

    in_order = trainer.predict(tokenized["test"])
    shortest_first = predict_shortest_first(trainer, tokenized["test"])
    np.testing.assert_allclose(shortest_first.predictions, in_order.predictions, atol=1e-5)
    np.testing.assert_array_equal(shortest_first.label_ids, in_order.label_ids)
    assert shortest_first.metrics["test_accuracy"] == in_order.metrics["test_accuracy"]


@pytest.mark.slow
def test_train_and_evaluate_saves_adapter_and_results(tiny_settings: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    results = train_and_evaluate(tiny_settings, folder, max_steps=5, eval_strategy="no", disable_tqdm=True)
    assert (folder / "adapter_config.json").is_file()
    saved = load_results(folder)
    assert saved["test_accuracy"] == pytest.approx(results["test_accuracy"])
    assert any("loss" in entry for entry in saved["log_history"])
    assert "peft" in saved["versions"]


def test_load_results_of_a_missing_run_says_how_to_train(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Train first"):
        load_results(tmp_path / "no_run")


def test_save_results_adds_library_versions(tmp_path: Path) -> None:
    save_results(tmp_path, {"test_accuracy": 0.5})
    saved = load_results(tmp_path)
    assert saved["test_accuracy"] == 0.5
    assert set(saved["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes", "python"}
