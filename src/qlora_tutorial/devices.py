"""One device for every model and every batch: where weights are loaded, and where inputs go.

Taught in notebook 02 (loading) and used by every notebook that runs a model.
Without a ``device_map``, transformers leaves an fp32, bf16 or fp16 model on
the CPU while bitsandbytes' quantizer puts a 4-bit or 8-bit one on the GPU, so
a CUDA machine would end up comparing, merging and timing models on different
devices. Every ``from_pretrained`` of a model in the series therefore passes
``device_map=placement(settings)`` (a test checks the package's calls), and
every batch goes to its model through ``to_model_device``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch
from transformers import BatchEncoding

from qlora_tutorial.settings import Settings

BatchT = TypeVar("BatchT", torch.Tensor, BatchEncoding, dict)


def placement(settings: Settings) -> dict[str, str]:
    """The ``device_map`` that puts a whole model on ``settings.device``: ``{"": "cuda"}`` or ``{"": "cpu"}``."""
    return {"": settings.device}


def model_device(model: torch.nn.Module) -> torch.device:
    """The one device that holds all of ``model``'s parameters (where its inputs must go).

    Raises when the parameters sit on more than one device, the fault
    ``placement`` exists to prevent, instead of failing later inside a layer.
    """
    devices = {parameter.device for parameter in model.parameters()}
    if not devices:
        raise ValueError(f"{type(model).__name__} has no parameters, so it has no device to send inputs to.")
    if len(devices) > 1:
        names = ", ".join(sorted(str(device) for device in devices))
        raise ValueError(
            f"{type(model).__name__} has weights on several devices ({names}). Load it with "
            "qlora_tutorial.modeling.load_classifier, which places the whole model on settings.device "
            "(device_map=qlora_tutorial.devices.placement(settings))."
        )
    return devices.pop()


def to_model_device(batch: BatchT, model: torch.nn.Module | torch.device) -> BatchT:
    """``batch`` (a tensor, a tokenizer's ``BatchEncoding`` or a dict of tensors) on the device of ``model``.

    Pass the device itself (``model_device(model)``, found once) where the
    lookup should stay out of a timed loop. Values that are not tensors are
    kept as they are.
    """
    device = model if isinstance(model, torch.device) else model_device(model)
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, BatchEncoding):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    raise TypeError(
        f"Cannot move a {type(batch).__name__} to a device: pass a tensor, a tokenizer's output or a dict of tensors."
    )
