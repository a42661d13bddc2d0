"""The arithmetic that makes QLoRA matter: memory to fine-tune 1.3B to 65B models.

Taught in notebook 06. The notebook measures full fine-tuning, LoRA and QLoRA
on a 22.7M-parameter model, where every method fits anywhere; this module
projects the same per-parameter costs onto LLaMA-shaped models with the QLoRA
paper's setup (Dettmers et al. 2023, arXiv:2305.14314): LoRA r=64 on every
linear layer of the blocks.

Per-parameter costs, in bytes:

- 16-bit full fine-tuning: weights 2 + gradients 2 + AdamW's two fp32
  moments 8 + an fp32 master copy 4 = 16 (the paper's ">780 GB" for 65B).
- 16-bit LoRA: the base stays frozen at 2; the LoRA parameters cost 16
  (fp32 weights 4, gradients 4, two AdamW moments 8).
- QLoRA: the blocks' linear weights are NF4 with double quantization,
  4 + 8/64 + 32/(64*256) = 4.127 bits; embeddings, LM head and norms stay
  at 16 bits, as ``BitsAndBytesConfig`` leaves them; LoRA parameters as above.

Activations are left out: they depend on batch size and sequence length, and
gradient checkpointing trades them for compute. So every figure here is a
floor a run cannot go below, not a prediction of its peak.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 10**9  # decimal gigabytes, as GPU sizes and the QLoRA paper state them
NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64, fp32 second-level absmax per 256
FULL_16BIT_BYTES = 2 + 2 + 8 + 4  # weights, gradients, AdamW moments (fp32), fp32 master weights
LORA_PARAM_BYTES = 4 + 4 + 8  # fp32 weights, fp32 gradients, two fp32 AdamW moments
BASE_16BIT_BYTES = 2
PAPER_RANK = 64
PAPER_65B_QLORA_BOUND_GB = 48  # the paper: 65B fine-tuned on one 48 GB GPU
PAPER_65B_FULL_16BIT_GB = 780  # the paper: "more than 780 GB" for 16-bit full fine-tuning of 65B
METHODS = ("16-bit full fine-tuning", "16-bit LoRA", "QLoRA (NF4 + DQ)")
GPU_MEMORY_GB: dict[str, float] = {"T4": 16, "A100 40GB": 40, "A100 80GB": 80, "H100": 80, "H200": 141}


@dataclass(frozen=True)
class ModelShape:
    """A LLaMA-style decoder: attention (q, k, v, o) and a gated MLP (gate, up, down) per layer."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int = 32_000

    @property
    def linear_parameters(self) -> int:
        """Weights of the blocks' linear layers, the ones QLoRA quantizes and LoRA adapts."""
        return self.layers * (4 * self.hidden**2 + 3 * self.hidden * self.intermediate)

    @property
    def other_parameters(self) -> int:
        """Input embeddings, the untied LM head, and the RMSNorm weights (two per layer plus a final one)."""
        return 2 * self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden

    @property
    def parameters(self) -> int:
        """All parameters."""
        return self.linear_parameters + self.other_parameters

    def lora_parameters(self, rank: int = PAPER_RANK) -> int:
        """LoRA A and B matrices on all seven linear layers of every block: r * (fan_in + fan_out) each."""
        if rank <= 0:
            raise ValueError(f"The LoRA rank must be positive, got {rank}. The QLoRA paper uses r={PAPER_RANK}.")
        per_layer = 4 * rank * 2 * self.hidden + 3 * rank * (self.hidden + self.intermediate)
        return self.layers * per_layer


# Published configurations: Sheared-LLaMA-1.3B (princeton-nlp), LLaMA 7B/13B/33B/65B (Touvron et al. 2023).
LLAMA_SHAPES: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape("1.3B", hidden=2048, layers=24, intermediate=5504),
        ModelShape("7B", hidden=4096, layers=32, intermediate=11008),
        ModelShape("13B", hidden=5120, layers=40, intermediate=13824),
        ModelShape("33B", hidden=6656, layers=60, intermediate=17920),
        ModelShape("65B", hidden=8192, layers=80, intermediate=22016),
    )
}


def get_shape(name: str) -> ModelShape:
    """Look a model size up by name, with a message listing the known ones."""
    try:
        return LLAMA_SHAPES[name]
    except KeyError:
        known = ", ".join(LLAMA_SHAPES)
        raise ValueError(
            f"Unknown model size {name!r}. Known sizes: {known}. "
            "For another model, build a ModelShape(name, hidden, layers, intermediate) yourself."
        ) from None


def _check_count(name: str, count: int) -> None:
    if count <= 0:
        raise ValueError(f"{name} must be a positive number of parameters, got {count}.")


def training_bytes(method: str, linear: int, other: int, lora: int) -> float:
    """Bytes to fine-tune a model with ``linear`` block weights, ``other`` weights and ``lora`` LoRA parameters.

    Linear in every count: doubling all three doubles the bytes.
    """
    _check_count("linear", linear)
    _check_count("other", other)
    if method == METHODS[0]:
        return FULL_16BIT_BYTES * (linear + other)
    _check_count("lora", lora)
    if method == METHODS[1]:
        return BASE_16BIT_BYTES * (linear + other) + LORA_PARAM_BYTES * lora
    if method == METHODS[2]:
        return NF4_DQ_BITS / 8 * linear + BASE_16BIT_BYTES * other + LORA_PARAM_BYTES * lora
    raise ValueError(f"Unknown method {method!r}. Known methods: {', '.join(METHODS)}.")


@dataclass(frozen=True)
class Projection:
    """The projected training memory of one method on one model size."""

    model: str
    parameters: int
    method: str
    bytes: float

    @property
    def gb(self) -> float:
        """The memory in decimal GB."""
        return self.bytes / GB

    def fits(self, gpu: str) -> bool:
        """True when the projection (activations excluded) is within the GPU's memory."""
        if gpu not in GPU_MEMORY_GB:
            raise ValueError(f"Unknown GPU {gpu!r}. Known GPUs: {', '.join(GPU_MEMORY_GB)}.")
        return self.gb <= GPU_MEMORY_GB[gpu]


def project(shape: ModelShape | str, method: str, rank: int = PAPER_RANK) -> Projection:
    """The training memory of ``method`` on ``shape`` (a ``ModelShape`` or a size name like ``"65B"``)."""
    if isinstance(shape, str):
        shape = get_shape(shape)
    total = training_bytes(method, shape.linear_parameters, shape.other_parameters, shape.lora_parameters(rank))
    return Projection(shape.name, shape.parameters, method, total)


def project_all(rank: int = PAPER_RANK) -> list[Projection]:
    """Every method on every LLaMA size, in size order."""
    return [project(shape, method, rank) for shape in LLAMA_SHAPES.values() for method in METHODS]


def projection_table(projections: list[Projection]) -> str:
    """A Markdown table: one row per model size, one column per method, then the smallest GPU each fits."""
    sizes = list(dict.fromkeys(p.model for p in projections))
    by_key = {(p.model, p.method): p for p in projections}
    methods = list(dict.fromkeys(p.method for p in projections))
    header = ["model", "parameters", *(f"{m} (GB)" for m in methods), "smallest GPU for QLoRA"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for size in sizes:
        cells = [size, f"{by_key[size, methods[0]].parameters / 1e9:.2f}B"]
        cells += [f"{by_key[size, m].gb:,.1f}" for m in methods]
        qlora = by_key.get((size, METHODS[2]))
        fitting = [gpu for gpu in GPU_MEMORY_GB if qlora is not None and qlora.fits(gpu)]
        cells.append(fitting[0] if fitting else "none listed")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
