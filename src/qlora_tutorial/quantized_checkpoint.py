"""Saved 4-bit checkpoints: building one for a published shape with random weights, saving and loading one.

Taught in notebook 09. Quantizing while loading (``from_pretrained`` with a
``BitsAndBytesConfig``) reads the whole 16-bit checkpoint and quantizes it
layer by layer as it goes; a checkpoint saved in 4 bit (``save_pretrained`` of
a bitsandbytes 4-bit model, what Hub publishers ship as "-bnb-4bit") is read
as it is, through bitsandbytes' pre-quantized path: a quarter of the bytes,
and no quantization work. Each 4-bit linear weight is stored as six tensors:
the packed codes (``weight``, two per byte), the first-level scales
(``weight.absmax``, themselves 8-bit with double quantization), the NF4 code
book (``weight.quant_map``), the second-level scales and code book
(``weight.nested_absmax``, ``weight.nested_quant_map``) and the rest of the
state packed as JSON bytes (``weight.quant_state.bitsandbytes__nf4``).

:func:`write_random_checkpoint` writes that format for a ``shapes.DecoderShape``
without ever holding the model: one block of seeded random weights at a time,
quantized and written as one safetensors shard, with the index and
``config.json`` that ``save_pretrained`` writes. Its ``bf16`` twin writes the
same values unquantized, so the two ways of loading can be compared on
identical NF4 codes. Builds go to ``checkpoints/`` in the runs folder, through
a ``.partial`` folder renamed at the end, and are reused when present.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from time import perf_counter
from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from qlora_tutorial.cpu_packing import keep_standard_layout
from qlora_tutorial.decoder import ALL_LINEAR_TARGETS, ATTENTION_TARGETS, DECODER_HEAD
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.modeling import Precision, quantization_config
from qlora_tutorial.process_memory import MemoryPhase
from qlora_tutorial.settings import Settings
from qlora_tutorial.shapes import DecoderShape

CHECKPOINTS_FOLDER = "checkpoints"
BUILD_FILE = "random_weights.json"
INDEX_FILE = "model.safetensors.index.json"
CHECKPOINT_DTYPE = torch.bfloat16  # what the 16-bit twin stores, and what the 4-bit one was quantized from
SEED = 42
CHECKPOINT_PRECISIONS = (Precision.BF16, Precision.NF4_DQ)
FORMAT_VERSION = 1  # bump when the builder writes something different, so old builds are rebuilt
BUILD_SCRIPT = "import sys; from qlora_tutorial.quantized_checkpoint import build_from_arguments as b; b(sys.argv[1:])"


def checkpoints_dir(settings: Settings) -> Path:
    """Where built checkpoints live: ``checkpoints/`` in the runs folder, shared by every profile."""
    return settings.runs_dir / CHECKPOINTS_FOLDER


def checkpoint_dir(root: Path, shape: DecoderShape, precision: Precision | str) -> Path:
    """The folder of ``shape``'s random checkpoint at ``precision`` (``bf16`` or ``nf4-dq``) under ``root``."""
    return Path(root) / f"{shape.name}-{check_precision(precision).value}"


def check_precision(precision: Precision | str) -> Precision:
    """``precision`` if a random checkpoint can be built at it (bf16, nf4-dq), else a ``UserInputError``."""
    valid = ", ".join(p.value for p in CHECKPOINT_PRECISIONS)
    try:
        chosen = Precision(precision)
    except ValueError:
        raise UserInputError(f"Unknown checkpoint precision {precision!r}. Valid: {valid}.") from None
    if chosen not in CHECKPOINT_PRECISIONS:
        raise UserInputError(f"Random checkpoints are built at {valid}, not {chosen.value}.")
    return chosen


def tensor_seed(seed: int, name: str) -> int:
    """A seed of its own for each tensor, so a tensor's values do not depend on the order they are drawn in."""
    return zlib.crc32(f"{seed}:{name}".encode())


def random_tensor(name: str, size: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """Seeded N(0, std) values at ``CHECKPOINT_DTYPE``, drawn in place (every page written, so resident)."""
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    return torch.empty(size, dtype=CHECKPOINT_DTYPE).normal_(0.0, std, generator=generator)


def random_shards(shape: DecoderShape, seed: int = SEED) -> Iterator[dict[str, torch.Tensor]]:
    """The weights of a model of ``shape``, one shard at a time: embeddings, each block, the final norm and head.

    Linear layers and embeddings are N(0, ``initializer_range``) as transformers
    initialises a Llama, norm weights ones. Only one shard is alive at a time
    (a 7B block is 202M values, 404 MB in bf16).
    """
    std = shape.llama_config().initializer_range
    embeddings = "model.embed_tokens.weight"
    yield {embeddings: random_tensor(embeddings, (shape.vocab, shape.hidden), std, seed)}
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}."
        block = {}
        for kind, (fan_in, fan_out) in shape.linear_shapes.items():
            name = f"{prefix}{'self_attn' if kind in ATTENTION_TARGETS else 'mlp'}.{kind}.weight"
            block[name] = random_tensor(name, (fan_out, fan_in), std, seed)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            block[f"{prefix}{norm}.weight"] = torch.ones(shape.hidden, dtype=CHECKPOINT_DTYPE)
        yield block
    last = {"model.norm.weight": torch.ones(shape.hidden, dtype=CHECKPOINT_DTYPE)}
    if not shape.tied_embeddings:
        last["lm_head.weight"] = random_tensor("lm_head.weight", (shape.vocab, shape.hidden), std, seed)
    yield last


def is_quantized_weight(name: str) -> bool:
    """Whether ``name`` is the weight of one of a block's seven linear layers (what bitsandbytes quantizes)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in ALL_LINEAR_TARGETS


def nf4_config() -> BitsAndBytesConfig:
    """The ``BitsAndBytesConfig`` of the saved checkpoints: NF4, double quantization, bf16 compute, head kept."""
    return quantization_config(Precision.NF4_DQ, CHECKPOINT_DTYPE, skip_modules=DECODER_HEAD)


def quantize_shard(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A shard as a saved 4-bit model stores it: each linear weight as its six tensors, the rest unchanged.

    Quantized with ``bitsandbytes.functional.quantize_4bit`` and serialised with
    the quantization state's own ``as_dict(packed=True)``, as
    ``Linear4bit._save_to_state_dict`` does in ``save_pretrained``.
    """
    config = nf4_config()
    saved = {}
    for name, tensor in tensors.items():
        if not is_quantized_weight(name):
            saved[name] = tensor
            continue
        packed, state = quantize_4bit(
            tensor,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=config.bnb_4bit_quant_storage,
        )
        saved[name] = packed
        for key, value in state.as_dict(packed=True).items():
            saved[f"{name}.{key}"] = value
    return saved


def checkpoint_config(shape: DecoderShape, precision: Precision) -> PretrainedConfig:
    """The ``config.json`` that ``save_pretrained`` writes for this shape, with the 4-bit config where quantized."""
    config = shape.llama_config()
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = CHECKPOINT_DTYPE
    if precision is Precision.NF4_DQ:
        config.quantization_config = nf4_config()
    return config


def shard_name(index: int, count: int) -> str:
    """``model-00001-of-00034.safetensors``: ``save_pretrained``'s names for the shards of a sharded checkpoint."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def write_random_checkpoint(
    shape: DecoderShape, folder: Path, precision: Precision | str = Precision.NF4_DQ, seed: int = SEED
) -> dict[str, Any]:
    """Write ``shape``'s random checkpoint at ``precision`` into ``folder``, one shard per block; return its record.

    Written to ``<folder>.partial`` and renamed at the end, so an interrupted
    build leaves nothing that looks finished. The record (also saved as
    ``random_weights.json``) holds the shape, seed, size on disk, build seconds
    and the build's peak memory (``process_memory.PhasePeak``).
    """
    precision = check_precision(precision)
    folder = Path(folder)
    unfinished = folder.with_name(folder.name + ".partial")
    shutil.rmtree(unfinished, ignore_errors=True)
    unfinished.mkdir(parents=True)
    count = shape.layers + 2
    weight_map: dict[str, str] = {}
    total_size = 0
    started = perf_counter()
    with MemoryPhase() as phase:
        for index, shard in enumerate(random_shards(shape, seed), start=1):
            if precision is Precision.NF4_DQ:
                shard = quantize_shard(shard)
            name = shard_name(index, count)
            save_file(shard, unfinished / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            total_size += sum(tensor.numel() * tensor.element_size() for tensor in shard.values())
            del shard
    index_record = {"metadata": {"total_parameters": shape.parameters, "total_size": total_size}}
    index_record["weight_map"] = dict(sorted(weight_map.items()))
    (unfinished / INDEX_FILE).write_text(json.dumps(index_record, indent=2) + "\n")
    config = checkpoint_config(shape, precision)
    config.save_pretrained(unfinished)
    GenerationConfig.from_model_config(config).save_pretrained(unfinished)
    record = {
        "format": FORMAT_VERSION,
        "shape": shape.name,
        "parameters": shape.parameters,
        "precision": precision.value,
        "seed": seed,
        "file_bytes": sum(path.stat().st_size for path in unfinished.glob("*.safetensors")),
        "build_seconds": perf_counter() - started,
        "build_peak": phase.peak.as_dict(),
    }
    (unfinished / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    unfinished.rename(folder)
    return record


def built_record(folder: Path) -> dict[str, Any] | None:
    """The record of a finished build in ``folder``, or None where there is none."""
    marker = Path(folder) / BUILD_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


def ensure_random_checkpoint(
    shape: DecoderShape,
    root: Path,
    precision: Precision | str = Precision.NF4_DQ,
    *,
    seed: int = SEED,
    fresh_process: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """``shape``'s random checkpoint under ``root``, built on first use; return its folder and build record.

    A finished build of the same shape, precision, seed and format is reused.
    ``fresh_process`` builds in a new Python process, so the build's own peak
    is measured from a bare runtime and none of its freed memory stays in the
    caller's resident set.
    """
    precision = check_precision(precision)
    folder = checkpoint_dir(root, shape, precision)
    expected = {"format": FORMAT_VERSION, "shape": shape.name, "precision": precision.value, "seed": seed}
    record = built_record(folder)
    if record is not None and all(record.get(key) == value for key, value in expected.items()):
        return folder, record
    if not fresh_process:
        return folder, write_random_checkpoint(shape, folder, precision, seed)
    arguments = [json.dumps(asdict(shape)), str(folder), precision.value, str(seed)]
    finished = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, *arguments], capture_output=True, text=True)
    record = built_record(folder)
    if finished.returncode != 0 or record is None:
        tail = "\n".join(finished.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"Building the {precision.value} checkpoint of {shape.name} failed:\n{tail}")
    return folder, record


def build_from_arguments(arguments: Sequence[str]) -> None:
    """Entry point of the fresh build process: the shape as JSON, the folder, the precision and the seed."""
    shape_fields, folder, precision, seed = arguments
    write_random_checkpoint(DecoderShape(**json.loads(shape_fields)), Path(folder), precision, int(seed))


def load_saved_4bit(folder: str | Path, compute_dtype: torch.dtype = CHECKPOINT_DTYPE) -> PreTrainedModel:
    """A saved 4-bit checkpoint, loaded as saved (bitsandbytes' pre-quantized path), on the CPU, guarded.

    The saved ``config.json`` fixes the quantization; only its compute dtype
    is a choice of the run, so it is set in the config before loading (a
    ``quantization_config=`` argument would be ignored for a quantized
    checkpoint). The unquantized weights (embeddings, norms, head) are cast to
    ``compute_dtype`` too, as ``modeling.storage_dtype`` has it: transformers
    5.23 leaves them at the checkpoint's dtype on this path, whatever ``dtype=`` says.
    """
    config = AutoConfig.from_pretrained(folder)
    quantization = getattr(config, "quantization_config", None)
    if not isinstance(quantization, dict) or not quantization.get("load_in_4bit"):
        raise UserInputError(f"{folder} is not a saved 4-bit checkpoint: its config.json has no 4-bit quantization.")
    quantization["bnb_4bit_compute_dtype"] = str(compute_dtype).removeprefix("torch.")
    model = AutoModelForCausalLM.from_pretrained(
        folder, config=config, dtype=compute_dtype, device_map={"": "cpu"}, use_safetensors=True
    )
    for parameter in model.parameters():
        if not isinstance(parameter, bnb.nn.Params4bit) and parameter.is_floating_point():
            parameter.data = parameter.data.to(compute_dtype)
    return keep_standard_layout(model)


def load_quantizing(folder: str | Path, compute_dtype: torch.dtype = CHECKPOINT_DTYPE) -> PreTrainedModel:
    """A 16-bit checkpoint quantized to NF4 with double quantization while it loads, on the CPU, guarded."""
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=quantization_config(Precision.NF4_DQ, compute_dtype, skip_modules=DECODER_HEAD),
        dtype=compute_dtype,
        device_map={"": "cpu"},
        use_safetensors=True,
    )
    return keep_standard_layout(model)


def save_quantized(model: PreTrainedModel, folder: str | Path) -> Path:
    """``save_pretrained`` of a bitsandbytes 4-bit model, refused if an eval pass already repacked it.

    On an ``avx512_bf16`` CPU an unguarded eval-mode forward repacks the 4-bit
    weights for inference (``cpu_packing``); bitsandbytes would unpack them on
    saving with re-quantized scales, so the saved weights would differ from the
    trained ones. ``keep_standard_layout`` raises in that case, and guards the
    layers otherwise. Written to ``<folder>.partial`` and renamed at the end.
    """
    if not any(isinstance(module, bnb.nn.Linear4bit) for module in model.modules()):
        raise UserInputError("The model has no 4-bit layers: load it at nf4-dq before saving a 4-bit checkpoint.")
    keep_standard_layout(model)
    folder = Path(folder)
    unfinished = folder.with_name(folder.name + ".partial")
    shutil.rmtree(unfinished, ignore_errors=True)
    model.save_pretrained(unfinished, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    unfinished.rename(folder)
    return folder


def dequantized_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every 4-bit layer's weight, dequantized to fp32, by module name: what two loads must agree on."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            weights[name] = dequantize_4bit(weight.data, weight.quant_state).float()
    return weights
