"""The arithmetic that makes QLoRA matter: memory to fine-tune 1.3B to 65B models.

Taught in notebook 06. The notebook measures full fine-tuning, LoRA and QLoRA
on a 22.7M-parameter model, where every method fits anywhere; this module
projects the same per-parameter costs onto LLaMA-shaped models with the QLoRA
paper's setup (Dettmers et al. 2023, arXiv:2305.14314): LoRA r=64 on every
linear layer of the blocks.

Every figure rests on a byte assumption per parameter, and each is written
out (``ByteAssumption``). The three methods use the paper's:

- 16-bit full fine-tuning: bf16 weights 2 + bf16 gradients 2 + AdamW's two
  fp32 moments 8 = 12 bytes (12 x 65.29B = 783 GB: the paper's ">780 GB").
- 16-bit LoRA: the frozen base at 2 bytes; each LoRA parameter 12 (bf16
  weight and gradient, two fp32 moments).
- QLoRA: the blocks' linear weights in NF4 with double quantization,
  4 + 8/64 + 32/(64*256) = 4.127 bits; embeddings, LM head and norms at 2
  bytes, as ``BitsAndBytesConfig`` leaves them; LoRA parameters at 12 (the
  paper's "under 48 GB" for 65B).

``ASSUMPTION_VARIANTS`` adds the common alternatives: an fp32 master copy
(16 bytes for full fine-tuning), LoRA in fp32 (16 bytes), and the unquantized
parts upcast to fp32 (4 bytes), as ``prepare_model_for_kbit_training`` does in
this series. Activations are left out: they depend on batch size and sequence
length, and gradient checkpointing trades them for compute. So every figure
here is a floor a run cannot go below, not a prediction of its peak.

Units: the QLoRA paper's own figures (">780 GB", "under 48 GB") are checked in
decimal GB (10**9 bytes), as the paper states them. A GPU's memory is counted
in GiB (2**30 bytes), and a card holds less than the size it is sold as: a
"48 GB" RTX A6000 lets a program allocate 47.54 GiB, a "16 GB" T4 14.74 GiB
(``torch.cuda.get_device_properties`` and PyTorch's out-of-memory message
report these). So every comparison with a GPU (``Projection.fits``, the
tables, the plot of notebook 06) is made in GiB against that usable memory,
``estimator.GPUS``, the series' one list of GPU facts: 48.3 GB is 45.0 GiB,
which fits the A6000's 47.54 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_tutorial.errors import UserInputError
from qlora_tutorial.shapes import PAPER_RANK, DecoderShape

GB = 10**9  # decimal gigabytes, as the QLoRA paper states its figures
GIB = 2**30  # binary gigabytes, as a GPU's memory is built and reported
NF4_CODE_BITS = 4  # the 4-bit code of each weight: a parameter, which FSDP shards
QUANT_STATE_BITS = 8 / 64 + 32 / (64 * 256)  # 8-bit absmax per 64, fp32 second-level absmax per 256: not a parameter
NF4_DQ_BITS = NF4_CODE_BITS + QUANT_STATE_BITS
PAPER_65B_QLORA_BOUND_GB = 48  # the paper: 65B fine-tuned on one 48 GB GPU
PAPER_65B_FULL_16BIT_GB = 780  # the paper: "more than 780 GB" for 16-bit full fine-tuning of 65B
METHODS = ("16-bit full fine-tuning", "16-bit LoRA", "QLoRA (NF4 + DQ)")
# The GPUs notebook 06 sets each projection against, by their names in ``estimator.GPUS``, smallest first; the
# RTX A6000 is a "48 GB" GPU like the one the QLoRA paper fine-tuned 65B on (PAPER_65B_GPU).
PROJECTION_GPUS = ("T4", "A100 40GB", "RTX A6000", "A100 80GB", "H100 80GB")
PAPER_65B_GPU = "RTX A6000"


def usable_gib(gpu: str) -> float:
    """The GiB a program can allocate on ``gpu`` (a name in ``estimator.GPUS``): what every "fits" compares with.

    Not the size the card is sold as: a "16 GB" T4 gives 14.74 GiB, a "24 GB"
    RTX 4090 23.68 (``estimator.GpuMemory``, with the sources).
    """
    from qlora_tutorial.estimator import get_gpu  # imported here: estimator imports this module

    return get_gpu(gpu).usable_gib


@dataclass(frozen=True)
class ByteAssumption:
    """What one parameter costs while training, in bytes, for one method.

    ``trained``: each trained parameter (every one for full fine-tuning, the
    LoRA parameters otherwise), weight + gradient + optimizer state.
    ``frozen``: each frozen parameter stored unquantized (LoRA's whole base,
    QLoRA's embeddings, head and norms). QLoRA's linear weights always cost
    ``NF4_DQ_BITS / 8``.
    """

    method: str
    trained: float
    frozen: float
    note: str

    def bytes_for(self, linear: int, other: int, lora: int) -> float:
        """Bytes for ``linear`` block weights, ``other`` weights and ``lora`` LoRA parameters."""
        if self.method == METHODS[0]:
            return self.trained * (linear + other)
        if self.method == METHODS[1]:
            return self.frozen * (linear + other) + self.trained * lora
        return NF4_DQ_BITS / 8 * linear + self.frozen * other + self.trained * lora


PAPER_ASSUMPTIONS: dict[str, ByteAssumption] = {
    METHODS[0]: ByteAssumption(METHODS[0], 2 + 2 + 8, 0, "bf16 weights and gradients, two fp32 AdamW moments"),
    METHODS[1]: ByteAssumption(METHODS[1], 2 + 2 + 8, 2, "bf16 base; LoRA in bf16 with two fp32 AdamW moments"),
    METHODS[2]: ByteAssumption(METHODS[2], 2 + 2 + 8, 2, "NF4 + DQ linear weights, the rest bf16; LoRA in bf16"),
}
ASSUMPTION_VARIANTS: tuple[ByteAssumption, ...] = (
    PAPER_ASSUMPTIONS[METHODS[0]],
    ByteAssumption(METHODS[0], 2 + 2 + 8 + 4, 0, "as above, plus an fp32 master copy of the weights"),
    PAPER_ASSUMPTIONS[METHODS[2]],
    ByteAssumption(METHODS[2], 4 + 4 + 8, 2, "LoRA in fp32 (weights, gradients), the rest bf16"),
    ByteAssumption(METHODS[2], 4 + 4 + 8, 4, "LoRA in fp32 and the rest upcast to fp32, as this series trains"),
)


# The LLaMA sizes below are ``shapes.DecoderShape``s, the one shape type of the series; ``ModelShape`` is the name
# notebooks 06 and 07 build their own with, e.g. ``ModelShape("3B", hidden=3200, layers=26, intermediate=8640)``.
ModelShape = DecoderShape


# Published configurations: Sheared-LLaMA-1.3B (princeton-nlp), LLaMA 7B/13B/33B/65B (Touvron et al. 2023).
LLAMA_SHAPES: dict[str, DecoderShape] = {
    shape.name: shape
    for shape in (
        DecoderShape("1.3B", hidden=2048, layers=24, intermediate=5504, heads=16),
        DecoderShape("7B", hidden=4096, layers=32, intermediate=11008, heads=32),
        DecoderShape("13B", hidden=5120, layers=40, intermediate=13824, heads=40),
        DecoderShape("33B", hidden=6656, layers=60, intermediate=17920, heads=52),
        DecoderShape("65B", hidden=8192, layers=80, intermediate=22016, heads=64),
    )
}


def get_shape(name: str) -> DecoderShape:
    """Look a model size up by name, with a message listing the known ones."""
    try:
        return LLAMA_SHAPES[name]
    except KeyError:
        known = ", ".join(LLAMA_SHAPES)
        raise UserInputError(
            f"Unknown model size {name!r}. Known sizes: {known}. "
            "For another model, build a ModelShape(name, hidden, layers, intermediate) yourself."
        ) from None


def _check_count(name: str, count: int) -> None:
    if count <= 0:
        raise UserInputError(f"{name} must be a positive number of parameters, got {count}.")


def training_bytes(method: str, linear: int, other: int, lora: int, assumption: ByteAssumption | None = None) -> float:
    """Bytes to fine-tune a model with ``linear`` block weights, ``other`` weights and ``lora`` LoRA parameters.

    Under ``assumption`` (default: the paper's for ``method``). Linear in every
    count: doubling all three doubles the bytes.
    """
    if method not in METHODS:
        raise UserInputError(f"Unknown method {method!r}. Known methods: {', '.join(METHODS)}.")
    _check_count("linear", linear)
    _check_count("other", other)
    if method != METHODS[0]:
        _check_count("lora", lora)
    chosen = assumption or PAPER_ASSUMPTIONS[method]
    if chosen.method != method:
        raise UserInputError(f"The assumption {chosen.note!r} is for {chosen.method}, not {method}.")
    return chosen.bytes_for(linear, other, lora)


def assumption_table(shape: DecoderShape | str, rank: int = PAPER_RANK) -> str:
    """A Markdown table: each byte assumption of ``ASSUMPTION_VARIANTS`` and what it gives for ``shape``."""
    if isinstance(shape, str):
        shape = get_shape(shape)
    lines = [
        "| method | assumption | bytes per trained parameter | bytes per unquantized frozen parameter | GB | GiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for variant in ASSUMPTION_VARIANTS:
        total = variant.bytes_for(shape.linear_parameters, shape.other_parameters, shape.lora_parameters(rank))
        frozen = f"{variant.frozen:g}" if variant.method != METHODS[0] else "-"
        lines.append(
            f"| {variant.method} | {variant.note} | {variant.trained:g} | {frozen} | {total / GB:,.1f} | "
            f"{total / GIB:,.1f} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Projection:
    """The projected training memory of one method on one model size."""

    model: str
    parameters: int
    method: str
    bytes: float

    @property
    def gb(self) -> float:
        """The memory in decimal GB, the unit of the QLoRA paper's figures."""
        return self.bytes / GB

    @property
    def gib(self) -> float:
        """The memory in GiB, the unit of a GPU's memory."""
        return self.bytes / GIB

    def fits(self, gpu: str) -> bool:
        """True when the projection (activations excluded) is within the memory a program can allocate on ``gpu``.

        Both in GiB; ``gpu`` is a name in ``estimator.GPUS`` (``usable_gib``).
        """
        return self.gib <= usable_gib(gpu)


def project(shape: DecoderShape | str, method: str, rank: int = PAPER_RANK) -> Projection:
    """The training memory of ``method`` on ``shape`` (a ``DecoderShape`` or a size name like ``"65B"``)."""
    if isinstance(shape, str):
        shape = get_shape(shape)
    total = training_bytes(method, shape.linear_parameters, shape.other_parameters, shape.lora_parameters(rank))
    return Projection(shape.name, shape.parameters, method, total)


def project_all(rank: int = PAPER_RANK) -> list[Projection]:
    """Every method on every LLaMA size, in size order."""
    return [project(shape, method, rank) for shape in LLAMA_SHAPES.values() for method in METHODS]


def projection_table(projections: list[Projection]) -> str:
    """A Markdown table: one row per model size, one column per method (GiB), then the smallest GPU QLoRA fits.

    The GPUs are ``PROJECTION_GPUS``, each compared by its usable memory (``usable_gib``).
    """
    sizes = list(dict.fromkeys(p.model for p in projections))
    by_key = {(p.model, p.method): p for p in projections}
    methods = list(dict.fromkeys(p.method for p in projections))
    header = ["model", "parameters", *(f"{m} (GiB)" for m in methods), "smallest GPU for QLoRA"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for size in sizes:
        cells = [size, f"{by_key[size, methods[0]].parameters / 1e9:.2f}B"]
        cells += [f"{by_key[size, m].gib:,.1f}" for m in methods]
        qlora = by_key.get((size, METHODS[2]))
        fitting = [gpu for gpu in PROJECTION_GPUS if qlora is not None and qlora.fits(gpu)]
        cells.append(fitting[0] if fitting else "none listed")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Per rank, when N GPUs train one model together (notebook 07). Data parallelism (DDP) gives every rank the whole
# model, so each holds what one GPU would, plus DDP's gradient buckets (a copy of the gradients, in their 16-bit
# dtype, that the all-reduce works on). Fully sharded data parallelism (FSDP, ZeRO-3) gives each rank 1/N of the
# parameters, gradients and optimizer state, and gathers whole units for the time they compute: the transformer block
# that runs and the one prefetched (GATHERED_BLOCKS), and the root unit (embeddings, LM head, final norm), which stays
# gathered from the forward pass to the backward pass. FSDP shards parameters only: bitsandbytes keeps a 4-bit
# layer's quantization state (absmax and the nested constants) in a ``QuantState`` on ``Linear4bit.quant_state``,
# no parameter, so every rank holds all of it. "FSDP offload" is FSDP with ``fsdp_offload_params: true``: the
# sharded parameters, their gradients and the optimizer step live in CPU RAM, and a GPU holds only what is gathered
# and the quantization state. On one GPU DDP is not used; FSDP offload still is (it is the point of it).
SCALE_OUT_RANKS = (1, 2, 4, 8)
# A 24 GB, a 48 GB and an 80 GB card of ``estimator.GPUS``, each compared by the GiB a program can allocate on it.
SCALE_OUT_GPUS = ("RTX 4090", "RTX A6000", "A100 80GB")
STRATEGIES = ("DDP", "FSDP", "FSDP offload")
GATHERED_BLOCKS = 2
GATHERED_BYTES = 2  # a gathered 16-bit weight (the frozen base of LoRA, LoRA's own weights, the root unit)


# Llama 2 70B (Touvron et al. 2023, "Llama 2"): 64 query heads and 8 key/value heads of 128, 68.98B parameters.
LLAMA2_70B = DecoderShape("70B", hidden=8192, layers=80, intermediate=28672, heads=64, kv_heads=8)
SCALE_OUT_SHAPES: dict[str, DecoderShape] = {"7B": LLAMA_SHAPES["7B"], "13B": LLAMA_SHAPES["13B"], "70B": LLAMA2_70B}


def gathered_block_bytes(shape: DecoderShape, method: str, rank: int = PAPER_RANK) -> float:
    """One transformer block's weights as FSDP gathers them: QLoRA's linear layers as 4-bit codes, 16 bits the rest.

    The gathered codes come without their quantization state, which every rank holds already.
    """
    linear, lora = shape.linear_parameters / shape.layers, shape.lora_parameters(rank) / shape.layers
    if method == METHODS[0]:
        return GATHERED_BYTES * linear
    base = NF4_CODE_BITS / 8 if method == METHODS[2] else GATHERED_BYTES
    return base * linear + GATHERED_BYTES * lora


def gradient_bucket_bytes(shape: DecoderShape, method: str, rank: int = PAPER_RANK) -> float:
    """DDP's gradient buckets: one 16-bit copy of every trained parameter's gradient."""
    trained = shape.parameters if method == METHODS[0] else shape.lora_parameters(rank)
    return GATHERED_BYTES * trained


def quant_state_bytes(shape: DecoderShape, method: str) -> float:
    """QLoRA's quantization state (absmax, second-level absmax): on every rank whole, FSDP or not. 0 for the others.

    The per-layer code books (16 and 256 fp32 values) add about 1 KB per layer and are left out.
    """
    return QUANT_STATE_BITS / 8 * shape.linear_parameters if method == METHODS[2] else 0.0


def _check_scale_out(method: str, ranks: int, strategy: str) -> None:
    if method not in METHODS:
        raise UserInputError(f"Unknown method {method!r}. Known methods: {', '.join(METHODS)}.")
    if strategy not in STRATEGIES:
        raise UserInputError(f"Unknown strategy {strategy!r}. Known strategies: {', '.join(STRATEGIES)}.")
    if ranks < 1:
        raise UserInputError(f"The number of GPUs must be at least 1, got {ranks}.")


def per_rank_bytes(shape: DecoderShape, method: str, ranks: int, strategy: str, rank: int = PAPER_RANK) -> float:
    """GPU bytes one of ``ranks`` GPUs holds to fine-tune ``shape`` with ``method`` under ``strategy`` (no activations).

    ``strategy`` is one of ``STRATEGIES``; ``rank`` is LoRA's rank r, not a
    process's. FSDP: the 1/N share of everything but the quantization state,
    which every rank holds whole, plus the gathered units. FSDP offload: the
    gathered units and the quantization state only (the share is in CPU RAM,
    ``offloaded_bytes``).
    """
    _check_scale_out(method, ranks, strategy)
    total = training_bytes(method, shape.linear_parameters, shape.other_parameters, shape.lora_parameters(rank))
    replicated = quant_state_bytes(shape, method)
    gathered = GATHERED_BLOCKS * gathered_block_bytes(shape, method, rank) + GATHERED_BYTES * shape.other_parameters
    if strategy == "FSDP offload":
        return replicated + gathered
    if ranks == 1:
        return total
    if strategy == "DDP":
        return total + gradient_bucket_bytes(shape, method, rank)
    return (total - replicated) / ranks + replicated + gathered


def offloaded_bytes(shape: DecoderShape, method: str, ranks: int, rank: int = PAPER_RANK) -> float:
    """CPU RAM one rank holds under FSDP offload: its share of the parameters, gradients and optimizer state."""
    _check_scale_out(method, ranks, "FSDP offload")
    total = training_bytes(method, shape.linear_parameters, shape.other_parameters, shape.lora_parameters(rank))
    return (total - quant_state_bytes(shape, method)) / ranks


def per_rank_table(
    shapes: dict[str, DecoderShape], rows: list[tuple[str, str]], rank: int = PAPER_RANK
) -> tuple[str, dict[tuple[str, str, str, int], float]]:
    """A Markdown table of GiB per GPU: one row per model and (method, strategy), one column per GPU count.

    Each cell names the GPUs of ``SCALE_OUT_GPUS`` whose usable memory it fits. Also returns
    the numbers (GiB), keyed by (model, method, strategy, GPUs).
    """
    header = ["model", "method", "strategy", *(f"{n} GPU{'s' if n > 1 else ''}" for n in SCALE_OUT_RANKS)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    numbers: dict[tuple[str, str, str, int], float] = {}
    for name, shape in shapes.items():
        for method, strategy in rows:
            cells = [name, method, strategy]
            for ranks in SCALE_OUT_RANKS:
                gib = per_rank_bytes(shape, method, ranks, strategy, rank) / GIB
                numbers[name, method, strategy, ranks] = gib
                fits = [gpu for gpu in SCALE_OUT_GPUS if gib <= usable_gib(gpu)]
                cells.append(f"{gib:,.2f} ({', '.join(fits) or 'none'})")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), numbers
