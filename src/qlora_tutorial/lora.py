"""LoRA from scratch, on a full-precision and on a 4-bit base, and the trainable-parameter arithmetic of a LoRA config.

Taught in notebook 03. ``LoRALinear`` is the update ``W x + (alpha / r) * B A x``
written out in a few lines, so that it can be checked, number for number,
against PEFT's LoRA layer. ``QLoRALinear`` is the same update on a frozen
bitsandbytes 4-bit layer, the "Q" of QLoRA, checked against PEFT's 4-bit LoRA
layer. ``lora_parameter_count`` derives by hand the number that
``PeftModel.print_trainable_parameters()`` reports.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TypeVar

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import dequantize_4bit
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit
from torch import nn

from qlora_tutorial.cpu_packing import keep_standard_layout
from qlora_tutorial.modeling import HEAD_MODULES

ALL_LINEAR = "all-linear"
LoRAT = TypeVar("LoRAT", bound="LoRALinear")


def check_rank(r: int) -> None:
    """Raise a clear error for a LoRA rank that is not a positive integer."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"The LoRA rank r must be a positive integer (e.g. 8), got {r!r}.")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``base(x) + (alpha / r) * B(A(dropout(x)))``.

    ``A`` (``r x d_in``) starts Kaiming-uniform like ``nn.Linear`` and PEFT, ``B``
    (``d_out x r``) starts at zero, so the wrapped layer first computes exactly
    what the base layer did. ``A`` and ``B`` take the base weight's dtype unless
    ``dtype`` says otherwise.
    """

    def __init__(
        self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        check_rank(r)
        self.base = base
        self.base.requires_grad_(False)
        self.r = r
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)
        dtype = dtype or base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer's output."""
        return self.base(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer's output plus the scaled low-rank update (computed in the dtype of ``A`` and ``B``)."""
        result = self.base_forward(x)
        update = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.T @ self.lora_B.T
        return result + (self.scaling * update).to(result.dtype)

    @classmethod
    def from_peft(cls, layer: PeftLoraLinear, adapter_name: str = "default") -> LoRALinear:
        """A ``LoRALinear`` holding copies of a PEFT LoRA layer's base weights, ``A``, ``B`` and scaling."""
        return cls._with_adapter_of(layer, copy.deepcopy(layer.get_base_layer()), adapter_name)

    @classmethod
    def _with_adapter_of(cls: type[LoRAT], layer: LoraLayer, base: nn.Linear, adapter_name: str) -> LoRAT:
        """A layer on ``base`` holding copies of the PEFT layer's ``A``, ``B``, dropout rate and scaling."""
        lora_a = layer.lora_A[adapter_name].weight
        dropout = layer.lora_dropout[adapter_name]
        ours = cls(
            base,
            r=lora_a.shape[0],
            alpha=layer.scaling[adapter_name] * lora_a.shape[0],
            dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
        )
        with torch.no_grad():
            ours.lora_A.copy_(lora_a)
            ours.lora_B.copy_(layer.lora_B[adapter_name].weight)
        ours.scaling = layer.scaling[adapter_name]
        return ours


class QLoRALinear(LoRALinear):
    """LoRA on a frozen bitsandbytes ``Linear4bit``: the "Q" of QLoRA written out (notebook 03).

    The forward pass dequantizes the 4-bit weight (``dequantize_4bit`` with the
    layer's ``quant_state``) with autograd off, computes ``x @ W^T + bias`` in the
    layer's compute dtype, and adds ``(alpha / r) * B(A(dropout(x)))``. The uint8
    weight cannot hold a gradient and is a constant to autograd: gradients reach
    ``A``, ``B`` and the input, never the 4-bit weight. ``A`` and ``B`` are fp32,
    as PEFT keeps them on a 4-bit base.

    bitsandbytes' own ``Linear4bit`` does the same arithmetic inside an autograd
    function that keeps only the 4-bit bytes for the backward pass and
    dequantizes again there; this version is simpler but keeps the dequantized
    weight (``F.linear`` saves it for the input's gradient) until the backward pass.
    """

    def __init__(self, base: bnb.nn.Linear4bit, r: int, alpha: float, dropout: float = 0.0) -> None:
        if not isinstance(base, bnb.nn.Linear4bit):
            raise TypeError(
                f"QLoRALinear wraps a bitsandbytes Linear4bit (a layer of load_classifier(settings, 'nf4-dq')), "
                f"got {type(base).__name__}. Use LoRALinear for a full-precision nn.Linear."
            )
        if base.weight.quant_state is None:
            raise ValueError(
                "This Linear4bit holds no quantized weight yet (its quant_state is None). "
                "Move it to a device (layer.to('cpu') or .cuda()) to quantize it, or load the model in 4 bit."
            )
        super().__init__(keep_standard_layout(base), r, alpha, dropout, dtype=torch.float32)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + bias`` with ``W`` dequantized from the 4-bit weight, outside the autograd graph."""
        weight = self.base.weight
        dtype = self.base.compute_dtype or x.dtype
        with torch.no_grad():  # the 4-bit weight is a constant: no graph leads back to it
            dense = dequantize_4bit(weight.data, weight.quant_state).to(dtype)
        bias = None if self.base.bias is None else self.base.bias.to(dtype)
        return nn.functional.linear(x.to(dtype), dense, bias).to(x.dtype)

    @classmethod
    def from_peft(cls, layer: PeftLoraLinear4bit, adapter_name: str = "default") -> QLoRALinear:
        """A ``QLoRALinear`` sharing a PEFT 4-bit LoRA layer's frozen base, with copies of ``A``, ``B``, scaling."""
        return cls._with_adapter_of(layer, layer.get_base_layer(), adapter_name)


def lora_update_params(r: int, d_in: int, d_out: int) -> int:
    """Parameters of one LoRA update on a ``d_in -> d_out`` matrix: ``A`` is ``r x d_in``, ``B`` is ``d_out x r``."""
    check_rank(r)
    return r * (d_in + d_out)


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == target or name.endswith("." + target) for target in targets)


PEFT_INTERNALS = ("base_layer", "lora_A", "lora_B", "lora_dropout", "original_module", "modules_to_save")


def _unwrapped(module: nn.Module) -> nn.Module:
    """The layer PEFT wrapped (a LoRA layer's base layer, a ``modules_to_save`` wrapper's original), else ``module``."""
    if hasattr(module, "original_module"):
        return module.original_module
    if hasattr(module, "base_layer"):
        return module.get_base_layer()
    return module


def adapted_linear_layers(
    model: nn.Module, target_modules: Sequence[str] | str, head_modules: Sequence[str] = HEAD_MODULES
) -> dict[str, tuple[int, int]]:
    """``{name: (d_in, d_out)}`` of the linear layers a LoRA config adapts.

    Names match PEFT's rule (the full name or its last dotted parts). ``"all-linear"``
    takes every linear layer except the head, as PEFT does; for a BERT classifier
    that includes the pooler. Works on a plain model and on one PEFT already wrapped.
    """
    if isinstance(target_modules, str) and target_modules != ALL_LINEAR:
        target_modules = [target_modules]
    layers = {}
    for name, module in model.named_modules():
        if any(part in PEFT_INTERNALS for part in name.split(".")):
            continue
        layer = _unwrapped(module)
        if not isinstance(layer, nn.Linear) or _matches(name, head_modules):
            continue
        if target_modules == ALL_LINEAR or _matches(name, target_modules):
            layers[name] = (layer.in_features, layer.out_features)
    if not layers:
        raise ValueError(
            f"No linear layer of the model matches target_modules={target_modules!r}. "
            "Print [name for name, _ in model.named_modules()] to see the layer names."
        )
    return layers


def head_parameter_count(model: nn.Module, head_modules: Sequence[str] = HEAD_MODULES) -> int:
    """Parameters of the head that ``task_type="SEQ_CLS"`` trains in full (hidden * labels + labels for BERT)."""
    return sum(
        param.numel()
        for name, module in model.named_modules()
        if _matches(name, head_modules) and not any(part in PEFT_INTERNALS for part in name.split("."))
        for param in _unwrapped(module).parameters()
    )


def lora_parameter_count(
    model: nn.Module, r: int, target_modules: Sequence[str] | str, head_modules: Sequence[str] = HEAD_MODULES
) -> int:
    """Trainable parameters of ``get_peft_model(model, LoraConfig(r=r, target_modules=..., task_type="SEQ_CLS"))``.

    ``r * (d_in + d_out)`` per adapted matrix, plus the head, which PEFT trains
    as a full copy (``modules_to_save``). Pass ``head_modules=()`` for a config
    without a task type, which trains no head.
    """
    check_rank(r)
    layers = adapted_linear_layers(model, target_modules, head_modules)
    adapters = sum(lora_update_params(r, d_in, d_out) for d_in, d_out in layers.values())
    return adapters + head_parameter_count(model, head_modules)
