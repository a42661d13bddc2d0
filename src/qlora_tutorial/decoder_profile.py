"""What notebook 08's decoder run uses on each profile: which model, how many rows and steps.

The classifier's ``settings.Profile`` decides the data, device and dtype for
both models; this adds what only the decoder needs. The CPU profiles use the
packaged SmolLM2-135M-Instruct (``sources.PACKAGED_SMOLLM2``); the `gpu`
profile a larger SmolLM2 from the Hub, which a T4 holds in NF4 with room to
spare. The `cpu` budget was chosen from the measurements notebook 08 shows:
a step of 8 rows takes seconds on 2 cores, and scoring a row a fraction of one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from qlora_tutorial.settings import Settings
from qlora_tutorial.sources import HUB_DECODER, PACKAGED_SMOLLM2


@dataclass(frozen=True)
class DecoderProfile:
    """The decoder's model and budget.

    ``eval_rows`` test rows (a class-balanced sample of the classifier's test
    split, so both models are scored on the same rows) are scored before and
    after training. ``memory_steps`` is the length of each fresh-process run
    that compares LoRA, QLoRA and gradient checkpointing. ``max_text_tokens``
    cuts every article, in training and scoring alike.
    """

    model_name: str
    model_revision: str | None
    train_rows: int
    steps: int
    batch_size: int
    learning_rate: float
    eval_rows: int
    memory_steps: int
    max_text_tokens: int
    eval_batch_size: int = 16
    warmup_steps: int = 6
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    generated_examples: int = 4


DECODER_PROFILES: dict[str, DecoderProfile] = {
    "smoke": DecoderProfile(
        model_name=PACKAGED_SMOLLM2,
        model_revision=None,
        train_rows=16,
        steps=4,
        batch_size=4,
        learning_rate=5e-4,
        eval_rows=24,
        memory_steps=2,
        max_text_tokens=32,
        warmup_steps=1,
        generated_examples=2,
    ),
    "cpu": DecoderProfile(
        model_name=PACKAGED_SMOLLM2,
        model_revision=None,
        train_rows=480,
        steps=60,
        batch_size=8,
        learning_rate=5e-4,
        eval_rows=500,
        memory_steps=6,
        max_text_tokens=64,
    ),
    "gpu": DecoderProfile(
        model_name=HUB_DECODER,
        model_revision=None,
        train_rows=8_000,
        steps=500,
        batch_size=16,
        learning_rate=2e-4,
        eval_rows=7_600,
        memory_steps=20,
        max_text_tokens=128,
        eval_batch_size=64,
        warmup_steps=25,
    ),
}


def decoder_profile(settings: Settings, **changes: object) -> DecoderProfile:
    """The decoder profile of the settings' profile, with single fields changed (e.g. ``steps=8``)."""
    return replace(DECODER_PROFILES[settings.profile.name], **changes)
