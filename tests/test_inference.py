from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from qlora_tutorial import inference
from qlora_tutorial.inference import (
    hardest_mistakes,
    latencies_ms,
    load_requantized,
    load_trained,
    merge_into_4bit,
    merge_into_original,
    predict_proba,
    save_merged,
)
from qlora_tutorial.modeling import (
    Precision,
    attach_lora,
    is_quantized_model,
    load_classifier,
    load_tokenizer,
    reference_lora_config,
)
from qlora_tutorial.settings import Settings

TEXTS = [
    "Stocks rally as the central bank holds rates",
    "Champions win the cup final on penalties after a goalless draw in extra time",
    "Telescope finds a new planet",
    "Trade talks resume between the two governments",
    "Short",
]


@pytest.fixture
def adapter_dir(tiny_settings: Settings, tmp_path: Path) -> Path:
    """An adapter with random, non-zero LoRA B matrices (as if trained), saved from an fp32 base."""
    config = reference_lora_config()
    config.init_lora_weights = False  # B is random instead of zero, so the update is not a no-op
    torch.manual_seed(1)
    model = attach_lora(load_classifier(tiny_settings, Precision.FP32), config)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return folder


def logits(model: torch.nn.Module, settings: Settings) -> torch.Tensor:
    tokenizer = load_tokenizer(settings)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    model.eval()
    with torch.inference_mode():
        return model(**batch).logits


def test_predict_proba_keeps_input_order_and_matches_one_by_one(tiny_settings: Settings) -> None:
    model = load_classifier(tiny_settings, Precision.FP32)
    tokenizer = load_tokenizer(tiny_settings)
    batched = predict_proba(model, tokenizer, TEXTS, batch_size=2)
    single = np.vstack([predict_proba(model, tokenizer, [text]) for text in TEXTS])
    assert batched.shape == (len(TEXTS), 4)
    np.testing.assert_allclose(batched.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_predict_proba_rejects_empty_and_single_string(tiny_settings: Settings) -> None:
    model = load_classifier(tiny_settings, Precision.FP32)
    tokenizer = load_tokenizer(tiny_settings)
    with pytest.raises(ValueError, match="No texts to predict"):
        predict_proba(model, tokenizer, [])
    with pytest.raises(TypeError, match="list of texts, not a single string"):
        predict_proba(model, tokenizer, "one headline")


def test_latencies_are_one_positive_number_per_text(tiny_settings: Settings) -> None:
    model = load_classifier(tiny_settings, Precision.FP32)
    timings = latencies_ms(model, load_tokenizer(tiny_settings), TEXTS, warmup=1)
    assert timings.shape == (len(TEXTS),)
    assert (timings > 0).all()


def test_full_precision_merge_gives_the_logits_of_base_plus_adapter(tiny_settings: Settings, adapter_dir: Path) -> None:
    separate = logits(load_trained(tiny_settings, adapter_dir, Precision.FP32), tiny_settings)
    merged_model = merge_into_original(tiny_settings, adapter_dir)
    assert not any("lora" in name for name, _ in merged_model.named_parameters())
    base = logits(load_classifier(tiny_settings, Precision.FP32), tiny_settings)
    assert (separate - base).abs().max() > 1e-3  # the adapter changes the output ...
    torch.testing.assert_close(
        logits(merged_model, tiny_settings), separate, atol=1e-5, rtol=1e-4
    )  # ... and merging keeps it


def test_merge_into_4bit_stays_quantized_and_rounds_the_update(tiny_settings: Settings, adapter_dir: Path) -> None:
    separate = logits(load_trained(tiny_settings, adapter_dir), tiny_settings)
    with pytest.warns(UserWarning, match="rounding errors"):
        merged_4bit = merge_into_4bit(tiny_settings, adapter_dir)
    assert is_quantized_model(merged_4bit)
    error_4bit = (logits(merged_4bit, tiny_settings) - separate).abs().max()
    assert error_4bit > 1e-4  # re-quantizing the sum rounds part of the update away


def test_requantized_merge_is_4bit_with_full_precision_head(
    tiny_settings: Settings, adapter_dir: Path, tmp_path: Path
) -> None:
    merged = merge_into_original(tiny_settings, adapter_dir)
    folder = save_merged(merged, load_tokenizer(tiny_settings), tmp_path / "merged")
    requantized = load_requantized(tiny_settings, folder)
    assert is_quantized_model(requantized)
    torch.testing.assert_close(requantized.classifier.weight, merged.classifier.weight)
    assert predict_proba(requantized, load_tokenizer(tiny_settings), TEXTS).shape == (len(TEXTS), 4)


def test_loading_a_missing_adapter_says_to_train_first(tiny_settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Train one first"):
        load_trained(tiny_settings, tmp_path / "nothing")


@pytest.mark.parametrize(
    ("device", "compute_dtype"),
    [("cpu", torch.float32), ("cuda", torch.bfloat16), ("cuda", torch.float16)],
)
def test_merges_are_built_in_fp32_on_every_device(
    monkeypatch: pytest.MonkeyPatch,
    tiny_settings: Settings,
    adapter_dir: Path,
    device: str,
    compute_dtype: torch.dtype,
) -> None:
    """On a GPU too the merge base is fp32, not the 16-bit compute dtype (the loads run on this CPU, recorded)."""
    requested = []

    def recording_load(settings: Settings, precision: Precision | str = inference.QLORA_PRECISION) -> object:
        requested.append((settings.device, Precision(precision)))
        return load_classifier(tiny_settings, precision)

    monkeypatch.setattr(inference, "load_classifier", recording_load)
    chosen = replace(tiny_settings, device=device, compute_dtype=compute_dtype)
    base = inference.dequantized_base(chosen)
    inference.merge_into_original(chosen, adapter_dir)
    assert inference.MERGE_PRECISION is Precision.FP32
    assert sorted(requested) == [(device, Precision.FP32), (device, Precision.FP32), (device, Precision.NF4_DQ)]
    assert {parameter.dtype for parameter in base.parameters()} == {torch.float32}


def test_hardest_mistakes_are_the_most_confident_wrong_ones() -> None:
    probabilities = np.array(
        [
            [0.9, 0.1, 0.0, 0.0],  # right
            [0.6, 0.4, 0.0, 0.0],  # wrong (true 1), confidence 0.6
            [0.0, 0.0, 0.05, 0.95],  # wrong (true 2), confidence 0.95
            [0.0, 0.0, 0.2, 0.8],  # right
        ]
    )
    table = hardest_mistakes(["a", "b", "c", "d"], [0, 1, 2, 3], probabilities, count=5)
    assert table["text"].tolist() == ["c", "b"]
    assert table["predicted"].tolist() == ["Sci/Tech", "World"]
    assert table["true"].tolist() == ["Business", "Sports"]
    np.testing.assert_allclose(table["confidence"], [0.95, 0.6])
