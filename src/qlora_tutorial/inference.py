"""Using a trained adapter: batched prediction, latency, and the ways to merge it.

Taught in notebook 05. Prediction needs no ``Trainer``: texts are tokenized
without padding, sorted by length, and each batch is padded only to its own
longest text (dynamic padding), so short headlines cost short sequences.

Merging folds the LoRA update ``B @ A * alpha / r`` into base weights so the
adapter layers disappear. Which base weights decides what the merged model is:

* into the dequantized base (``merge_into_dequantized``): the NF4 weights the
  adapter was trained against, dequantized to fp32, plus the update.
  This reproduces the trained model up to float rounding;
* into the original weights (``merge_into_original``): the full-precision
  checkpoint the NF4 base was quantized from, plus the update. The adapter
  never saw these weights, so the result differs by the quantization error;
* into the 4-bit base (``merge_into_4bit``): PEFT (0.21) dequantizes each NF4
  weight, adds the update and quantizes the sum to NF4 again: the sum gets
  new block constants and each weight snaps to a new level, so the change is
  not the update.

The first two are built in fp32 on every device, a GPU included
(``MERGE_PRECISION``). A full-precision merge can be saved (``save_merged``)
and reloaded quantized to NF4 (``load_requantized``); that rounds the same sum
as the merge into 4 bit (notebook 05, exercise 4), so the trained model ships
as the adapter kept separate or as the dequantized merge in full precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from time import perf_counter

import bitsandbytes as bnb
import numpy as np
import pandas as pd
import torch
from bitsandbytes.functional import dequantize_4bit
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qlora_tutorial.data import LABEL_NAMES
from qlora_tutorial.devices import model_device, to_model_device
from qlora_tutorial.modeling import QLORA_PRECISION, Precision, load_adapter, load_classifier
from qlora_tutorial.settings import Settings


def check_texts(texts: Sequence[str]) -> list[str]:
    """The texts as a list, or a clear error for a single string or an empty input."""
    if isinstance(texts, str):
        raise TypeError(f"Pass a list of texts, not a single string: predict_proba(model, tokenizer, [{texts!r}]).")
    texts = list(texts)
    if not texts:
        raise ValueError("No texts to predict: pass a non-empty list of strings (e.g. news headlines).")
    return texts


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 128,
) -> np.ndarray:
    """Logits, one row per text (in the input order), with dynamic padding.

    Texts are sorted by token count so that each batch pads to a similar
    length; the rows are put back in the input order before returning.
    """
    texts = check_texts(texts)
    model.eval()
    device = model_device(model)
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
    logits = np.empty((len(texts), model.config.num_labels), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        features = [{key: values[i] for key, values in encoded.items()} for i in rows]
        batch = to_model_device(tokenizer.pad(features, return_tensors="pt"), device)
        logits[rows] = model(**batch).logits.float().cpu().numpy()
    return logits


def predict_proba(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 128,
) -> np.ndarray:
    """Class probabilities, one row per text (in the input order): the softmax of ``predict_logits``."""
    logits = predict_logits(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    return torch.softmax(torch.from_numpy(logits), dim=-1).numpy()


@torch.inference_mode()
def latencies_ms(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int = 128,
    warmup: int = 3,
) -> np.ndarray:
    """Milliseconds per text at batch size 1 (tokenize and forward pass), after ``warmup`` untimed calls.

    This is the latency one request sees when texts arrive one at a time; the
    median of these numbers is what notebook 05 compares across merge variants.
    """
    texts = check_texts(texts)
    model.eval()
    device = model_device(model)

    def run(text: str) -> None:
        batch = to_model_device(tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt"), device)
        model(**batch)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for text in texts[:warmup]:
        run(text)
    timings = []
    for text in texts:
        started = perf_counter()
        run(text)
        timings.append((perf_counter() - started) * 1000)
    return np.asarray(timings)


def interleaved_latencies_ms(
    models: dict[str, torch.nn.Module],
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    rounds: int = 3,
    max_length: int = 128,
) -> dict[str, np.ndarray]:
    """Batch-size-1 latencies of several models, timed in interleaved rounds (A, B, C, then A, B, C again).

    On a shared machine the load drifts; interleaving gives every model a share of each period, so a
    difference between their medians is not just a difference between the moments they were timed.
    """
    if rounds < 1:
        raise ValueError(f"Time at least one round, got rounds={rounds}.")
    timings: dict[str, list[np.ndarray]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            timings[name].append(latencies_ms(model, tokenizer, texts, max_length=max_length))
    return {name: np.concatenate(rows) for name, rows in timings.items()}


def hardest_mistakes(
    texts: Sequence[str], labels: Sequence[int], probabilities: np.ndarray, count: int = 10
) -> pd.DataFrame:
    """The ``count`` wrong predictions made with the highest confidence, most confident first."""
    labels = np.asarray(labels)
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    chosen = wrong[np.argsort(-confidence, kind="stable")[:count]]
    return pd.DataFrame(
        {
            "text": [texts[i] for i in chosen],
            "true": [LABEL_NAMES[labels[i]] for i in chosen],
            "predicted": [LABEL_NAMES[predicted[i]] for i in chosen],
            "confidence": probabilities[chosen, predicted[chosen]],
        }
    )


MERGE_PRECISION = Precision.FP32
"""The precision every merge is built and kept in, on every device (notebook 05).

On the CPU it is also the compute dtype, so nothing changes there. On a GPU it
is fp32 too, not the 16-bit compute dtype: rounding ``W + ΔW`` to bf16 moves
each weight by up to half a bf16 ulp, about 6% of a typical ``|ΔW|``, and a
16-bit base would also hold the embeddings, norms and head in 16 bit where
training kept them in fp32. In fp32 the merge into the dequantized base is the
trained model's arithmetic on both devices.
"""


TRAIN_CLASSIFIER_HINT = "qlora_tutorial.pipeline.train_and_evaluate(settings, folder), or run notebook 04"


def check_adapter_dir(adapter_dir: str | Path, how_to_train: str = TRAIN_CLASSIFIER_HINT) -> Path:
    """The adapter folder, or a clear error, saying how to train one, when it holds no saved adapter."""
    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"No adapter in {folder} (adapter_config.json is missing). Train one first: {how_to_train}."
        )
    return folder


def load_trained(
    settings: Settings, adapter_dir: str | Path, precision: Precision | str = QLORA_PRECISION
) -> PeftModel:
    """A fresh base at ``precision`` with the saved adapter loaded on top, kept separate (a ``PeftModel``)."""
    folder = check_adapter_dir(adapter_dir)
    return load_adapter(load_classifier(settings, precision), str(folder))


def merge_into_4bit(settings: Settings, adapter_dir: str | Path) -> PreTrainedModel:
    """Merge the adapter into the 4-bit base: dequantize, add the update, quantize again (loses part of it)."""
    return load_trained(settings, adapter_dir, QLORA_PRECISION).merge_and_unload()


def merge_into_original(settings: Settings, adapter_dir: str | Path) -> PreTrainedModel:
    """Merge the adapter into the original, unquantized checkpoint, in fp32 on every device (``MERGE_PRECISION``).

    The adapter was trained against the NF4 weights, not these, so the result differs from the trained
    model by the base's quantization error, as notebook 05 measures.
    """
    return load_trained(settings, adapter_dir, MERGE_PRECISION).merge_and_unload()


def dequantized_base(settings: Settings) -> PreTrainedModel:
    """The fp32 model whose quantized layers hold the NF4 weights, dequantized: what QLoRA trained against.

    bitsandbytes dequantizes to the dtype the weights were quantized from: fp32
    on the CPU; on a GPU the 16-bit compute dtype, which is exactly the weight
    the 4-bit layers computed with in training, and which fp32 holds without
    rounding. Both models sit on ``settings.device``, so the copy stays there.
    """
    return copy_dequantized_weights(
        load_classifier(settings, QLORA_PRECISION), load_classifier(settings, MERGE_PRECISION)
    )


def copy_dequantized_weights(quantized: torch.nn.Module, base: PreTrainedModel) -> PreTrainedModel:
    """Overwrite each of ``base``'s linear weights with the dequantized weight of the same 4-bit layer in ``quantized``.

    Both models must have the same layer names. (Notebook 08's decoder dequantizes in place instead:
    ``decoder_shipping.without_quantization``.)
    """
    for name, layer in quantized.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            target = base.get_submodule(name).weight
            target.data = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(target.dtype)
    return base


def merge_into_dequantized(settings: Settings, adapter_dir: str | Path) -> PreTrainedModel:
    """Merge the adapter into the dequantized NF4 base: the trained model, as plain full-precision weights."""
    return load_adapter(dequantized_base(settings), str(check_adapter_dir(adapter_dir))).merge_and_unload()


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: str | Path) -> Path:
    """Save a merged model and its tokenizer as an ordinary transformers checkpoint (safetensors)."""
    folder = Path(output_dir)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def load_requantized(settings: Settings, merged_dir: str | Path) -> PreTrainedModel:
    """Reload a saved full-precision merged model quantized to NF4 (the series' 4-bit config)."""
    merged = replace(settings, model_name=str(merged_dir), model_revision=None)
    return load_classifier(merged, QLORA_PRECISION)
