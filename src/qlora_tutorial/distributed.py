"""Data parallelism: one process per device, what DDP all-reduces, and what a multi-process run records.

Taught in notebook 07 (scaling out). ``accelerate launch`` starts one process
(a *rank*) per device; each rank holds the whole model, trains on its own
slice of every global batch, and DDP averages the gradients of the trainable
parameters across ranks before each optimizer step. For QLoRA those are only
the adapters and the head, so the bytes exchanged per step are a fraction of
full fine-tuning's: :func:`count_allreduce_bytes` measures them on a real DDP
wrapper, :func:`gradient_bytes` predicts them, and :func:`ring_allreduce_bytes`
says how many of them each rank sends. The frozen weights do travel once: DDP's
constructor broadcasts every parameter and buffer from rank 0, and each forward
pass broadcasts the buffers again (``broadcast_buffers=True``, the default);
:func:`count_broadcast_bytes` measures both.

:func:`data_parallel_arguments` holds the ``TrainingArguments`` that make a
run of ``python -m qlora_tutorial train`` under ``accelerate launch`` train
the model one process would; :func:`parallel_record` is what the pipeline
adds to ``results.json`` (world size, global batch, each rank's peak memory).
The rest launches runs from the notebook: the repository's accelerate configs
(``configs/``), the launch command, CPU-only ranks, and the error a failed
launch ended with.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from qlora_tutorial.errors import MissingInputError, UserInputError
from qlora_tutorial.memory import peak_memory_bytes, tensor_bytes
from qlora_tutorial.settings import Settings, source_checkout

if TYPE_CHECKING:
    from transformers import Trainer

DDP_CPU_CONFIG = "ddp_cpu.yaml"
FSDP_QLORA_CONFIG = "fsdp_qlora.yaml"
REPOSITORY = "https://github.com/qlora-step-by-step/qlora-step-by-step"


def data_parallel_arguments(settings: Settings) -> dict[str, Any]:
    """``TrainingArguments`` fields that make N processes train the model one process would, batch for batch.

    - ``use_cpu`` on a CPU machine: launched by ``accelerate launch``
      (torchrun), the ranks form a gloo group only when the ``Trainer`` is told
      it runs on the CPU; otherwise each process trains alone.
    - ``average_tokens_across_devices=False``: transformers 5 scales each rank's
      loss by the number of ranks, expecting a loss summed over tokens and divided
      by the count across all ranks. A sequence classifier's loss is a mean over
      its own batch, so that scaling would make the gradients (and the logged
      loss) ``world_size`` times too large.
    - ``ddp_find_unused_parameters=False``: every trainable parameter (the
      adapters and the head, or all weights) is used in every forward pass, so
      DDP can skip searching the graph for unused ones each step.

    One process is unaffected by all three.
    """
    return {
        "use_cpu": settings.device == "cpu",
        "average_tokens_across_devices": False,
        "ddp_find_unused_parameters": False,
    }


def is_first_rank() -> bool:
    """True in a single process, and in the rank-0 process under ``accelerate launch`` or ``torchrun``."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """The number of ranks in the default process group; 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_per_rank(value: int) -> list[int]:
    """``value`` from every rank, in rank order (every rank must call this); ``[value]`` without a process group."""
    if world_size() == 1:
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return [int(v) for v in values]


def parallel_record(trainer: Trainer, device: str) -> dict[str, Any]:
    """What ``results.json`` says about the data parallelism of a run (every rank must call this).

    The global batch is what one optimizer step sees: the per-device batch,
    times gradient accumulation, times the number of ranks.
    """
    args = trainer.args
    return {
        "world_size": args.world_size,
        "per_device_batch_size": args.per_device_train_batch_size,
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "peak_memory_bytes_per_rank": gather_per_rank(peak_memory_bytes(device)),
    }


def gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of the gradients DDP all-reduces each step: one per trainable parameter, in its dtype."""
    return sum(tensor_bytes(p) for p in model.parameters() if p.requires_grad)


@contextmanager
def single_process_group(device: str = "cpu") -> Iterator[None]:
    """A one-rank process group in this process, for DDP wrappers: gloo on the CPU, NCCL on a GPU.

    The ranks meet through a file, so no network port is involved.
    """
    with tempfile.TemporaryDirectory() as folder:
        store = dist.FileStore(str(Path(folder) / "rendezvous"), 1)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def count_allreduce_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes DDP hands to all-reduce for one training step of ``model`` on ``batch`` (a process group must exist).

    A communication hook sees every gradient bucket DDP reduces and adds up
    its size before passing it on to the ordinary all-reduce.
    """
    counted: list[int] = []

    def counting_hook(group, bucket):  # unannotated: DDP checks annotations, which this module keeps as strings
        counted.append(tensor_bytes(bucket.buffer()))
        return allreduce_hook(group, bucket)

    wrapped = DistributedDataParallel(model)
    wrapped.register_comm_hook(None, counting_hook)
    wrapped(**batch).loss.backward()
    return sum(counted)


def ring_allreduce_bytes(buffer_bytes: int, ranks: int) -> float:
    """Bytes each of ``ranks`` ranks sends (and receives) to all-reduce a buffer of ``buffer_bytes`` with a ring.

    A ring all-reduce is a reduce-scatter and an all-gather, each ``ranks - 1``
    steps of one ``1/ranks`` piece: ``2 (N - 1) / N`` of the buffer per rank,
    close to twice the buffer on many ranks, and nothing on one.
    """
    if ranks < 1:
        raise UserInputError(f"The number of ranks must be at least 1, got {ranks}.")
    return 2 * (ranks - 1) / ranks * buffer_bytes


def count_broadcast_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Bytes DDP broadcasts from rank 0 when it wraps ``model``, and in one forward pass (a process group must exist).

    The first is every parameter and buffer, the frozen 4-bit weights
    included: the ranks start from rank 0's copy. The second is the buffers,
    which DDP broadcasts before each forward pass by default. A 4-bit layer's
    quantization state is neither, so it is not sent: each rank quantized the
    same checkpoint itself. Counted by wrapping ``torch.distributed._broadcast_coalesced``,
    the one call DDP makes for both, for the length of this call.
    """
    counted: list[int] = []
    original = dist._broadcast_coalesced

    def counting_broadcast(group, tensors, bucket_size, src):  # the signature DDP calls it with
        counted.append(sum(tensor_bytes(tensor) for tensor in tensors))
        return original(group, tensors, bucket_size, src)

    dist._broadcast_coalesced = counting_broadcast
    try:
        wrapped = DistributedDataParallel(model)
        at_start = sum(counted)
        wrapped(**batch)
    finally:
        dist._broadcast_coalesced = original
    return at_start, sum(counted) - at_start


ABSOLUTE_PATH = re.compile(r"(?:/[\w.+\-]+)+/([\w.+\-]+)")


def strip_paths(text: str) -> str:
    """``text`` with every absolute file path cut to its last name: outputs for learners carry no machine's paths."""
    return ABSOLUTE_PATH.sub(r"\1", text)


EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]: )?([\w.]*(?:Error|Exception)): (.*)$", re.MULTILINE)
LAUNCHER_ERRORS = ("ChildFailedError", "CalledProcessError")  # the launcher reporting that a rank failed


def launch_error(log: str) -> str:
    """The exception the first failing rank of a launch ended with, file paths cut to their names.

    The last line of each traceback names the exception; the launcher's own
    report that a rank failed comes after the ranks' tracebacks and is skipped.
    """
    found = [(name, message) for name, message in EXCEPTION_LINE.findall(log) if not name.endswith(LAUNCHER_ERRORS)]
    if not found:
        raise ValueError("The launch log names no exception of a rank: read the log itself.")
    name, message = found[0]
    return strip_paths(f"{name}: {message}")


def accelerate_config(name: str) -> Path:
    """An accelerate config file of the repository's ``configs/`` folder (``ddp_cpu.yaml``, ``fsdp_qlora.yaml``)."""
    root = source_checkout()
    if root is None:
        raise MissingInputError(
            f"The accelerate configs ship with the repository, not with the package: clone {REPOSITORY} "
            "and run notebook 07 from the clone."
        )
    return root / "configs" / name


def accelerate_launch(*arguments: str) -> list[str]:
    """``accelerate launch ARGUMENTS``, run by this Python (``-m accelerate.commands.launch``): no PATH lookup."""
    return [sys.executable, "-m", "accelerate.commands.launch", *arguments]


def run_on_cpu(command: Sequence[str], log_path: Path) -> int:
    """Run ``command`` with the GPUs hidden (so every rank is a CPU process), its output in ``log_path``.

    Returns the exit status: a launch that fails is something notebook 07 shows, not a crash.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        return subprocess.run(list(command), stdout=log, stderr=subprocess.STDOUT, env=environment).returncode
