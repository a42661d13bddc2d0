"""After the decoder is trained: the model to evaluate, the 16-bit merge, and shipping the adapter alone.

Taught in notebook 08, which applies notebook 05's merging lessons to a
decoder that may be 7-8B parameters on a 15 GB T4. At that size no
full-precision copy of the model fits beside the 4-bit one, so:

* on CUDA the 4-bit model with its adapter kept separate is what scores and
  generates (``evaluation_decoder``); on the CPU the same weights dequantized
  and merged into fp32, the merge notebook 05 found to reproduce the trained
  model, which a model small enough to train on a CPU affords;
* the merge goes into the dequantized 4-bit base, the base the adapter was
  trained against (notebook 05), layer by layer and in place, in the compute
  dtype: fp32 on the CPU, bf16 on GPUs that have it natively, fp16 on a T4.
  Rounding ``W + ΔW`` to 16 bit moves each weight by up to half a 16-bit
  step, which is not small beside ``ΔW`` (``merge_rounding`` measures it);
  the 4-bit model with its adapter computes ``W x + ΔW x`` and never rounds
  that sum. An 8B model merged in 16 bit is 16 GB, more than a T4 or Colab's
  RAM holds;
* so the default is to ship the adapter alone (``save_adapter``: tens of MB
  with the tokenizer and its chat template), and to reload it onto a fresh
  4-bit base to chat (``load_shipped_adapter``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import dequantize_4bit
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from qlora_tutorial.chat import ensure_pad_token
from qlora_tutorial.decoder import load_decoder
from qlora_tutorial.decoder_profile import DecoderProfile
from qlora_tutorial.inference import check_adapter_dir
from qlora_tutorial.modeling import QLORA_PRECISION, load_adapter
from qlora_tutorial.settings import Settings

TRAIN_DECODER_HINT = "python -m qlora_tutorial train-decoder --output-dir FOLDER, or run notebook 08"


def dense_weight(layer: torch.nn.Linear) -> torch.Tensor:
    """A linear layer's weight as a plain tensor: a 4-bit layer's dequantized (in the dtype it computes with)."""
    if isinstance(layer, bnb.nn.Linear4bit):
        return dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return layer.weight.data


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (and ``bias``) in ``dtype``, frozen, on the weight's device."""
    out_features, in_features = weight.shape
    layer = torch.nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.data.to(device=weight.device, dtype=dtype), requires_grad=False)
    return layer


def merged_weight(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The base weight (dequantized) and ``W + ΔW`` computed in fp32, for a LoRA layer and its active adapters."""
    base = dense_weight(layer.get_base_layer())
    merged = base.float()
    for adapter in layer.active_adapters:
        merged = merged + layer.get_delta_weight(adapter).float()
    return base, merged


def without_quantization(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """``model`` with every 4-bit layer replaced by a plain one holding its dequantized weight, all in ``dtype``.

    The quantization config is dropped too, so ``save_pretrained`` writes an
    ordinary checkpoint that loads at any precision.
    """
    for name, layer in list(model.named_modules()):
        if isinstance(layer, bnb.nn.Linear4bit):
            model.set_submodule(name, plain_linear(dense_weight(layer), layer.bias, dtype))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model.to(dtype)


def merge_adapter(model: PeftModel, dtype: torch.dtype) -> PreTrainedModel:
    """Fold the adapter into the dequantized base, layer by layer and in place; the plain model in ``dtype``.

    ``W + ΔW`` is summed in fp32 and rounded to ``dtype`` once. Each 4-bit
    layer is freed as its merged copy is made, so the peak is about the merged
    model, not the merged model beside a dequantized copy. PEFT's own
    ``merge_and_unload`` on a 4-bit base quantizes the sum to 4 bit again
    (notebook 05's "merged into 4 bit"), which this avoids. ``model`` is
    consumed: use the returned model.
    """
    for name, layer in list(model.named_modules()):
        if isinstance(layer, LoraLayer):
            _, merged = merged_weight(layer)
            model.set_submodule(name, plain_linear(merged, layer.get_base_layer().bias, dtype))
    return without_quantization(model.get_base_model(), dtype)


@dataclass(frozen=True)
class MergeRounding:
    """What rounding ``W + ΔW`` to a dtype does to the updates, over every adapted layer.

    ``relative_error``: the size of the rounding error beside the size of the
    updates, ``||round(W + ΔW) - (W + ΔW)|| / ||ΔW||``. ``unmoved_share``: the
    share of weights with a nonzero update whose rounded merge equals the
    rounded base weight, whose update the merge lost entirely.
    """

    dtype: str
    relative_error: float
    unmoved_share: float


@torch.no_grad()
def merge_rounding(model: PeftModel, dtype: torch.dtype) -> MergeRounding:
    """How much of the adapter's update a merge in ``dtype`` would lose to rounding (``model`` is unchanged).

    Notebook 05's lesson for a 16-bit merge, measured on this adapter: in
    fp32 the merge keeps the update; in bf16 a weight moves only in steps of
    1/128 of its own size, so a small update is rounded away.
    """
    error = update = unmoved = updated = 0.0
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            base, merged = merged_weight(layer)
            delta = merged - base.float()
            rounded = merged.to(dtype).float()
            error += float((rounded - merged).square().sum())
            update += float(delta.square().sum())
            moved = delta != 0
            unmoved += float((rounded == base.to(dtype).float())[moved].sum())
            updated += float(moved.sum())
    if update == 0:
        raise ValueError("The adapter's updates are all zero (an untrained adapter): there is nothing to round.")
    return MergeRounding(str(dtype).removeprefix("torch."), (error / update) ** 0.5, unmoved / updated)


def dequantized_decoder(settings: Settings, profile: DecoderProfile) -> PreTrainedModel:
    """The decoder whose linear layers hold the NF4 weights, dequantized: what QLoRA trained against.

    In the compute dtype (``settings.compute_dtype``): on the CPU fp32, the same
    arithmetic as the 4-bit model's, which dequantizes its weights to fp32 at
    every call (the base notebook 08's zero-shot scores come from). Loaded once
    in 4 bit and dequantized layer by layer, so no second copy is ever held.
    """
    return without_quantization(load_decoder(settings, profile, QLORA_PRECISION), settings.compute_dtype)


def load_trained_decoder(settings: Settings, profile: DecoderProfile, adapter_dir: str | Path) -> PeftModel:
    """A fresh 4-bit base of the profile's decoder with the saved adapter on top, kept separate."""
    folder = check_adapter_dir(adapter_dir, TRAIN_DECODER_HINT)
    return load_adapter(load_decoder(settings, profile, QLORA_PRECISION), str(folder))


def merge_decoder(settings: Settings, profile: DecoderProfile, adapter_dir: str | Path) -> PreTrainedModel:
    """The saved adapter merged into a fresh dequantized 4-bit base, in the compute dtype (``merge_adapter``).

    fp32 on the CPU (the trained model's arithmetic, as notebook 05 merged),
    bf16 or fp16 on a GPU: an ordinary 16-bit checkpoint, ready to save and ship.
    """
    return merge_adapter(load_trained_decoder(settings, profile, adapter_dir), settings.compute_dtype)


def evaluation_decoder(
    settings: Settings, profile: DecoderProfile, adapter_dir: str | Path | None = None
) -> torch.nn.Module:
    """The model to score and generate with: the 4-bit base (and adapter) on CUDA, dequantized into fp32 on a CPU.

    On CUDA the 4-bit model with its adapter kept separate is the trained
    model itself and holds no copy of its weights, so it works for a 7-8B
    model on a T4. On the CPU the same weights dequantized (and merged) into
    fp32 give the same answers (notebook 08 checks it), as the plain model a
    merge ships; a model that trains on a CPU fits in fp32 too.
    """
    if settings.device == "cuda":
        if adapter_dir is None:
            return load_decoder(settings, profile, QLORA_PRECISION)
        return load_trained_decoder(settings, profile, adapter_dir)
    if adapter_dir is None:
        return dequantized_decoder(settings, profile)
    return merge_decoder(settings, profile, adapter_dir)


def save_adapter(model: PeftModel, tokenizer: PreTrainedTokenizerBase, output_dir: str | Path) -> Path:
    """Save the adapter alone (safetensors) with the tokenizer, its chat template and its pad token: what ships."""
    folder = Path(output_dir)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def load_shipped_adapter(
    settings: Settings, profile: DecoderProfile, adapter_dir: str | Path
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The shipped adapter reloaded onto a fresh 4-bit base, with the tokenizer saved beside it: ready to chat.

    The base is the profile's decoder, quantized to NF4 while it loads, as in
    training; the adapter's folder holds only the adapter and the tokenizer.
    """
    folder = check_adapter_dir(adapter_dir, TRAIN_DECODER_HINT)
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(folder))
    return load_trained_decoder(settings, profile, folder), tokenizer
