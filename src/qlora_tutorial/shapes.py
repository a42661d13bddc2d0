"""Published decoder shapes: the sizes of Llama-architecture models, their parameter counts, and a config to build them.

Taught in notebook 09, which trains these shapes with random weights (memory
and time do not depend on the values) and prices the ones this machine cannot
hold with ``estimator``. Notebooks 06 and 07 project LLaMA 1.3B-70B with the
same type (``projection.LLAMA_SHAPES``).

A decoder block holds attention (q, k, v, o) and a gated MLP (gate, up, down);
those seven linear layers are what QLoRA quantizes and LoRA adapts. Grouped-
query attention gives k and v ``kv_heads`` heads instead of ``heads``, so they
are narrower than q. Each published shape is checked against its model card
(``config.json`` and the parameter count of its safetensors files) in
``tests/test_shapes.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qlora_tutorial.errors import UserInputError

if TYPE_CHECKING:  # transformers takes seconds to import; the arithmetic here never needs it
    from transformers import LlamaConfig

PAPER_RANK = 64  # the QLoRA paper's LoRA rank (Dettmers et al. 2023), the default of the projections
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


@dataclass(frozen=True)
class DecoderShape:
    """A Llama-architecture decoder: ``layers`` blocks of attention and a gated MLP, embeddings, an LM head.

    ``heads`` 0 means a shape written from its sizes alone (notebook 06's
    exercise): its parameters are known, its attention heads are not, so it
    cannot be built or its attention activations priced. ``kv_heads`` 0 means
    as many as ``heads`` (multi-head attention). ``published_parameters`` is
    the model card's count (``None`` for the tiny test shapes).
    """

    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int = 32_000
    heads: int = 0
    kv_heads: int = 0
    tied_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q, k and v
    hub_id: str = ""
    published_parameters: int | None = None

    def __post_init__(self) -> None:
        sizes = {"hidden": self.hidden, "layers": self.layers, "intermediate": self.intermediate, "vocab": self.vocab}
        for field, value in sizes.items():
            if value <= 0:
                raise UserInputError(f"Shape {self.name!r}: {field} must be positive, got {value}.")
        if self.heads < 0 or self.kv_heads < 0:
            raise UserInputError(f"Shape {self.name!r}: head counts cannot be negative.")
        if self.heads and self.hidden % self.heads:
            raise UserInputError(f"Shape {self.name!r}: hidden {self.hidden} is not divisible by {self.heads} heads.")
        if self.kv_heads and (not self.heads or self.heads % self.kv_heads):
            raise UserInputError(
                f"Shape {self.name!r}: {self.kv_heads} key/value heads must divide the {self.heads} attention heads."
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        if not self.heads:
            raise UserInputError(
                f"Shape {self.name!r} was written without its attention heads: give heads= (and kv_heads= for "
                "grouped-query attention) to build it or to price its attention."
            )
        return self.hidden // self.heads

    @property
    def kv_hidden(self) -> int:
        """Width of the k and v projections: ``kv_heads * head_dim``, or ``hidden`` without grouped-query attention."""
        return self.kv_heads * self.head_dim if self.kv_heads else self.hidden

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(fan in, fan out) of each linear layer kind of a block."""
        h, kv, mlp = self.hidden, self.kv_hidden, self.intermediate
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, mlp),
            "up_proj": (h, mlp),
            "down_proj": (mlp, h),
        }

    @property
    def largest_linear(self) -> int:
        """Weights of the largest linear layer: what QLoRA dequantizes at once in a forward or backward pass."""
        return max(fan_in * fan_out for fan_in, fan_out in self.linear_shapes.values())

    @property
    def linear_parameters(self) -> int:
        """Weights of the blocks' linear layers, the ones QLoRA quantizes and LoRA adapts."""
        return self.layers * sum(fan_in * fan_out for fan_in, fan_out in self.linear_shapes.values())

    @property
    def embedding_parameters(self) -> int:
        """Input embeddings plus the LM head, counted once when the two are tied."""
        return (1 if self.tied_embeddings else 2) * self.vocab * self.hidden

    @property
    def other_parameters(self) -> int:
        """Everything but the linear weights, all of which QLoRA leaves unquantized.

        Embeddings and LM head, the RMSNorm weights (two per block and a final
        one), and the attention biases where the shape has them.
        """
        biases = self.layers * (self.hidden + 2 * self.kv_hidden) if self.attention_bias else 0
        return self.embedding_parameters + (2 * self.layers + 1) * self.hidden + biases

    @property
    def parameters(self) -> int:
        """All parameters."""
        return self.linear_parameters + self.other_parameters

    def lora_parameters(self, rank: int = PAPER_RANK, targets: Sequence[str] = ALL_LINEAR_TARGETS) -> int:
        """LoRA A and B matrices on the ``targets`` kinds of every block: r * (fan_in + fan_out) each."""
        if rank <= 0:
            raise UserInputError(f"The LoRA rank must be positive, got {rank}. The QLoRA paper uses r={PAPER_RANK}.")
        shapes = self.linear_shapes
        unknown = [kind for kind in targets if kind not in shapes]
        if unknown or not targets:
            raise UserInputError(f"Unknown LoRA targets {unknown or list(targets)}. Known: {', '.join(shapes)}.")
        return self.layers * sum(rank * sum(shapes[kind]) for kind in targets)

    def llama_config(self) -> LlamaConfig:
        """A transformers ``LlamaConfig`` that builds a model of exactly this shape (random weights, notebook 09)."""
        from transformers import LlamaConfig

        if self.attention_bias:
            raise UserInputError(
                f"{self.name} has biases on q, k and v only; LlamaConfig(attention_bias=True) would add one to "
                "o_proj too. It is priced by the estimator, not built."
            )
        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads or 1,
            num_key_value_heads=self.kv_heads or self.heads or 1,
            head_dim=self.head_dim,
            tie_word_embeddings=self.tied_embeddings,
            max_position_embeddings=8192,
        )


# Published configurations, as config.json on the Hub states them; parameters: the total of the safetensors files.
# name, Hub id, hidden, MLP (intermediate), layers, heads, KV heads, vocab, tied embeddings, q/k/v biases, parameters
_PUBLISHED = (
    ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", 576, 1_536, 30, 9, 3, 49_152, True, False, 134_515_008),
    ("smollm2-360m", "HuggingFaceTB/SmolLM2-360M", 960, 2_560, 32, 15, 5, 49_152, True, False, 361_821_120),
    ("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B", 2_048, 8_192, 24, 32, 32, 49_152, True, False, 1_711_376_384),
    ("llama-3.2-1b", "meta-llama/Llama-3.2-1B", 2_048, 8_192, 16, 32, 8, 128_256, True, False, 1_235_814_400),
    ("llama-2-7b", "meta-llama/Llama-2-7b-hf", 4_096, 11_008, 32, 32, 32, 32_000, False, False, 6_738_415_616),
    ("llama-3-8b", "meta-llama/Meta-Llama-3-8B", 4_096, 14_336, 32, 32, 8, 128_256, False, False, 8_030_261_248),
    ("mistral-7b", "mistralai/Mistral-7B-v0.3", 4_096, 14_336, 32, 32, 8, 32_768, False, False, 7_248_023_552),
    ("mistral-7b-v0.1", "mistralai/Mistral-7B-v0.1", 4_096, 14_336, 32, 32, 8, 32_000, False, False, 7_241_732_096),
    ("qwen2.5-7b", "Qwen/Qwen2.5-7B", 3_584, 18_944, 28, 28, 4, 152_064, False, True, 7_615_616_512),
)
# Two tiny shapes for the smoke profile and the tests: not published models.
_TINY = (
    DecoderShape("tiny-llama", hidden=64, layers=2, intermediate=128, vocab=512, heads=4, kv_heads=2),
    DecoderShape("tiny-llama-wide", hidden=256, layers=2, intermediate=1024, vocab=512, heads=4, kv_heads=4),
)
DECODER_SHAPES: dict[str, DecoderShape] = {
    shape.name: shape
    for shape in (
        *_TINY,
        *(
            DecoderShape(
                name,
                hidden=hidden,
                layers=layers,
                intermediate=intermediate,
                vocab=vocab,
                heads=heads,
                kv_heads=kv_heads,
                tied_embeddings=tied,
                attention_bias=bias,
                hub_id=hub_id,
                published_parameters=parameters,
            )
            for name, hub_id, hidden, intermediate, layers, heads, kv_heads, vocab, tied, bias, parameters in _PUBLISHED
        ),
    )
}


def get_decoder_shape(name: str) -> DecoderShape:
    """Look a shape up by name, ignoring case, with a message listing the known ones."""
    try:
        return DECODER_SHAPES[name.strip().lower()]
    except KeyError:
        raise UserInputError(f"Unknown shape {name!r}. Known shapes: {', '.join(DECODER_SHAPES)}.") from None
