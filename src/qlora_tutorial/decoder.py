"""A decoder LLM for QLoRA: loading it at a precision, adapters on every linear layer, scoring and generating.

Taught in notebook 08. The same four steps as the classifier (quantize the
base, attach adapters, train only them, merge or keep them), on
SmolLM2-Instruct: a Llama-architecture decoder whose linear layers hold most
of its weights. Loading goes through ``modeling.quantization_config`` and the
CPU-repacking guard like the classifier; the output layer (``lm_head``, tied
to the embeddings) stays in full precision.

Two ways to ask the model for a topic: ``generate_answers`` lets it write
freely (what a chat user sees), and ``score_topics`` reads, at the position
where the answer begins, the probability of the first token of each of the
four topic names, which gives an accuracy on every row without parsing text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from qlora_tutorial.cpu_packing import keep_standard_layout
from qlora_tutorial.data import LABEL_NAMES
from qlora_tutorial.decoder_profile import DecoderProfile
from qlora_tutorial.devices import model_device, placement, to_model_device
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.gguf_conversion import packaged_decoder_dir
from qlora_tutorial.inference import MERGE_PRECISION, copy_dequantized_weights
from qlora_tutorial.modeling import (
    QLORA_PRECISION,
    Precision,
    load_adapter,
    parse_precision,
    quantization_config,
    storage_dtype,
)
from qlora_tutorial.settings import Settings
from qlora_tutorial.sources import PACKAGED_SMOLLM2

DECODER_HEAD = ("lm_head",)
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


def decoder_path(settings: Settings, profile: DecoderProfile) -> str:
    """What ``from_pretrained`` loads: the packaged decoder (converted on first use), or a folder or Hub id."""
    if profile.model_name == PACKAGED_SMOLLM2:
        return str(packaged_decoder_dir(settings))
    return profile.model_name


def load_decoder_tokenizer(settings: Settings, profile: DecoderProfile) -> PreTrainedTokenizerBase:
    """The decoder's tokenizer, with its chat template."""
    return AutoTokenizer.from_pretrained(decoder_path(settings, profile), revision=profile.model_revision)


def load_decoder(
    settings: Settings, profile: DecoderProfile, precision: Precision | str = QLORA_PRECISION
) -> PreTrainedModel:
    """The decoder at ``precision``, wholly on ``settings.device``, its 4-bit layers guarded against CPU repacking.

    ``lm_head`` is kept out of quantization (it is tied to the input
    embeddings, which bitsandbytes never quantizes). Safetensors only; a Hub
    token, if any, comes from the environment (``HF_TOKEN``).
    """
    precision = parse_precision(precision)
    model = AutoModelForCausalLM.from_pretrained(
        decoder_path(settings, profile),
        revision=profile.model_revision,
        quantization_config=quantization_config(precision, settings.compute_dtype, skip_modules=DECODER_HEAD),
        dtype=storage_dtype(precision, settings.compute_dtype),
        device_map=placement(settings),
        use_safetensors=True,
    )
    return keep_standard_layout(model)


def decoder_lora_config(profile: DecoderProfile, targets: Sequence[str] = ALL_LINEAR_TARGETS) -> LoraConfig:
    """LoRA on every linear layer of the decoder (the QLoRA paper's finding), ``CAUSAL_LM``: no head to train."""
    return LoraConfig(
        r=profile.lora_r,
        lora_alpha=profile.lora_alpha,
        lora_dropout=profile.lora_dropout,
        target_modules=list(targets),
        task_type="CAUSAL_LM",
    )


def lora_parameters_by_target(model: PeftModel) -> dict[str, int]:
    """Trainable LoRA parameters per kind of linear layer (``q_proj``: all of its A and B matrices, every layer)."""
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and ".lora_" in name:
            kind = name.split(".lora_")[0].rsplit(".", 1)[-1]
            counts[kind] = counts.get(kind, 0) + parameter.numel()
    return counts


def topic_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The first token of each topic name, in label order; they must differ for the scores to tell topics apart."""
    first = [tokenizer(name, add_special_tokens=False)["input_ids"][0] for name in LABEL_NAMES]
    if len(set(first)) != len(first):
        raise UserInputError(
            f"The topic names {LABEL_NAMES} start with the same token in this tokenizer ({first}), "
            "so their first-token scores cannot tell them apart. Use a tokenizer that splits them differently."
        )
    return first


def left_padded(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], model: torch.nn.Module | torch.device
) -> BatchEncoding:
    """A batch padded on the left, so every row's last position is where its answer begins, on the model's device.

    Position ids count real tokens only, so a row scores the same in any
    batch, whatever padding its neighbours need. ``model`` may be the device
    itself (``devices.model_device``, found once outside a loop).
    """
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return to_model_device(batch, model)


def by_length(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> np.ndarray:
    """The order that sorts texts by token count: batches of similar length pad little."""
    return np.argsort(
        [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]], kind="stable"
    )


def check_prompts(prompts: Sequence[str]) -> None:
    """Refuse an empty list of prompts, which would otherwise fail deep inside the tokenizer."""
    if not prompts:
        raise UserInputError("No prompts given: pass at least one (chat.prompts(tokenizer, texts, ...)).")


@torch.no_grad()
def score_topics(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], batch_size: int = 16
) -> np.ndarray:
    """Log-probabilities of each topic name's first token at the answer position: an array (prompts, 4).

    Its argmax is the model's answer among the four topics. Only the last
    position's logits are computed (``logits_to_keep=1``): the 49,152-wide
    output layer is the costliest single matmul per position.
    """
    check_prompts(prompts)
    ids = topic_token_ids(tokenizer)
    scores = np.empty((len(prompts), len(ids)), dtype=np.float32)
    order = by_length(tokenizer, prompts)
    device = model_device(model)
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        rows = order[start : start + batch_size]
        batch = left_padded(tokenizer, [prompts[i] for i in rows], device)
        logits = model(**batch, logits_to_keep=1).logits[:, -1, :].float()
        scores[rows] = torch.log_softmax(logits, dim=-1)[:, ids].cpu().numpy()
    model.train(was_training)
    return scores


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int = 12
) -> list[str]:
    """What the model writes after each prompt, greedily (no sampling), up to ``max_new_tokens`` tokens."""
    check_prompts(prompts)
    batch = left_padded(tokenizer, prompts, model)
    batch.pop("position_ids")  # generate() derives them from the attention mask itself
    was_training = model.training
    model.eval()
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def dequantized_decoder(settings: Settings, profile: DecoderProfile) -> PreTrainedModel:
    """The fp32 decoder whose linear layers hold the NF4 weights, dequantized: what QLoRA trained against.

    Scoring it gives the 4-bit model's answers at full-precision speed (notebook
    08 checks that they agree), and merging an adapter into it reproduces the
    trained model (as notebook 05 showed for the classifier).
    """
    base = load_decoder(settings, profile, MERGE_PRECISION)
    copy_dequantized_weights(load_decoder(settings, profile, QLORA_PRECISION), base)
    return base


def merge_decoder(settings: Settings, profile: DecoderProfile, adapter_dir: str) -> PreTrainedModel:
    """The trained adapter merged into the dequantized base: one plain fp32 model, ready to save and ship."""
    return load_adapter(dequantized_decoder(settings, profile), adapter_dir).merge_and_unload()
