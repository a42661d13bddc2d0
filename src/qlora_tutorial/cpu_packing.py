"""bitsandbytes' packed CPU layout for 4-bit weights, and the guard that keeps it away from this series.

Taught in notebook 02 ("The CPU packing trap"). On CPUs whose ``/proc/cpuinfo``
lists ``avx512_bf16`` (Intel Sapphire Rapids and later, AMD Zen 4 and later),
bitsandbytes 0.50's ``Linear4bit.forward`` repacks a layer's 4-bit weight *in
place* the first time the layer runs in eval mode without gradients
(``bitsandbytes.functional._convert_weight_packed_for_cpu``). The packed
layout feeds a faster bf16 CPU inference kernel, and that one pass:

* drops double quantization (the nested uint8 absmax becomes a bf16 absmax),
  reorders the bytes and switches the layer's compute to bf16;
* leaves ``bitsandbytes.functional.dequantize_4bit`` returning wrong values for
  the layer, so a merge into the 4-bit base builds wrong weights;
* routes later forwards through a kernel with no backward, so training after
  the first evaluation no longer reaches the adapters.

The series trains, merges, dequantizes and measures 4-bit weights, so every
model it loads goes through :func:`keep_standard_layout`, which turns the
repacking off layer by layer (``Linear4bit.support_avx512bf16_for_cpu``, the
attribute bitsandbytes itself consults) before any forward pass can trigger it.
The flag lives on each layer, so PEFT's wrappers and merges, which keep the
base layer object, keep it too; a freshly loaded model needs the guard again,
which is why ``modeling.load_classifier`` applies it on every load.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu, has_avx512bf16

CPU_FLAG = "avx512_bf16"
CPUINFO = Path("/proc/cpuinfo")
ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


class PackedWeightsError(RuntimeError):
    """A 4-bit layer was already repacked for CPU inference, so its weights can no longer be trained or merged."""


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The flags ``/proc/cpuinfo`` lists (empty where there is none: macOS, Windows)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return set()
    return {flag for line in lines if line.startswith("flags") for flag in line.partition(":")[2].split()}


def cpu_lists_avx512_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the CPU flags list ``avx512_bf16`` (False where there is no ``/proc/cpuinfo``: macOS, Windows)."""
    return CPU_FLAG in cpu_flags(cpuinfo)


def bitsandbytes_packs_here() -> bool:
    """Whether bitsandbytes' native library reports AVX512-BF16, i.e. unguarded layers repack on this CPU."""
    return bool(has_avx512bf16())


def linear4bit_layers(module: torch.nn.Module) -> list[bnb.nn.Linear4bit]:
    """Every bitsandbytes 4-bit linear layer in ``module`` (``module`` itself included)."""
    return [layer for layer in module.modules() if isinstance(layer, bnb.nn.Linear4bit)]


def is_packed_for_cpu(layer: bnb.nn.Linear4bit) -> bool:
    """True once bitsandbytes has repacked this layer's weight into its CPU inference layout.

    A layer whose weight was never quantized (the classifier-head trap of notebook 02) has no state, so no packing.
    """
    state = getattr(layer.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def keep_standard_layout(module: ModuleT) -> ModuleT:
    """Stop bitsandbytes from repacking the 4-bit weights of ``module`` for CPU inference; return ``module``.

    Applied by every loader of the series (``modeling.load_classifier``) and by
    notebooks that build a ``Linear4bit`` themselves. A layer that an eval pass
    already repacked cannot be restored exactly (bitsandbytes' inverse
    re-quantizes the absmax with new constants), so it raises instead.
    """
    layers = linear4bit_layers(module)
    packed = [layer for layer in layers if is_packed_for_cpu(layer)]
    if packed:
        raise PackedWeightsError(
            f"{len(packed)} 4-bit layer(s) were already repacked for CPU inference by an eval-mode forward pass, "
            "so they can no longer be trained, merged or dequantized exactly. Reload the model with "
            "qlora_tutorial.modeling.load_classifier (it applies this guard before any forward pass)."
        )
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return module


def standard_layout_kept(module: torch.nn.Module) -> bool:
    """True when every 4-bit layer of ``module`` is guarded and still in the standard layout."""
    return all(
        not layer.support_avx512bf16_for_cpu and not is_packed_for_cpu(layer) for layer in linear4bit_layers(module)
    )


def repack_for_cpu(layer: bnb.nn.Linear4bit) -> None:
    """Do to ``layer`` what an unguarded eval pass does on an AVX512-BF16 CPU, on any CPU.

    Calls bitsandbytes' own repacking function (plain PyTorch), so notebook 02
    and the tests can show and check the mutation where the CPU lacks the flag.
    """
    weight = layer.weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
