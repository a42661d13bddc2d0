"""What notebook 08's decoder run uses on each profile: which model, how many rows and steps.

The classifier's ``settings.Profile`` decides the data, device and dtype for
both models; this adds what only the decoder needs. The CPU profiles use the
packaged SmolLM2-135M-Instruct (``sources.PACKAGED_SMOLLM2``); the `gpu`
profile a larger SmolLM2 from the Hub, which a T4 holds in NF4 with room to
spare. The `cpu` budget was chosen from the measurements notebook 08 shows:
a step of 8 rows takes seconds on 2 cores, and scoring a row a fraction of one.

``QLORA_DECODER_MODEL`` names another decoder (a Hub id such as
``meta-llama/Llama-3.1-8B-Instruct``, or a folder) on any profile, as
``QLORA_MODEL`` does for the classifier; ``--model`` of ``train-decoder``
wins over it. The `gpu` profile's recipe (NF4, gradient checkpointing,
checkpoints every ``save_steps`` steps) is the one that carries a 7-8B
decoder on a T4.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

from qlora_tutorial.settings import Settings
from qlora_tutorial.sources import HUB_DECODER, PACKAGED_SMOLLM2, check_model_name

DECODER_MODEL_ENV = "QLORA_DECODER_MODEL"
SHARED_SETTINGS = ("profile", "data", "device", "compute dtype", "optimizer", "runs saved in")


@dataclass(frozen=True)
class DecoderProfile:
    """The decoder's model and budget.

    ``eval_rows`` test rows (a class-balanced sample of the classifier's test
    split, so both models are scored on the same rows) are scored before and
    after training. ``max_text_tokens`` cuts every article, in training and
    scoring alike.
    ``gradient_checkpointing`` recomputes each block's activations in the
    backward pass instead of keeping them: on for the `gpu` profile, where a
    7-8B model's activations would not fit beside it, off on the CPU profiles,
    where a 135M model's are small. ``save_steps``: the ``Trainer`` saves a
    checkpoint every so many steps, from which an interrupted run resumes.
    """

    model_name: str
    model_revision: str | None
    train_rows: int
    steps: int
    batch_size: int
    learning_rate: float
    eval_rows: int
    max_text_tokens: int
    eval_batch_size: int = 16
    warmup_steps: int = 6
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    generated_examples: int = 4
    gradient_checkpointing: bool = False
    save_steps: int = 20

    def rows(self, settings: Settings) -> list[tuple[str, str]]:
        """(name, value) pairs: what the decoder shares with the series' settings, then its own fields.

        The classifier's fields (its model, epochs, batch, learning rate, ...)
        are left out: notebook 08 trains the decoder only.
        """
        shared = dict(settings.rows())
        pairs = [(name, shared[name]) for name in SHARED_SETTINGS]
        return pairs + [(field.name, str(getattr(self, field.name))) for field in fields(self)]

    def table(self, settings: Settings) -> str:
        """The decoder's settings as an aligned two-column text table (its first line names the profile)."""
        rows = self.rows(settings)
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


DECODER_PROFILES: dict[str, DecoderProfile] = {
    "smoke": DecoderProfile(
        model_name=PACKAGED_SMOLLM2,
        model_revision=None,
        train_rows=16,
        steps=4,
        batch_size=4,
        learning_rate=5e-4,
        eval_rows=24,
        max_text_tokens=32,
        warmup_steps=1,
        generated_examples=2,
        save_steps=2,
    ),
    "cpu": DecoderProfile(
        model_name=PACKAGED_SMOLLM2,
        model_revision=None,
        train_rows=480,
        steps=60,
        batch_size=8,
        learning_rate=5e-4,
        eval_rows=500,
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
        max_text_tokens=128,
        eval_batch_size=64,
        warmup_steps=25,
        gradient_checkpointing=True,
        save_steps=100,
    ),
}


def decoder_profile(settings: Settings, **changes: object) -> DecoderProfile:
    """The decoder profile of the settings' profile, with single fields changed (e.g. ``steps=8``).

    Unless ``changes`` names the model, ``QLORA_DECODER_MODEL`` (if set) replaces
    the profile's decoder, without a revision; a name that cannot load is refused here.
    """
    override = os.environ.get(DECODER_MODEL_ENV)
    if override and "model_name" not in changes:
        check_model_name(override, DECODER_MODEL_ENV)
        changes = {"model_name": override, "model_revision": None, **changes}
    return replace(DECODER_PROFILES[settings.profile.name], **changes)
