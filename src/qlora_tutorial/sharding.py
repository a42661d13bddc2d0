"""What each rank holds when a QLoRA model is replicated (DDP) or sharded (FSDP), measured on CPU processes.

Taught in notebook 07. ``python -m qlora_tutorial.sharding --wrap fsdp2``,
started by ``accelerate launch`` (or torchrun), loads the profile's QLoRA model
on every rank, wraps it, and trains a few steps on the same rows in the same
order. Rank 0 writes a JSON report: the loss of every step (the mean over the
global batch) and, for each rank, the bytes of parameters, gradients and AdamW
state it holds, and of the 4-bit layers' quantization state, which is no
parameter (bitsandbytes keeps it on ``Linear4bit.quant_state``), so no wrapper
shards it.

- ``none``: one process, no wrapper: the reference.
- ``ddp``: every rank holds the whole model; DDP averages the gradients.
- ``fsdp1``: ``FullyShardedDataParallel``, the wrapper of accelerate's
  FSDP-QLoRA config (one unit per transformer block, trainable leaves in units
  of their own, ``use_orig_params=False``). It flattens each unit's parameters
  into one tensor, and refuses bitsandbytes' default uint8 storage of 4-bit
  weights; a float ``bnb_4bit_quant_storage`` is what makes them flattenable.
- ``fsdp2``: ``fully_shard`` on every transformer block and on the whole model:
  each parameter is cut along its first dimension, one piece per rank.

Dropout is switched off, so every wrapper must reproduce the reference losses:
data parallelism is meant to train the same model. The plain loop here (AdamW,
constant learning rate) is not the series' ``Trainer``: it isolates what the
wrappers change; tests/test_distributed.py checks the ``Trainer`` pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import CustomPolicy
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers.modeling_layers import GradientCheckpointingLayer

from qlora_tutorial.cpu_packing import linear4bit_layers
from qlora_tutorial.data import load_splits
from qlora_tutorial.distributed import strip_paths, world_size
from qlora_tutorial.memory import quant_state_bytes, tensor_bytes
from qlora_tutorial.modeling import attach_lora, load_classifier, load_tokenizer
from qlora_tutorial.settings import Settings, load_settings

WRAPS = ("none", "ddp", "fsdp1", "fsdp2")


@dataclass(frozen=True)
class RankMemory:
    """What one rank holds after its last step, in bytes: its own shards (``optimizer_state``: AdamW's moments).

    ``quant_state``: the 4-bit layers' absmax, code books and nested constants, all of them on every rank.
    """

    parameters: int
    quantized_weights: int
    quant_state: int
    gradients: int
    optimizer_state: int


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank stores for ``tensors``: the local shard of a sharded (DTensor) one, all of a plain one."""
    return sum(tensor_bytes(t.to_local() if isinstance(t, DTensor) else t) for t in tensors)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to zero (LoRA's included): each rank's masks would depend on its batch."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks (``BertLayer`` here): one FSDP unit each, as accelerate's wrap policy makes."""
    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def fsdp1_policy(model: torch.nn.Module) -> CustomPolicy:
    """Accelerate's FSDP-QLoRA wrapping, after PEFT's policy: transformer blocks, and each trainable leaf alone."""
    blocks = set(transformer_blocks(model))

    def is_unit(module: torch.nn.Module) -> bool:
        trainable_leaf = not list(module.children()) and any(p.requires_grad for p in module.parameters())
        return module in blocks or trainable_leaf

    return CustomPolicy(is_unit)


def wrap(model: torch.nn.Module, how: str) -> torch.nn.Module:
    """``model`` wrapped for data parallelism on CPU ranks (a gloo process group must exist, except for ``none``)."""
    if how == "none":
        return model
    if how == "ddp":
        return DistributedDataParallel(model)
    if how == "fsdp1":  # FSDP1 picks an accelerator unless it is told the device
        return FullyShardedDataParallel(
            model, auto_wrap_policy=fsdp1_policy(model), use_orig_params=False, device_id=torch.device("cpu")
        )
    if how == "fsdp2":
        mesh = init_device_mesh("cpu", (world_size(),))
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    raise ValueError(f"Unknown wrapper {how!r}. Known: {', '.join(WRAPS)}.")


def rank_batches(settings: Settings, steps: int, global_batch: int) -> list[dict[str, torch.Tensor]]:
    """The calling rank's slice of the first ``steps`` global batches of the training split, each padded alone."""
    ranks, rank = world_size(), dist.get_rank() if world_size() > 1 else 0
    if global_batch % ranks:
        raise ValueError(f"A global batch of {global_batch} does not split evenly over {ranks} ranks.")
    per_rank = global_batch // ranks
    train = load_splits(settings)["train"]
    if steps * global_batch > len(train):
        raise ValueError(f"{steps} steps of {global_batch} rows need more than the {len(train)} training rows.")
    tokenizer = load_tokenizer(settings)
    batches = []
    for step in range(steps):
        start = step * global_batch + rank * per_rank
        rows = train[start : start + per_rank]
        batch = tokenizer(
            rows["text"], truncation=True, max_length=settings.profile.max_length, padding=True, return_tensors="pt"
        )
        batches.append({**batch, "labels": torch.tensor(rows["label"])})
    return batches


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (every rank must call this)."""
    if world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world_size()
    return value.item()


def train_steps(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], learning_rate: float
) -> tuple[list[float], RankMemory]:
    """Train on ``batches`` with AdamW: each step's loss (mean over ranks), and what this rank holds at the end."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    losses: list[float] = []
    gradients = 0
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        gradients = local_bytes(p.grad for p in trainable if p.grad is not None)
        optimizer.step()
        losses.append(mean_over_ranks(loss.detach()))
    moments = [  # AdamW's two moments per parameter; the one-number step counts are left out
        value
        for values in optimizer.state.values()
        for value in values.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    ]
    memory = RankMemory(
        parameters=local_bytes(model.parameters()),
        quantized_weights=local_bytes(layer.weight for layer in linear4bit_layers(model)),
        quant_state=sum(quant_state_bytes(layer.quant_state) for layer in linear4bit_layers(model)),
        gradients=gradients,
        optimizer_state=local_bytes(moments),
    )
    return losses, memory


def probe(settings: Settings, how: str, steps: int, global_batch: int) -> dict[str, Any]:
    """Load, wrap and train the QLoRA model on this rank; the report (every rank must call this).

    A wrapper that refuses the model leaves its error in the report, file paths
    cut to their names, instead of the losses and the bytes per rank.
    """
    batches = rank_batches(settings, steps, global_batch)
    model = attach_lora(load_classifier(settings))
    disable_dropout(model)
    report: dict[str, Any] = {"wrap": how, "world_size": world_size(), "global_batch_size": global_batch}
    try:
        wrapped = wrap(model, how)
    except (ValueError, RuntimeError, TypeError) as error:  # what torch raises for a model it cannot wrap
        return {**report, "error": f"{type(error).__name__}: {strip_paths(str(error))}"}
    losses, memory = train_steps(wrapped, batches, settings.profile.learning_rate)
    ranks: list[Any] = [asdict(memory)]
    if world_size() > 1:
        ranks = [None] * world_size()
        dist.all_gather_object(ranks, asdict(memory))
    return {**report, "losses": losses, "ranks": ranks}


def main(argv: list[str] | None = None) -> int:
    """Run the probe for each wrapper in turn on this rank (a gloo group when launched with several ranks).

    Rank 0 writes the reports, one per wrapper, as a JSON list.
    """
    parser = argparse.ArgumentParser(prog="python -m qlora_tutorial.sharding", description=__doc__)
    parser.add_argument("--wrap", nargs="+", choices=WRAPS, required=True, help="the wrappers to try, in order")
    parser.add_argument("--profile", help="the profile whose model, data and learning rate are used")
    parser.add_argument("--data-dir", help="folder with train/test parquet files (default: $QLORA_DATA_DIR, else Hub)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps")
    parser.add_argument("--global-batch-size", type=int, default=8, help="rows per step, over all ranks together")
    parser.add_argument("--output", type=Path, required=True, help="the JSON file rank 0 writes")
    arguments = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # set by torchrun, which accelerate launch uses
        dist.init_process_group("gloo")
    try:
        settings = load_settings(arguments.profile, data_dir=arguments.data_dir)
        reports = [probe(settings, how, arguments.steps, arguments.global_batch_size) for how in arguments.wrap]
        if world_size() == 1 or dist.get_rank() == 0:
            arguments.output.parent.mkdir(parents=True, exist_ok=True)
            arguments.output.write_text(json.dumps(reports, indent=2) + "\n")
    finally:
        if world_size() > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
