"""Loading the classifier at a chosen precision, and attaching LoRA adapters.

Taught in notebooks 02 (precisions, ``BitsAndBytesConfig``, the classifier-head
trap) and 03 (``LoraConfig``, ``prepare_model_for_kbit_training``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

import bitsandbytes as bnb
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)

from qlora_tutorial.cpu_packing import keep_standard_layout
from qlora_tutorial.data import LABEL_NAMES, id2label, label2id
from qlora_tutorial.devices import placement
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.settings import Settings
from qlora_tutorial.sources import resolve_model_path

HEAD_MODULES = ("classifier",)
REFERENCE_TARGETS = ("query", "value")


class Precision(str, Enum):
    """The precisions a base model can be loaded at."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"
    FP4 = "fp4"
    NF4 = "nf4"
    NF4_DQ = "nf4-dq"

    @property
    def is_quantized(self) -> bool:
        """True for the bitsandbytes precisions (8-bit and 4-bit)."""
        return self in (Precision.INT8, Precision.FP4, Precision.NF4, Precision.NF4_DQ)


QLORA_PRECISION = Precision.NF4_DQ


def parse_precision(name: str | Precision) -> Precision:
    """``Precision`` from its name, with a message listing the valid names."""
    try:
        return Precision(name)
    except ValueError:
        valid = ", ".join(p.value for p in Precision)
        raise UserInputError(f"Unknown precision {name!r}. Valid precisions: {valid}.") from None


def quantization_config(
    precision: Precision, compute_dtype: torch.dtype, *, skip_modules: tuple[str, ...] | None = HEAD_MODULES
) -> BitsAndBytesConfig | None:
    """The ``BitsAndBytesConfig`` for a bitsandbytes precision, ``None`` for the others.

    ``skip_modules`` keeps the classification head in full precision. Leaving it
    out (``None``) reproduces the classifier-head trap of notebook 02.
    """
    skip = list(skip_modules) if skip_modules is not None else None
    if precision is Precision.INT8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if precision in (Precision.FP4, Precision.NF4, Precision.NF4_DQ):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="fp4" if precision is Precision.FP4 else "nf4",
            bnb_4bit_use_double_quant=precision is Precision.NF4_DQ,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    return None


def storage_dtype(precision: Precision, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the weights that stay unquantized."""
    if precision is Precision.BF16:
        return torch.bfloat16
    if precision is Precision.FP16:
        return torch.float16
    if precision.is_quantized:
        return compute_dtype
    return torch.float32


def quantized_head_modules(model: PreTrainedModel) -> list[str]:
    """Names of head modules that were quantized (they should not be)."""
    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, quantized) and name.split(".")[-1] in HEAD_MODULES
    ]


def check_head_not_quantized(model: PreTrainedModel) -> None:
    """Raise if the classification head was quantized.

    A quantized, freshly initialised head cannot be trained as a LoRA
    ``modules_to_save`` copy and, on the CPU, fails in its first forward pass.
    """
    quantized = quantized_head_modules(model)
    if quantized:
        raise ValueError(
            f"The classification head {quantized} was quantized. Keep it in full precision with "
            f"BitsAndBytesConfig(llm_int8_skip_modules={list(HEAD_MODULES)!r}) "
            "(quantization_config() does this by default)."
        )


def load_tokenizer(settings: Settings) -> PreTrainedTokenizerBase:
    """The tokenizer of the profile's model."""
    return AutoTokenizer.from_pretrained(resolve_model_path(settings.model_name), revision=settings.model_revision)


def load_classifier(
    settings: Settings,
    precision: Precision | str = QLORA_PRECISION,
    *,
    skip_modules: tuple[str, ...] | None = HEAD_MODULES,
) -> PreTrainedModel:
    """Load the sequence classifier for AG News at ``precision``.

    The head is new and randomly initialised (seeded by the profile: every
    global RNG is reseeded, so the adapters attached next start the same way
    too), and kept out of quantization. The whole model sits on ``settings.device``
    at every precision (``devices.placement``). 4-bit layers are guarded against bitsandbytes' CPU
    repacking (``cpu_packing.keep_standard_layout``) before any forward pass.
    Safetensors only; a Hub token, if any, comes from the environment (``HF_TOKEN``).
    """
    precision = parse_precision(precision)
    set_seed(settings.profile.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(settings.model_name),
        revision=settings.model_revision,
        num_labels=len(LABEL_NAMES),
        id2label=id2label(),
        label2id=label2id(),
        quantization_config=quantization_config(precision, settings.compute_dtype, skip_modules=skip_modules),
        dtype=storage_dtype(precision, settings.compute_dtype),
        device_map=placement(settings),
        use_safetensors=True,
    )
    if skip_modules is not None:
        check_head_not_quantized(model)
    return keep_standard_layout(model)


def reference_lora_config(
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.1,
    target_modules: tuple[str, ...] | str = REFERENCE_TARGETS,
) -> LoraConfig:
    """The series' LoRA config: r=8, alpha=16, dropout 0.1 on query and value, ``SEQ_CLS``.

    ``task_type="SEQ_CLS"`` makes PEFT train and save the classification head
    with the adapter (notebook 03 shows what happens without it).
    """
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="SEQ_CLS")


def is_quantized_model(model: PreTrainedModel) -> bool:
    """True when any linear layer of ``model`` is a bitsandbytes 4-bit or 8-bit layer."""
    return any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


@contextmanager
def peft_calls_quieted() -> Iterator[None]:
    """Hide the FutureWarning PEFT 0.21 triggers by calling transformers 5's renamed ``is_gradient_checkpointing``.

    It says nothing a learner can act on; every other warning still shows.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def attach_lora(model: PreTrainedModel, config: LoraConfig | None = None) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; k-bit bases go through ``prepare_model_for_kbit_training`` first.

    Gradient checkpointing stays off: at max length 128 the activations are
    small, and recomputing them would slow training for no memory that matters.
    The CPU-repacking guard is (re)applied, so a base loaded some other way is
    covered too.
    """
    with peft_calls_quieted():
        if is_quantized_model(model):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return keep_standard_layout(get_peft_model(model, config or reference_lora_config()))


def load_adapter(base: PreTrainedModel, adapter_dir: str) -> PeftModel:
    """Load a saved adapter (and its trained head) onto a freshly loaded base, for inference (guard applied)."""
    with peft_calls_quieted():
        model = keep_standard_layout(PeftModel.from_pretrained(base, adapter_dir))
    model.eval()
    return model
