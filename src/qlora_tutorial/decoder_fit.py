"""Will the decoder's run fit? The estimator of notebook 09, asked before anything is loaded (notebook 08).

Notebook 08 runs the same cells with SmolLM2-135M on a CPU and with a 7-8B
decoder on a T4. Before any weight loads, the decoder's config (a few
kilobytes, ``decoder.decoder_config``) gives its shape, and
``estimator.estimate_peak`` predicts the training peak at the profile's batch
and the longest training example. Where that does not fit the device, the
batch is cut into micro-batches with gradient accumulation (the same examples
per optimizer step, fewer at once), down to one example; where even one does
not fit, the run is refused before anything is allocated. After training,
``merge_verdict`` asks the same of a 16-bit merge, which an 8B model on a T4
cannot afford: its adapter ships alone.
"""

from __future__ import annotations

from dataclasses import replace

import psutil
import torch
from peft import PeftModel
from transformers import PretrainedConfig

from qlora_tutorial.decoder_profile import DecoderProfile
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.estimator import FitVerdict, RunSpec, RunWouldNotFit, check_fits, estimate_peak
from qlora_tutorial.memory import logical_numel, weight_memory
from qlora_tutorial.projection import GIB
from qlora_tutorial.settings import Settings
from qlora_tutorial.shapes import DecoderShape

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")
MARGIN = 0.10  # the share of the memory left free: the allocator's fragmentation, and the estimator's error


def shape_from_config(config: PretrainedConfig, name: str) -> DecoderShape:
    """The shape the estimator prices, read from a Llama-architecture config (Llama, Mistral, Qwen2, SmolLM2)."""
    missing = [field for field in SHAPE_FIELDS if getattr(config, field, None) is None]
    if missing:
        raise UserInputError(
            f"{name}'s config has no {', '.join(missing)}: the memory estimator prices Llama-architecture "
            "decoders (attention and a gated MLP in every block), such as Llama, Mistral, Qwen2 and SmolLM2."
        )
    return DecoderShape(
        name=name,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        heads=config.num_attention_heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(config, "attention_bias", False)),
    )


def training_spec(settings: Settings, profile: DecoderProfile, shape: DecoderShape, seq_len: int) -> RunSpec:
    """The decoder's QLoRA run as the estimator sees it: the profile's batch, rank and checkpointing, this device."""
    return RunSpec(
        shape,
        "qlora",
        batch_size=profile.batch_size,
        seq_len=seq_len,
        gradient_checkpointing=profile.gradient_checkpointing,
        compute_dtype=DTYPE_NAMES[settings.compute_dtype],
        lora_r=profile.lora_r,
        device=settings.device,
    )


def available_memory(settings: Settings) -> tuple[int, str]:
    """The memory a run on ``settings.device`` may use, and where that is.

    A GPU: what CUDA reports for the card (``total_memory``; the estimator's
    parts include the CUDA context), named as CUDA names it. The CPU: this
    machine's available memory now (``psutil``), as notebook 09 decides.
    """
    if settings.device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    return psutil.virtual_memory().available, "this machine"


def free_memory(settings: Settings) -> tuple[int, str]:
    """The memory free now on ``settings.device``, and where: what a new allocation can still get.

    A GPU: CUDA's free memory plus what PyTorch's caching allocator holds
    unused (it hands that out first). The CPU: ``available_memory``'s.
    """
    if settings.device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        return free + cached, torch.cuda.get_device_name(0)
    return available_memory(settings)


def batch_verdicts(spec: RunSpec, available_bytes: int, where: str, margin: float = MARGIN) -> dict[int, FitVerdict]:
    """The verdict at the spec's batch and at each smaller divisor of it, largest first, down to the first that fits."""
    verdicts: dict[int, FitVerdict] = {}
    for batch in range(spec.batch_size, 0, -1):
        if spec.batch_size % batch == 0:
            verdicts[batch] = check_fits(estimate_peak(replace(spec, batch_size=batch)), available_bytes, margin, where)
            if verdicts[batch].fits:
                break
    return verdicts


def micro_batch_size(verdicts: dict[int, FitVerdict]) -> int:
    """The largest batch that fits (``batch_verdicts``); ``RunWouldNotFit`` before anything loads if none does."""
    fitting = [batch for batch, verdict in verdicts.items() if verdict.fits]
    if not fitting:
        raise RunWouldNotFit(
            f"At a batch of one example, {verdicts[min(verdicts)].message}. Use a device with more memory, "
            "shorter texts (max_text_tokens) or a smaller model (QLORA_DECODER_MODEL)."
        )
    return max(fitting)


def merged_bytes(model: PeftModel, dtype: torch.dtype) -> int:
    """The size of ``model`` merged into plain weights of ``dtype``: every base parameter, no adapter."""
    parameters = sum(logical_numel(parameter) for name, parameter in model.named_parameters() if "lora_" not in name)
    return parameters * dtype.itemsize


def merge_verdict(
    model: PeftModel, dtype: torch.dtype, available_bytes: int, where: str, margin: float = MARGIN
) -> FitVerdict:
    """Whether merging ``model`` (a 4-bit base with its adapter) into ``dtype`` fits beside what it holds now.

    The merge (``decoder_shipping.merge_adapter``) frees each 4-bit layer as
    it writes the merged one, so it needs the merged size less the model's
    weights now, out of ``available_bytes`` (the memory free now).
    """
    merged = merged_bytes(model, dtype)
    extra = merged - weight_memory(model).total_bytes
    fits = extra <= (1 - margin) * available_bytes
    dtype_name = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    return FitVerdict(
        fits,
        f"the {dtype_name} merge is {merged / GIB:.2f} GiB, {extra / GIB:.2f} GiB more than the 4-bit model; "
        f"{where} has {available_bytes / GIB:.1f} GiB free (margin {margin:.0%}): "
        + ("fits" if fits else "too large, the adapter ships alone"),
    )
