"""A decoder LLM for QLoRA: loading it at a precision, adapters on every linear layer, scoring and generating.

Taught in notebook 08. The same four steps as the classifier (quantize the
base, attach adapters, train only them, merge or keep them), on
SmolLM2-Instruct: a Llama-architecture decoder whose linear layers hold most
of its weights. Loading goes through ``modeling.quantization_config`` and the
CPU-repacking guard like the classifier; the output layer (``lm_head``, tied
to the embeddings) stays in full precision. A gated Hub model (Llama 3,
Mistral) needs an access token in ``HF_TOKEN``; without one the load stops
with a message that says so.

Two ways to ask the model for a topic: ``generate_answers`` lets it write
freely (what a chat user sees), and ``score_topics`` reads, at the position
where the answer begins, the log-probability of each of the four topic names,
all of its tokens, which gives an accuracy on every row without parsing text.
Merging, shipping and reloading the adapter are in ``decoder_shipping``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from huggingface_hub.errors import GatedRepoError
from peft import LoraConfig, PeftModel
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchEncoding,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)
from transformers.cache_utils import Cache

from qlora_tutorial.chat import end_of_turn_ids, ensure_pad_token, topic_answer_ids
from qlora_tutorial.cpu_packing import keep_standard_layout
from qlora_tutorial.data import LABEL_NAMES
from qlora_tutorial.decoder_profile import DecoderProfile
from qlora_tutorial.devices import model_device, placement, to_model_device
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.gguf_conversion import packaged_decoder_dir
from qlora_tutorial.modeling import (
    QLORA_PRECISION,
    Precision,
    attach_lora,
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
TOKEN_ENV = "HF_TOKEN"


def decoder_path(settings: Settings, profile: DecoderProfile) -> str:
    """What ``from_pretrained`` loads: the packaged decoder (converted on first use), or a folder or Hub id."""
    if profile.model_name == PACKAGED_SMOLLM2:
        return str(packaged_decoder_dir(settings))
    return profile.model_name


def is_gated(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, is the Hub refusing a gated model to this caller."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, GatedRepoError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextmanager
def gated_models_explained(model_name: str) -> Iterator[None]:
    """Turn the Hub's refusal of a gated model into a ``UserInputError`` that says what to do.

    Llama 3 and Mistral are gated: their pages ask each user to accept a
    licence, and the Hub then serves them only with that user's access token.
    The token is read from the environment (``HF_TOKEN``) and nowhere else
    by this package; on Colab, add it under Secrets and grant the notebook access.
    """
    try:
        yield
    except (OSError, GatedRepoError) as error:
        if not is_gated(error):
            raise
        page = f"https://huggingface.co/{model_name}"
        if os.environ.get(TOKEN_ENV):
            advice = (
                f"{TOKEN_ENV} is set, but its account has no access yet: accept the licence on {page} "
                "with that account (approval can take a while), then run again."
            )
        else:
            advice = (
                f"Accept its licence on {page}, create an access token (huggingface.co/settings/tokens), "
                f"and set the environment variable {TOKEN_ENV} to it before starting Python."
            )
        raise UserInputError(f"{model_name} is a gated model on the Hugging Face Hub. {advice}") from error


def decoder_config(settings: Settings, profile: DecoderProfile) -> PretrainedConfig:
    """The decoder's config alone (a few kilobytes): its shape is known before any weight is loaded.

    What a memory estimate before loading needs (layers, widths, vocabulary).
    """
    with gated_models_explained(profile.model_name):
        return AutoConfig.from_pretrained(decoder_path(settings, profile), revision=profile.model_revision)


def load_decoder_tokenizer(settings: Settings, profile: DecoderProfile) -> PreTrainedTokenizerBase:
    """The decoder's tokenizer, with its chat template and a pad token (``chat.ensure_pad_token``)."""
    with gated_models_explained(profile.model_name):
        tokenizer = AutoTokenizer.from_pretrained(decoder_path(settings, profile), revision=profile.model_revision)
    return ensure_pad_token(tokenizer)


def load_decoder(
    settings: Settings, profile: DecoderProfile, precision: Precision | str = QLORA_PRECISION
) -> PreTrainedModel:
    """The decoder at ``precision``, wholly on ``settings.device``, its 4-bit layers guarded against CPU repacking.

    ``lm_head`` is kept out of quantization (it is tied to the input
    embeddings, which bitsandbytes never quantizes). Safetensors only; a Hub
    token, if the model needs one, comes from the environment (``HF_TOKEN``).
    """
    precision = parse_precision(precision)
    with gated_models_explained(profile.model_name):
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


def attach_decoder_lora(
    model: PreTrainedModel, settings: Settings, profile: DecoderProfile, targets: Sequence[str] = ALL_LINEAR_TARGETS
) -> PeftModel:
    """The decoder with LoRA adapters on ``targets``, drawn from the profile's seed.

    Every global random generator is seeded just before the adapters'
    ``A`` matrices are drawn, so notebook 08 and ``python -m qlora_tutorial
    train-decoder`` start from the same adapters, whatever ran before.
    """
    set_seed(settings.profile.seed)
    return attach_lora(model, decoder_lora_config(profile, targets))


def lora_parameters_by_target(model: PeftModel) -> dict[str, int]:
    """Trainable LoRA parameters per kind of linear layer (``q_proj``: all of its A and B matrices, every layer)."""
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and ".lora_" in name:
            kind = name.split(".lora_")[0].rsplit(".", 1)[-1]
            counts[kind] = counts.get(kind, 0) + parameter.numel()
    return counts


def topic_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Each topic name's first token, in label order; they must differ for first-token scores to tell them apart."""
    first = [ids[0] for ids in topic_answer_ids(tokenizer)]
    if len(set(first)) != len(first):
        raise UserInputError(
            f"The topic names {LABEL_NAMES} start with the same token in this tokenizer ({first}), "
            "so their first-token scores cannot tell them apart. Score whole names (whole_names=True)."
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


def continuation_log_probs(
    model: torch.nn.Module, batch: BatchEncoding, first: torch.Tensor, cache: Cache, names: list[list[int]]
) -> torch.Tensor:
    """Log-probabilities of whole names after each prompt of ``batch``: a tensor (rows, names).

    ``first`` holds each name's first-token log-probability at the answer
    position. The later tokens of the names that have them are read in one
    more forward pass over those tokens only: the prompt's keys and values
    (``cache``, which this extends) are reused, repeated once per such name,
    so no prompt is read twice.
    """
    longer = [k for k, ids in enumerate(names) if len(ids) > 1]
    scores = first.clone()
    if not longer:
        return scores
    rows, device = batch["input_ids"].shape[0], first.device
    width = max(len(names[k]) for k in longer) - 1
    follow = torch.zeros((rows * len(longer), width), dtype=torch.long)
    follow_mask = torch.zeros_like(follow)
    for j, k in enumerate(longer):
        tail = names[k][:-1]
        follow[j :: len(longer), : len(tail)] = torch.tensor(tail)
        follow_mask[j :: len(longer), : len(tail)] = 1
    cache.batch_repeat_interleave(len(longer))
    prompt_mask = batch["attention_mask"].repeat_interleave(len(longer), dim=0)
    start = batch["position_ids"][:, -1:].repeat_interleave(len(longer), dim=0) + 1
    logits = model(
        input_ids=follow.to(device),
        attention_mask=torch.cat([prompt_mask, follow_mask.to(device)], dim=1),
        position_ids=start + torch.arange(width, device=device),
        past_key_values=cache,
        use_cache=True,
    ).logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    for j, k in enumerate(longer):
        later = torch.tensor(names[k][1:], device=device)
        steps = log_probs[j :: len(longer), : len(later)].gather(-1, later.expand(rows, -1).unsqueeze(-1))
        scores[:, k] += steps.squeeze(-1).sum(-1)
    return scores


@torch.no_grad()
def name_log_probs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int,
    names: list[list[int]],
) -> tuple[np.ndarray, np.ndarray]:
    """Each name's log-probability after each prompt, all its tokens and its first token only: two (prompts, names).

    Only the last position's logits are computed in the prompt's pass
    (``logits_to_keep=1``): the 49,152-wide output layer is the costliest
    single matmul per position. The names' later tokens cost one short pass
    that reuses the prompt's cache (``continuation_log_probs``).
    """
    check_prompts(prompts)
    firsts = torch.tensor([ids[0] for ids in names])
    whole = np.empty((len(prompts), len(names)), dtype=np.float32)
    first_only = np.empty_like(whole)
    order = by_length(tokenizer, prompts)
    device = model_device(model)
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        rows = order[start : start + batch_size]
        batch = left_padded(tokenizer, [prompts[i] for i in rows], device)
        output = model(**batch, logits_to_keep=1, use_cache=True)
        first = torch.log_softmax(output.logits[:, -1, :].float(), dim=-1)[:, firsts.to(device)]
        first_only[rows] = first.cpu().numpy()
        whole[rows] = continuation_log_probs(model, batch, first, output.past_key_values, names).cpu().numpy()
    model.train(was_training)
    return whole, first_only


def score_topics(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 16,
    *,
    whole_names: bool = True,
) -> np.ndarray:
    """Log-probability of each topic's name as the answer to each prompt: an array (prompts, 4).

    Its argmax is the model's answer among the four topics. A name is scored
    whole, all its tokens (``Sci/Tech`` is ``Sci``, ``/``, ``Tech`` in SmolLM2's
    tokenizer): the probability that the answer begins with exactly that name.
    The end of turn after it is left out on purpose: whether the model stops
    right after the name is the answer format, which fine-tuning teaches and
    a zero-shot model does not know, not which topic it means.
    ``whole_names=False`` scores the first token only (what notebook 08
    first did): a name whose first token is a common word start ("Sci") then
    stands for much else. ``topic_scores`` gives both readings from one pass.
    """
    names = topic_answer_ids(tokenizer) if whole_names else [[token] for token in topic_token_ids(tokenizer)]
    return name_log_probs(model, tokenizer, prompts, batch_size, names)[0]


@dataclass(frozen=True)
class TopicScores:
    """Two readings of the same forward passes, each an array (prompts, 4) of log-probabilities.

    ``whole_name``: every token of each topic's name (``score_topics``).
    ``first_token``: each name's first token only, the old reading, which
    notebook 08 shows beside the fair one. Names that share a first token get
    the same first-token score there, so that reading cannot tell them apart.
    """

    whole_name: np.ndarray
    first_token: np.ndarray


def topic_scores(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], batch_size: int = 16
) -> TopicScores:
    """Whole-name and first-token scores of the four topics from one pass over the prompts (notebook 08)."""
    whole, first = name_log_probs(model, tokenizer, prompts, batch_size, topic_answer_ids(tokenizer))
    return TopicScores(whole, first)


def answer_share(scores: np.ndarray) -> np.ndarray:
    """The probability the four answers hold together, per row: the sum of ``exp(score)`` over the topics.

    For whole-name scores, the probability that the model's answer begins with
    one of the four names; for first-token scores, the share of the next-token
    probability on their first tokens. Low shares say the model means to
    write something else (zero-shot, often "The article ...").
    """
    return np.exp(np.asarray(scores, dtype=np.float64)).sum(axis=1)


def calibrated_scores(scores: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """The scores minus the mean score of each topic over ``reference`` rows (default: the scored rows).

    A zero-shot model leans towards some names whatever the article; removing
    each topic's mean log-probability takes that lean out (notebook 08,
    exercise 3). With the scored rows as reference this reads their scores,
    never their labels. Pass the scores of content-free prompts (such as
    ``chat.prompt_text(tokenizer, "N/A")``) as ``reference`` for the
    contextual calibration of Zhao et al. (2021).
    """
    reference = scores if reference is None else reference
    return scores - np.asarray(reference).mean(axis=0)


def stop_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens generation stops at: the model's own eos tokens and the first token of the template's end of turn."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return list(dict.fromkeys([*configured, end_of_turn_ids(tokenizer)[0]]))


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int = 12
) -> list[str]:
    """What the model writes after each prompt, greedily (no sampling), up to ``max_new_tokens`` tokens.

    It stops at the end of its turn, as the chat template writes it (Llama 3's
    ``<|eot_id|>``, which its tokenizer's eos need not be).
    """
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
        eos_token_id=stop_token_ids(model, tokenizer),
    )
    model.train(was_training)
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
