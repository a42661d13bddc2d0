"""The merge variants of notebook 05: which base weights the LoRA update is folded into."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qlora_tutorial.inference import (
    interleaved_latencies_ms,
    load_trained,
    merge_into_4bit,
    merge_into_dequantized,
    merge_into_original,
    predict_logits,
    predict_proba,
)
from qlora_tutorial.modeling import (
    attach_lora,
    is_quantized_model,
    load_classifier,
    load_tokenizer,
    reference_lora_config,
)
from qlora_tutorial.settings import Settings

TEXTS = ["Stocks rally as the central bank holds rates", "Champions win the cup final", "Telescope finds a planet"]


@pytest.fixture
def qlora_adapter_dir(tiny_settings: Settings, tmp_path: Path) -> Path:
    """An adapter with random, non-zero B matrices, attached to the NF4 base as QLoRA trains it."""
    config = reference_lora_config()
    config.init_lora_weights = False
    torch.manual_seed(3)
    model = attach_lora(load_classifier(tiny_settings, "nf4-dq"), config)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def logits_of(model: torch.nn.Module, settings: Settings) -> np.ndarray:
    return predict_logits(model, load_tokenizer(settings), TEXTS)


def test_merge_into_the_dequantized_base_reproduces_the_trained_model(
    tiny_settings: Settings, qlora_adapter_dir: Path
) -> None:
    trained = logits_of(load_trained(tiny_settings, qlora_adapter_dir), tiny_settings)
    dequantized = merge_into_dequantized(tiny_settings, qlora_adapter_dir)
    original = merge_into_original(tiny_settings, qlora_adapter_dir)
    assert not is_quantized_model(dequantized) and not is_quantized_model(original)
    exact = np.abs(logits_of(dequantized, tiny_settings) - trained).max()
    off = np.abs(logits_of(original, tiny_settings) - trained).max()
    assert exact < 1e-4
    assert off > 100 * exact, "the original weights are not the ones the adapter was trained against"


def test_merge_into_4bit_stays_quantized_and_moves_the_logits(tiny_settings: Settings, qlora_adapter_dir: Path) -> None:
    trained = logits_of(load_trained(tiny_settings, qlora_adapter_dir), tiny_settings)
    merged = merge_into_4bit(tiny_settings, qlora_adapter_dir)
    assert is_quantized_model(merged)
    assert np.abs(logits_of(merged, tiny_settings) - trained).max() > 1e-4


def test_probabilities_are_the_softmax_of_the_logits(tiny_settings: Settings) -> None:
    model, tokenizer = load_classifier(tiny_settings, "fp32"), load_tokenizer(tiny_settings)
    logits = predict_logits(model, tokenizer, TEXTS)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(predict_proba(model, tokenizer, TEXTS), expected, rtol=1e-5)


def test_merging_needs_a_saved_adapter(tiny_settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No adapter in"):
        merge_into_dequantized(tiny_settings, tmp_path)


def test_interleaved_latencies_time_every_model_every_round(tiny_settings: Settings) -> None:
    model, tokenizer = load_classifier(tiny_settings, "fp32"), load_tokenizer(tiny_settings)
    timings = interleaved_latencies_ms({"a": model, "b": model}, tokenizer, TEXTS, rounds=2)
    assert set(timings) == {"a", "b"}
    assert all(len(values) == 2 * len(TEXTS) and (values > 0).all() for values in timings.values())
    with pytest.raises(ValueError, match="at least one round"):
        interleaved_latencies_ms({"a": model}, tokenizer, TEXTS, rounds=0)
