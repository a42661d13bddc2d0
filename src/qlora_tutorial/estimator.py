"""Predict a fine-tuning run's peak memory before it starts, part by part, and say whether it fits.

Taught in notebook 09, which prints every run's prediction beside its
measured peak and lets the estimator decide which runs this machine starts
(``refuse_if_not_fits``); ``gpu_fits`` asks it which 7B-8B models fit a T4
or an A100. Where ``projection`` (notebooks 06, 07) counts weights, gradients
and optimizer state only, this adds what a real run holds besides:

- ``runtime``: on the CPU, the process before any weight exists (the
  measuring process of ``scale_runs``: 563 MiB on the calibration machine, of
  which 437 MiB are torch, transformers, peft and bitsandbytes; it differs
  from machine to machine, so notebook 09 measures it on its own machine,
  ``scale_runs.process_baseline_bytes``) plus what the first training steps
  add (autograd, the math libraries' buffers);
  on a GPU, the CUDA context, which ``torch.cuda.max_memory_allocated`` does
  not count.
- ``weights``: fp32 (4 bytes) for ``full`` and ``lora-fp32``, bf16 (2) for
  ``lora-bf16``; for ``qlora`` the 4-bit codes of the blocks' linear weights
  (0.5 bytes) and, in fp32, everything bitsandbytes leaves unquantized
  (embeddings, LM head, norms): the series loads them in the compute dtype and
  ``prepare_model_for_kbit_training`` (``modeling.attach_lora``) upcasts them
  to fp32. ``quant_state``: the absmax constants of double quantization
  (``projection.QUANT_STATE_BITS``, 0.127 bits per weight).
- ``lora``: the adapters, fp32 (PEFT keeps them fp32 on a 16-bit base);
  ``gradients`` and ``optimizer``: 4 and 8 bytes (AdamW's two fp32 moments)
  per trained parameter.
- ``activations``: what autograd saves per token and block (counted on the
  runs' own code with ``torch.autograd.graph.saved_tensors_hooks``, see
  ``SAVED_PER_TOKEN``); with gradient checkpointing only each block's input
  is kept, and one block's activations exist again while it is recomputed.
- ``logits``: batch x sequence x vocabulary in fp32, several times over at the
  start of the backward pass (the logits, the log-softmax the loss saves, and
  the gradients of both).
- ``transient``: QLoRA dequantizes one linear weight at a time to multiply by
  it (forward and backward), so the largest one exists in the compute dtype
  for a moment; full fine-tuning's AdamW step makes two temporaries of one
  parameter tensor at a time on the CPU (the largest counts), a copy of all of
  them on a GPU (``foreach``), when the activations are already gone.

The CPU's peak is the process's resident set (``VmHWM``); a GPU's is
``max_memory_allocated`` plus the context. The constants are calibrated on
fresh-process runs of tiny, SmolLM2-135M and -360M shapes on this 2-core CPU
(``tests/data/estimator_calibration.json``), made with glibc's mmap threshold
fixed at 1 MiB (``MALLOC_MMAP_THRESHOLD_=1048576``): every tensor of 1 MiB or
more is then its own mapping, returned to the system when freed. With glibc's
default, the threshold rises to the size of the first large block freed, and
later tensors up to 32 MiB come from the heap, whose freed holes stay resident:
three identical QLoRA runs of a 360M shape (fp32 compute) peaked at 1,428, 1,835
and 1,788 MiB, against 1,244 and 1,223 MiB with the threshold fixed (QLoRA
dequantizes a weight per layer and frees it at once, which fragments the heap).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil

from qlora_tutorial.errors import UserInputError
from qlora_tutorial.projection import GIB, NF4_CODE_BITS, QUANT_STATE_BITS
from qlora_tutorial.shapes import DecoderShape

MIB = 2**20
METHODS: dict[str, str] = {
    "full": "full fine-tuning",
    "lora-fp32": "LoRA on an fp32 base",
    "lora-bf16": "LoRA on a bf16 base",
    "qlora": "QLoRA",
}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
METHOD_COMPUTE = {"full": ("fp32",), "lora-fp32": ("fp32",), "lora-bf16": ("bf16", "fp16"), "qlora": tuple(DTYPE_BYTES)}
DEVICES = ("cpu", "cuda")
# VmRSS of a fresh measuring process before it builds anything, on the calibration machine (torch, transformers,
# peft and bitsandbytes alone: 437 MiB; the rest is datasets, pandas and the series' modules); where the machine
# at hand can be asked, scale_runs.process_baseline_bytes measures it instead
RUNTIME_BYTES = 563 * MIB
# What training adds to the resident set beyond the counted tensors (autograd, the math libraries' buffers): 23-47 MiB
# on the tiny shape, 92-184 MiB on SmolLM2 shapes in the calibration runs; with 60 all 25 are within -9.2%..+5.9%
TRAINING_OVERHEAD_BYTES = 60 * MIB
CUDA_CONTEXT_BYTES = GIB // 2  # the CUDA context, 0.3-0.45 GiB with lazy module loading: upper end
LOGIT_COPIES = 4  # fp32 batch x seq x vocab tensors alive at the start of the backward pass
FULL_CHECKPOINT_BLOCKS = 1  # blocks whose activations exist at once while checkpointing recomputes
ADAMW_CPU_TEMPORARIES = 2  # single-tensor AdamW: sqrt(v) and its quotient, one parameter tensor at a time


@dataclass(frozen=True)
class RunSpec:
    """One training run to predict: a shape, a method, the batch, checkpointing, dtypes, LoRA rank, device.

    ``compute_dtype`` None takes the method's own (fp32; bf16 for
    ``lora-bf16``); QLoRA may compute in any of them. ``lora-bf16`` computes
    in its base's 16-bit dtype (fp16 on a GPU without bf16, such as a T4).
    """

    shape: DecoderShape
    method: str
    batch_size: int = 1
    seq_len: int = 128
    gradient_checkpointing: bool = True
    compute_dtype: str | None = None
    lora_r: int = 16
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserInputError(f"Unknown method {self.method!r}. Known methods: {', '.join(METHODS)}.")
        if self.device not in DEVICES:
            raise UserInputError(f"Unknown device {self.device!r}. Known devices: {', '.join(DEVICES)}.")
        for name in ("batch_size", "seq_len", "lora_r"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name} must be at least 1, got {getattr(self, name)}.")
        allowed = METHOD_COMPUTE[self.method]
        if self.compute_dtype is None:
            object.__setattr__(self, "compute_dtype", allowed[0])
        elif self.compute_dtype not in allowed:
            raise UserInputError(
                f"{self.method} computes in {' or '.join(allowed)}, not {self.compute_dtype!r}."
                + (f" Known dtypes: {', '.join(DTYPE_BYTES)}." if self.compute_dtype not in DTYPE_BYTES else "")
            )

    @property
    def tokens(self) -> int:
        """Tokens per step: batch size x sequence length."""
        return self.batch_size * self.seq_len

    @property
    def trained_parameters(self) -> int:
        """Every parameter for full fine-tuning; the LoRA matrices (all seven linear kinds) otherwise."""
        return self.shape.parameters if self.method == "full" else self.shape.lora_parameters(self.lora_r)

    def describe(self) -> str:
        """E.g. ``"QLoRA (bf16 compute) of llama-2-7b, batch 1 x 128, checkpointing on"``."""
        dtype = f" ({self.compute_dtype} compute)" if self.method == "qlora" else ""
        return (
            f"{METHODS[self.method]}{dtype} of {self.shape.name}, batch {self.batch_size} x {self.seq_len}, "
            f"checkpointing {'on' if self.gradient_checkpointing else 'off'}"
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """A run's predicted peak, in bytes per part (see the module doc for each)."""

    spec: RunSpec
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """The predicted peak: the sum of the parts."""
        return sum(self.parts.values())

    @property
    def total_gib(self) -> float:
        """The predicted peak in GiB."""
        return self.total_bytes / GIB


# Bytes autograd saves per token and block, by method: counts of tensors as wide as the MLP (i), the hidden state
# (h), the k/v projections (kv) and the LoRA rank (r), each with its dtype's bytes (c: the compute dtype), plus
# four bytes per attention head (the log-sum-exp of PyTorch's flash attention) and two fp32 norm factors. Counted
# with saved_tensors_hooks on SmolLM2-135M- and tiny-shaped blocks (transformers 5.23, sdpa, LoRA dropout 0.05);
# QLoRA saves what LoRA on fp32 does whatever its compute dtype: the residual stream is fp32 after the upcast.
SAVED_PER_TOKEN: dict[str, dict[str, tuple[tuple[int, str], ...]]] = {
    "full": {"i": ((4, "c"),), "h": ((8, "c"),), "kv": ((2, "c"),), "r": ()},
    "lora-fp32": {"i": ((5, "fp32"),), "h": ((16, "fp32"),), "kv": ((2, "fp32"),), "r": ((7, "fp32"),)},
    "lora-bf16": {"i": ((2, "fp32"), (3, "c")), "h": ((14, "fp32"), (2, "c")), "kv": ((2, "c"),), "r": ((7, "fp32"),)},
    "qlora": {"i": ((5, "fp32"),), "h": ((16, "fp32"),), "kv": ((2, "fp32"),), "r": ((7, "fp32"),)},
}


def block_activation_bytes(spec: RunSpec) -> int:
    """Bytes one block's forward pass leaves for its backward pass (``SAVED_PER_TOKEN``), for the whole batch."""
    shape = spec.shape
    widths = {"i": shape.intermediate, "h": shape.hidden, "kv": shape.kv_hidden, "r": spec.lora_r}
    per_token = 4 * shape.heads + 2 * 4
    for kind, counts in SAVED_PER_TOKEN[spec.method].items():
        for count, dtype in counts:
            per_token += count * widths[kind] * DTYPE_BYTES[spec.compute_dtype if dtype == "c" else dtype]
    return per_token * spec.tokens


def residual_bytes(spec: RunSpec) -> int:
    """Bytes of one block's input for the batch: what checkpointing keeps (16-bit only on a 16-bit base)."""
    width = DTYPE_BYTES[spec.compute_dtype] if spec.method == "lora-bf16" else 4
    return width * spec.shape.hidden * spec.tokens


def activation_bytes(spec: RunSpec) -> int:
    """Activations at the start of the backward pass.

    Every block's; with checkpointing, each block's input plus the block being recomputed.
    """
    if spec.gradient_checkpointing:
        return spec.shape.layers * residual_bytes(spec) + FULL_CHECKPOINT_BLOCKS * block_activation_bytes(spec)
    return spec.shape.layers * block_activation_bytes(spec)


def weight_parts(spec: RunSpec) -> dict[str, int]:
    """Base weights, quantization state, adapters, gradients and AdamW state, in bytes."""
    shape, trained = spec.shape, spec.trained_parameters
    if spec.method == "qlora":
        weights = round(NF4_CODE_BITS / 8 * shape.linear_parameters) + 4 * shape.other_parameters
        state = round(QUANT_STATE_BITS / 8 * shape.linear_parameters)
    else:
        weights, state = DTYPE_BYTES["bf16" if spec.method == "lora-bf16" else "fp32"] * shape.parameters, 0
    lora = 0 if spec.method == "full" else 4 * trained
    return {"weights": weights, "quant_state": state, "lora": lora, "gradients": 4 * trained, "optimizer": 8 * trained}


def transient_bytes(spec: RunSpec, activations: int, logits: int) -> int:
    """The largest short-lived tensor on top of the rest: a dequantized weight, or AdamW's temporaries."""
    shape = spec.shape
    if spec.method == "qlora":
        return shape.largest_linear * DTYPE_BYTES[spec.compute_dtype]
    if spec.method != "full":
        return 0
    largest = max(shape.largest_linear, shape.vocab * shape.hidden)  # the embedding matrix, in practice
    step = 4 * shape.parameters if spec.device == "cuda" else ADAMW_CPU_TEMPORARIES * 4 * largest
    return max(0, step - activations - logits)  # the step runs after the backward pass has freed those


def estimate_peak(spec: RunSpec, process_bytes: int | None = None) -> MemoryEstimate:
    """The run's predicted peak memory, part by part (CPU: resident set; GPU: allocated bytes plus the context).

    ``process_bytes`` is, on the CPU, the resident set of the process that
    will train, before any weight exists, as measured on this machine
    (``scale_runs.process_baseline_bytes``): it depends on the CPU, the
    libraries and the operating system (which shared-library pages are
    touched), not on the run. None takes ``RUNTIME_BYTES``, the figure of
    the machine the constants were calibrated on.
    """
    if process_bytes is not None and process_bytes <= 0:
        raise UserInputError(
            f"The process's resident set must be positive, got {process_bytes} bytes: give the value "
            "scale_runs.process_baseline_bytes() measures on this machine, or None for the calibration machine's."
        )
    activations = activation_bytes(spec)
    logits = LOGIT_COPIES * 4 * spec.tokens * spec.shape.vocab
    baseline = RUNTIME_BYTES if process_bytes is None else process_bytes
    runtime = baseline + TRAINING_OVERHEAD_BYTES if spec.device == "cpu" else CUDA_CONTEXT_BYTES
    parts = {"runtime": runtime, **weight_parts(spec), "activations": activations, "logits": logits}
    parts["transient"] = transient_bytes(spec, activations, logits)
    return MemoryEstimate(spec, parts)


@dataclass(frozen=True)
class GpuMemory:
    """A GPU's memory as a program can use it: ``torch.cuda.get_device_properties(0).total_memory``, in GiB.

    A card is sold by a round label ("16 GB"); ``nvidia-smi`` shows a little
    less (15,360 MiB on a T4), and CUDA reports less again: the memory ECC and
    the driver keep back never reaches a program. Every "fits" verdict compares
    with ``usable_gib``, from which the CUDA context still has to come.
    """

    name: str
    usable_gib: float
    sold_as: str
    compute_capability: tuple[int, int]  # 8.0 and later compute in bf16 natively; a T4 (7.5) uses fp16
    source: str

    @property
    def usable_bytes(self) -> int:
        """``usable_gib`` in bytes."""
        return round(self.usable_gib * GIB)


# What CUDA reports as total memory: "torch" is torch.cuda.get_device_properties(0) as it prints itself
# ("total_memory=15095MB", in MiB: 14.74 GiB), "OOM" PyTorch's out-of-memory message, which reads the same value
# ("GPU 0 has a total capacity of 14.74 GiB"); nvidia-smi's total, shown for comparison, is larger. Sources: public
# logs and issues quoting these lines for each card; where two disagree (A100 40GB: PCIe vs SXM4), the smaller.
GPUS: dict[str, GpuMemory] = {
    gpu.name: gpu
    for gpu in (
        GpuMemory("T4", 14.74, "16 GB", (7, 5), "torch 15095MB; OOM 14.74 GiB; nvidia-smi 15,360 MiB"),
        GpuMemory("L4", 21.96, "24 GB", (8, 9), "OOM 21.96 GiB; nvidia-smi 23,034 MiB"),
        GpuMemory("A10G", 22.06, "24 GB", (8, 6), "torch 22587MB"),
        GpuMemory("RTX 4090", 23.68, "24 GB", (8, 9), "OOM 23.68 GiB (zai-org/CogVideo#36); nvidia-smi 24,564 MiB"),
        GpuMemory("A100 40GB", 39.38, "40 GB", (8, 0), "torch 40326MB (PCIe), 40536MB (SXM4); OOM 39.39 GiB"),
        GpuMemory("RTX A6000", 47.54, "48 GB", (8, 6), "OOM 47.54 GiB; nvidia-smi 49,140 MiB (vllm-project/vllm#1201)"),
        GpuMemory("A100 80GB", 79.15, "80 GB", (8, 0), "OOM 79.15 GiB; nvidia-smi 81,920 MiB"),
        GpuMemory("H100 80GB", 79.19, "80 GB", (9, 0), "torch 81089MB (H100 80GB HBM3)"),
    )
}


def _gpu_key(name: str) -> str:
    return "".join(character for character in name.lower() if character.isalnum())


def get_gpu(name: str) -> GpuMemory:
    """Look a GPU up by name, ignoring case, spaces and dashes ("A100-40GB" is "A100 40GB")."""
    for gpu in GPUS.values():
        if _gpu_key(gpu.name) == _gpu_key(name):
            return gpu
    raise UserInputError(f"Unknown GPU {name!r}. Known GPUs: {', '.join(GPUS)}.")


@dataclass(frozen=True)
class FitVerdict:
    """Whether a predicted peak fits the memory available, with a sentence that gives the numbers."""

    fits: bool
    message: str


class RunWouldNotFit(UserInputError):
    """A run the estimator predicts would not fit in the memory available: it is not started."""


def check_fits(
    estimate: MemoryEstimate, available_bytes: int, margin: float, where: str = "this machine"
) -> FitVerdict:
    """Fits when the predicted peak leaves ``margin`` (a share) of ``available_bytes`` free.

    The message reads e.g. "full fine-tuning of smollm2-1.7b needs 27.6 GiB,
    this machine has 22.9 GiB available (margin 10%): predicted only".
    """
    if not 0 <= margin < 1:
        raise UserInputError(f"The margin is a share of the memory, from 0 to below 1; got {margin}.")
    if available_bytes <= 0:
        raise UserInputError(f"The memory available must be positive, got {available_bytes} bytes.")
    fits = estimate.total_bytes <= (1 - margin) * available_bytes
    spec = estimate.spec
    message = (
        f"{METHODS[spec.method]} of {spec.shape.name} needs {estimate.total_gib:.1f} GiB, {where} has "
        f"{available_bytes / GIB:.1f} GiB available (margin {margin:.0%}): {'fits' if fits else 'predicted only'}"
    )
    return FitVerdict(fits, message)


def refuse_if_not_fits(
    spec: RunSpec,
    available_bytes: int | None = None,
    margin: float = 0.10,
    where: str = "this machine",
    process_bytes: int | None = None,
) -> MemoryEstimate:
    """The run's estimate if it fits, else ``RunWouldNotFit`` with the numbers, before anything is allocated.

    ``available_bytes`` None is this machine's available memory (``psutil.virtual_memory().available``);
    ``process_bytes`` as for :func:`estimate_peak`.
    """
    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    estimate = estimate_peak(spec, process_bytes)
    verdict = check_fits(estimate, available, margin, where)
    if not verdict.fits:
        raise RunWouldNotFit(verdict.message)
    return estimate
