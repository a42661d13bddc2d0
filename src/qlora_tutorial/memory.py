"""Memory accounting: weight bytes by precision, parameter counts, peak memory.

Taught in notebooks 02 (weight memory by precision) and 06 (training memory).
``PreTrainedModel.get_memory_footprint()`` counts the packed 4-bit weights but
not their quantization state (absmax, code book, nested constants); the
numbers here include it, so the bits per parameter come out as the QLoRA
paper's 4.127 rather than an optimistic 4.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import psutil
import torch
from bitsandbytes.functional import QuantState


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor's elements occupy."""
    return tensor.numel() * tensor.element_size()


def quant_state_bytes(state: QuantState) -> int:
    """Bytes of a 4-bit layer's quantization state: absmax and code book, plus the nested ones."""
    total = tensor_bytes(state.absmax) + tensor_bytes(state.code)
    if state.nested:
        total += tensor_bytes(state.state2.absmax) + tensor_bytes(state.state2.code)
        total += tensor_bytes(torch.as_tensor(state.offset))
    return total


@dataclass(frozen=True)
class WeightMemory:
    """A model's parameter memory, split into quantized weights, their state, and the rest."""

    quantized_params: int
    quantized_bytes: int
    quant_state_bytes: int
    other_params: int
    other_bytes: int

    @property
    def total_params(self) -> int:
        """Logical parameters (a packed 4-bit byte holds two)."""
        return self.quantized_params + self.other_params

    @property
    def total_bytes(self) -> int:
        """All parameter bytes, quantization state included."""
        return self.quantized_bytes + self.quant_state_bytes + self.other_bytes

    @property
    def quantized_bits_per_param(self) -> float:
        """Bits per quantized parameter, state included (4.5 for NF4, about 4.127 with double quantization)."""
        if not self.quantized_params:
            return 0.0
        return 8 * (self.quantized_bytes + self.quant_state_bytes) / self.quantized_params

    @property
    def unquantized_share(self) -> float:
        """Fraction of parameters left in full or half precision (embeddings, LayerNorm, head)."""
        return self.other_params / self.total_params


def weight_memory(model: torch.nn.Module) -> WeightMemory:
    """Count parameter bytes of ``model``, including bitsandbytes quantization state."""
    quantized_params = quantized_bytes = state_bytes = other_params = other_bytes = 0
    for param in model.parameters():
        if isinstance(param, bnb.nn.Params4bit) and param.quant_state is not None:
            quantized_params += param.quant_state.shape.numel()
            quantized_bytes += tensor_bytes(param)
            state_bytes += quant_state_bytes(param.quant_state)
        elif isinstance(param, bnb.nn.Int8Params):
            quantized_params += param.numel()
            quantized_bytes += tensor_bytes(param)
            scales = getattr(param, "SCB", None)
            state_bytes += tensor_bytes(scales) if scales is not None else 0
        else:
            other_params += param.numel()
            other_bytes += tensor_bytes(param)
    return WeightMemory(quantized_params, quantized_bytes, state_bytes, other_params, other_bytes)


@dataclass(frozen=True)
class ParameterCount:
    """Trainable and total logical parameters."""

    trainable: int
    total: int

    @property
    def trainable_share(self) -> float:
        """Trainable parameters as a fraction of all parameters."""
        return self.trainable / self.total


def logical_numel(param: torch.nn.Parameter) -> int:
    """Parameters a tensor stands for: a packed 4-bit tensor stores two per byte."""
    if isinstance(param, bnb.nn.Params4bit) and param.quant_state is not None:
        return param.quant_state.shape.numel()
    return param.numel()


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    """Trainable and total parameters, counting 4-bit weights at their logical size."""
    trainable = sum(logical_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(logical_numel(p) for p in model.parameters())
    return ParameterCount(trainable, total)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in an optimizer's state (AdamW: two moments per trainable parameter)."""
    return sum(
        tensor_bytes(value)
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def paged_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state that bitsandbytes keeps in paged (CUDA unified) memory.

    ``torch.cuda.max_memory_allocated`` does not see them, so a CUDA peak adds them (notebook 06).
    """
    return sum(
        tensor_bytes(value)
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and getattr(value, "is_paged", False)
    )


def resident_bytes(device: str) -> int:
    """Memory held now: CUDA's allocated bytes on a GPU, the process's resident set on the CPU."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    return psutil.Process().memory_info().rss


PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory(device: str) -> None:
    """Start a new peak measurement: CUDA's counters, or on Linux the process's own high-water mark.

    Linux resets a process's peak resident set to its current size when it
    writes ``5`` to ``/proc/self/clear_refs`` (Linux 4.0 and later). Where it
    cannot (macOS, a locked-down container), the peak stays the process's
    lifetime peak, which ``peak_is_own`` detects.
    """
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):  # no procfs, or not allowed: peak_is_own tells such a run apart
        PROC_CLEAR_REFS.write_text("5")


def peak_memory_bytes(device: str) -> int:
    """Peak memory: CUDA's max allocated bytes on a GPU, the process's peak resident set on the CPU.

    On Linux the CPU peak is ``VmHWM`` from ``/proc/self/status``, this
    process's own mark since it started or since ``reset_peak_memory``.
    ``getrusage``'s ``ru_maxrss`` is the fallback, but on Linux a child
    process inherits its parent's resident size in it: a run started from a
    notebook would report the notebook's memory as its own peak.
    """
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        status = PROC_STATUS.read_text().splitlines()
    except OSError:
        status = []
    for line in status:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def format_bytes(count: float) -> str:
    """Bytes in binary units, e.g. ``"12.3 MiB"``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, unit = float(count), 0
    while abs(value) >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{value:.0f} B" if unit == 0 else f"{value:.1f} {units[unit]}"


def peak_is_own(baseline_bytes: int, peak_at_start_bytes: int, tolerance: float = 0.05) -> bool:
    """Whether a run's peak memory is its own: the process had been no larger before the run began.

    On the CPU the peak RSS is the process's high-water mark and does not fall
    when memory is freed (notebook 06), so a run in a process that earlier
    trained something bigger reports that earlier peak, unless the mark was
    reset when the run began (``reset_peak_memory``: CUDA, and Linux). A fresh
    process passes, and so does notebook 04's main run on Linux; where the
    reset is not possible (macOS), a run after 04's learning-rate sweep in the
    same kernel does not.
    """
    return peak_at_start_bytes <= (1 + tolerance) * baseline_bytes
