"""Quantization from scratch: absmax int8, blockwise scaling, NF4, double quantization; llama.cpp's Q4_1.

Taught in notebook 01 (Q4_1 in notebook 08). Pure PyTorch, written to be read. Each function does
what bitsandbytes does on the CPU, and the tests check it against
bitsandbytes: the NF4 code book value for value, the packed 4-bit bytes and
absmax constants of ``bitsandbytes.functional.quantize_4bit`` byte for byte,
and the nested (double-quantized) constants as closely as bitsandbytes' CPU
kernel allows (see :func:`quantize_blockwise`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from scipy.stats import norm

NF4_OFFSET = 0.9677083
"""Outermost quantile of the NF4 construction: ``norm.ppf(0.9677083)`` is about 1.85 standard deviations."""

DEFAULT_BLOCK_SIZE = 64
NESTED_BLOCK_SIZE = 256
FOUR_BIT_TYPES = ("nf4", "fp4", "int4")
ABSMAX_BYTES = 4  # one float32 scale per block
TINY = 1e-38  # bitsandbytes' floor for a block's absmax, so an all-zero block does not divide by zero


def check_block_size(block_size: int) -> int:
    """Return ``block_size`` if it is a positive integer, else raise a ValueError that says what to pass."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(
            f"block_size must be a positive integer, got {block_size!r}. "
            f"Use {DEFAULT_BLOCK_SIZE} (the QLoRA default) or another power of two such as 32, 128 or 256."
        )
    return block_size


def check_float_tensor(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` flattened as float32, after checking that it is a non-empty floating-point tensor."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"Only floating-point tensors can be quantized, got {kind}. Convert with x.float() first.")
    if x.numel() == 0:
        raise ValueError("Cannot quantize an empty tensor: there is no absmax to scale by.")
    return x.detach().reshape(-1).float()


def block_count(numel: int, block_size: int) -> int:
    """Blocks needed for ``numel`` values; the last block may be partial."""
    return -(-numel // check_block_size(block_size))


def blockwise_absmax(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """The largest absolute value of each block of ``block_size`` consecutive values (last block partial)."""
    full = flat.numel() - flat.numel() % check_block_size(block_size)
    absmax = flat[:full].reshape(-1, block_size).abs().amax(dim=1)
    if full < flat.numel():
        absmax = torch.cat([absmax, flat[full:].abs().amax().reshape(1)])
    return absmax


def scale_to_unit(flat: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """Divide each block by its absmax, so every value lies in [-1, 1].

    Full blocks are multiplied by ``1 / absmax`` and the partial last block is
    divided by its absmax: the exact float operations bitsandbytes' CPU path
    uses, so that the 4-bit codes come out bit-identical.
    """
    full = flat.numel() - flat.numel() % block_size
    blocks = full // block_size
    scaled = flat[:full].reshape(-1, block_size) * (1.0 / absmax[:blocks].clamp(min=TINY)).view(-1, 1)
    parts = [scaled.reshape(-1)]
    if full < flat.numel():
        parts.append(flat[full:] / absmax[blocks].clamp(min=TINY))
    return torch.cat(parts).clamp(-1, 1)


def expand_per_block(absmax: torch.Tensor, numel: int, block_size: int) -> torch.Tensor:
    """Repeat each block's absmax for the values of its block (``numel`` values in all)."""
    return absmax.repeat_interleave(block_size)[:numel]


# --- absmax integer quantization (section 1 and 2 of notebook 01) -------------------------------------------------


@dataclass(frozen=True)
class AbsmaxQuantized:
    """Integer codes in [-levels, levels] and the float32 absmax of each block (one block: per-tensor)."""

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    block_size: int
    bits: int


def absmax_quantize(x: torch.Tensor, bits: int = 8, block_size: int | None = None) -> AbsmaxQuantized:
    """Symmetric absmax quantization: ``round(levels * x / absmax)`` with ``levels = 2**(bits-1) - 1``.

    ``block_size=None`` uses one absmax for the whole tensor (per-tensor int8);
    an integer gives each block of that many consecutive values its own absmax.
    """
    if bits not in range(2, 9):
        raise ValueError(f"bits must be between 2 and 8 (codes are stored as int8), got {bits!r}.")
    flat = check_float_tensor(x)
    size = flat.numel() if block_size is None else check_block_size(block_size)
    absmax = blockwise_absmax(flat, size)
    levels = 2 ** (bits - 1) - 1
    scale = expand_per_block(absmax.clamp(min=TINY), flat.numel(), size)
    codes = torch.round(levels * flat / scale).to(torch.int8)
    return AbsmaxQuantized(codes.reshape(x.shape), absmax, x.shape, size, bits)


def absmax_dequantize(q: AbsmaxQuantized) -> torch.Tensor:
    """Undo :func:`absmax_quantize`: ``codes * absmax / levels``, in float32."""
    levels = 2 ** (q.bits - 1) - 1
    flat = q.codes.reshape(-1).float()
    return (flat * expand_per_block(q.absmax, flat.numel(), q.block_size) / levels).reshape(q.shape)


# --- code books (section 3) ---------------------------------------------------------------------------------------


def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels: quantiles of N(0, 1), an exact zero, normalised to [-1, 1].

    The construction of bitsandbytes' ``create_normal_map``: 8 positive
    quantiles at ``linspace(offset, 0.5, 9)[:-1]`` and 7 negative ones at
    ``linspace(offset, 0.5, 8)[:-1]``, plus zero, divided by the largest. The
    asymmetry (8 positive, 7 negative) is what lets zero be exact with 16 codes.
    """
    if not 0.5 < offset < 1:
        raise ValueError(f"offset must lie strictly between 0.5 and 1 (a quantile above the median), got {offset!r}.")
    positive = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())).tolist()
    values = torch.tensor(sorted([*negative, 0.0, *positive]), dtype=torch.float32)
    return values / values.max()


def fp4_code() -> torch.Tensor:
    """The 16 values of bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit), sorted, normalised to [-1, 1].

    Magnitudes: zero, one subnormal (0.0625) and the normal numbers
    ``(1 + m/2) * 2**e`` for exponents 1 to 3, divided by the largest (12).
    Values are sorted here; bitsandbytes stores FP4 codes in bit-pattern order,
    so its packed bytes differ from ours while the dequantized values agree.
    """
    magnitudes = [0.0, 0.0625] + [(1 + m / 2) * 2**e for e in (1, 2, 3) for m in (0, 1)]
    values = torch.tensor(sorted([-v for v in magnitudes] + magnitudes), dtype=torch.float32)
    return values / values.abs().max()


def int4_code() -> torch.Tensor:
    """Uniform 4-bit levels ``k / 7`` for k in -7..7: absmax int4 written as a code book (15 levels)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map of bitsandbytes (256 sorted values in [-1, 1]), for the nested absmax.

    A dynamic exponent (powers of ten from 1e-6 to 1) with a shrinking linear
    fraction: fine steps near zero, coarse ones near one. Same values as
    ``bitsandbytes.functional.create_dynamic_map()``.
    """
    exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(exponent_bits):
        items = 2 ** (i + non_sign_bits - exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = ((boundaries[:-1] + boundaries[1:]) / 2.0) * 10 ** (-(exponent_bits - 1) + i)
        data += means.tolist() + (-means).tolist()
    return torch.tensor(sorted([*data, 0.0, 1.0]), dtype=torch.float32)


def four_bit_code(quant_type: str) -> torch.Tensor:
    """The code book of a 4-bit type: ``nf4``, ``fp4`` or ``int4``."""
    books = {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code}
    if quant_type not in books:
        raise ValueError(f"Unknown 4-bit type {quant_type!r}. Choose one of: {', '.join(FOUR_BIT_TYPES)}.")
    return books[quant_type]()


# --- blockwise code-book quantization (sections 3 to 5) -----------------------------------------------------------


@dataclass(frozen=True)
class CodebookQuantized:
    """One code-book index per value (uint8, flat) and the float32 absmax of each block."""

    indices: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: torch.Size
    block_size: int


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code-book value for each value in [-1, 1] (a tie goes to the lower value)."""
    if code.ndim != 1 or code.numel() < 2 or code.numel() > 256 or not bool((code[1:] >= code[:-1]).all()):
        raise ValueError("The code book must be a sorted 1-D tensor of 2 to 256 values (an index must fit in a byte).")
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints).to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> CodebookQuantized:
    """Scale each block by its absmax, then replace each value by the index of its nearest code-book value.

    With NF4's 16 values this is 4-bit NF4; with :func:`dynamic_map` and
    blocks of 256 it is the 8-bit step of double quantization. Our rounding is
    exact nearest-value. bitsandbytes' 8-bit CPU kernel finds the index by an
    approximate search and, for values within about 1e-4 of the midpoint
    between two codes, may pick the neighbour: a one-step difference on a
    small share of values (measured in notebook 01).
    """
    flat = check_float_tensor(x)
    absmax = blockwise_absmax(flat, block_size)
    indices = nearest_code(scale_to_unit(flat, absmax, block_size), code)
    return CodebookQuantized(indices, absmax, code, x.shape, block_size)


def dequantize_blockwise(q: CodebookQuantized) -> torch.Tensor:
    """Look each index up in the code book and multiply by its block's absmax (float32)."""
    values = q.code[q.indices.long()]
    return (values * expand_per_block(q.absmax, values.numel(), q.block_size)).reshape(q.shape)


def pack_4bit(indices: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte, the first in the high nibble (bitsandbytes' order), shaped ``(bytes, 1)``."""
    if indices.numel() % 2:
        raise ValueError("pack_4bit needs an even number of indices; pad the last one first.")
    if indices.numel() and int(indices.max()) > 15:
        raise ValueError("pack_4bit got an index above 15: 4-bit codes run from 0 to 15.")
    codes = indices.reshape(-1).to(torch.uint8)
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Undo :func:`pack_4bit`: the first ``numel`` 4-bit indices, as uint8."""
    flat = packed.reshape(-1)
    indices = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)
    return indices[:numel]


# --- double quantization (section 5) ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NestedAbsmax:
    """Absmax constants quantized to 8 bits: ``absmax ≈ offset + dequantize_blockwise(quantized)``."""

    quantized: CodebookQuantized
    offset: torch.Tensor


def double_quantize(absmax: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE) -> NestedAbsmax:
    """Quantize the float32 absmax constants to 8 bits, as bitsandbytes' ``compress_statistics`` does.

    Every absmax is positive, so bitsandbytes first subtracts their mean (the
    ``offset``), which centres them on zero, where the signed dynamic map has
    its fine steps; then blocks of 256 are quantized with that map.
    """
    offset = absmax.float().mean()
    return NestedAbsmax(quantize_blockwise(absmax.float() - offset, dynamic_map(), block_size), offset)


def dequantize_absmax(nested: NestedAbsmax) -> torch.Tensor:
    """The absmax constants back in float32: ``dequantize_blockwise(quantized) + offset``."""
    return dequantize_blockwise(nested.quantized) + nested.offset


# --- 4-bit quantization (sections 4 and 5) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantized4bit:
    """A tensor in 4 bits: packed indices (two per byte), per-block absmax, and the code book.

    ``absmax`` holds float32 constants, or :class:`NestedAbsmax` after double quantization.
    """

    packed: torch.Tensor
    absmax: torch.Tensor | NestedAbsmax
    code: torch.Tensor
    shape: torch.Size
    block_size: int


def quantize_4bit(
    x: torch.Tensor,
    quant_type: str = "nf4",
    block_size: int = DEFAULT_BLOCK_SIZE,
    double_quant: bool = False,
) -> Quantized4bit:
    """Blockwise 4-bit quantization with the ``quant_type`` code book, packed two indices per byte.

    For ``nf4`` the packed bytes and absmax equal those of
    ``bitsandbytes.functional.quantize_4bit(x, blocksize=block_size, quant_type="nf4")``.
    ``double_quant=True`` also quantizes the absmax constants (:func:`double_quantize`).
    """
    code = four_bit_code(quant_type)
    flat = check_float_tensor(x)
    absmax = blockwise_absmax(flat, block_size)
    scaled = scale_to_unit(flat, absmax, block_size)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # the spare nibble holds the code of 0.0
    packed = pack_4bit(nearest_code(scaled, code))
    kept: torch.Tensor | NestedAbsmax = double_quantize(absmax) if double_quant else absmax
    return Quantized4bit(packed, kept, code, x.shape, block_size)


def dequantize_4bit(q: Quantized4bit) -> torch.Tensor:
    """Unpack the indices, look them up in the code book, and scale each block by its absmax (float32)."""
    numel = math.prod(q.shape)
    absmax = dequantize_absmax(q.absmax) if isinstance(q.absmax, NestedAbsmax) else q.absmax
    values = q.code[unpack_4bit(q.packed, numel).long()]
    return (values * expand_per_block(absmax, numel, q.block_size)).reshape(q.shape)


def relative_error(x: torch.Tensor, restored: torch.Tensor) -> float:
    """Reconstruction error as a share of the tensor's size: ``||x - restored|| / ||x||``."""
    original = x.detach().float()
    return float(torch.linalg.vector_norm(original - restored.float()) / torch.linalg.vector_norm(original))


# --- llama.cpp's Q4_1, the format the packaged decoder ships in (notebook 08) --------------------------------------

Q4_1_BLOCK_SIZE = 32
Q4_1_BLOCK_BYTES = 2 + 2 + Q4_1_BLOCK_SIZE // 2  # an fp16 scale, an fp16 minimum, 32 four-bit codes
Q4_1_LEVELS = 15  # codes 0 to 15: the block's minimum to its maximum in 15 equal steps


def q4_1_dequantize(raw: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Weights from llama.cpp's Q4_1 bytes: each block of 32 holds a scale ``d``, a minimum ``m`` and codes ``q``.

    Every weight is ``d * q + m``. Byte ``j`` of a block's codes holds weight
    ``j`` in its low four bits and weight ``j + 16`` in its high four bits.
    Unlike NF4 the grid is even and not centred on zero: asymmetric
    (min/scale) where NF4 is symmetric (absmax) with levels at normal quantiles.
    """
    blocks = raw.reshape(-1, Q4_1_BLOCK_BYTES)
    scale = blocks[:, 0:2].contiguous().view(torch.float16).float()
    minimum = blocks[:, 2:4].contiguous().view(torch.float16).float()
    codes = blocks[:, 4:]
    q = torch.cat([codes & 0x0F, codes >> 4], dim=1).float()
    return (scale * q + minimum).reshape(tuple(shape))


def q4_1_round_trip(x: torch.Tensor) -> torch.Tensor:
    """Quantize to Q4_1 and back, as llama.cpp does: per block of 32, 15 even steps from its minimum to its maximum.

    The scale and the minimum are stored in fp16, so they are rounded to fp16 here too.
    """
    flat = check_float_tensor(x)
    if flat.numel() % Q4_1_BLOCK_SIZE:
        raise ValueError(f"Q4_1 needs a multiple of {Q4_1_BLOCK_SIZE} values, got {flat.numel()}.")
    blocks = flat.reshape(-1, Q4_1_BLOCK_SIZE)
    low, high = blocks.min(dim=1, keepdim=True).values, blocks.max(dim=1, keepdim=True).values
    scale = (high - low) / Q4_1_LEVELS
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round((blocks - low) * inverse).clamp(0, Q4_1_LEVELS)
    restored = scale.half().float() * q + low.half().float()
    return restored.reshape(x.shape)


def q4_1_bits_per_parameter() -> float:
    """Bits a weight costs in Q4_1: 4 for its code plus its share of the block's two fp16 constants (5.0)."""
    return 4 + 2 * 16 / Q4_1_BLOCK_SIZE


# --- the bits-per-parameter bill (section 5) ----------------------------------------------------------------------


def bits_per_parameter(
    block_size: int = DEFAULT_BLOCK_SIZE,
    double_quant: bool = False,
    nested_block_size: int = NESTED_BLOCK_SIZE,
) -> float:
    """The QLoRA paper's bill: 4 bits per weight plus its share of the block constants.

    Without double quantization ``4 + 32/64 = 4.5``; with it
    ``4 + 8/64 + 32/(64*256) ≈ 4.127`` (large tensors, code books ignored).
    """
    check_block_size(block_size)
    check_block_size(nested_block_size)
    if double_quant:
        return 4 + 8 / block_size + 32 / (block_size * nested_block_size)
    return 4 + 32 / block_size


@dataclass(frozen=True)
class StorageBill:
    """Bytes to store some weight matrices in 4 bits, split as bitsandbytes keeps them."""

    params: int
    packed_bytes: int
    absmax_bytes: int
    nested_bytes: int
    code_book_bytes: int

    @property
    def total_bytes(self) -> int:
        """Packed weights plus every constant."""
        return self.packed_bytes + self.absmax_bytes + self.nested_bytes + self.code_book_bytes

    @property
    def bits_per_param(self) -> float:
        """Bits per weight, all constants included."""
        return 8 * self.total_bytes / self.params


def storage_bill(
    shapes: Iterable[Sequence[int]],
    block_size: int = DEFAULT_BLOCK_SIZE,
    double_quant: bool = False,
    nested_block_size: int = NESTED_BLOCK_SIZE,
) -> StorageBill:
    """Exact 4-bit storage of tensors with these shapes, as bitsandbytes holds them.

    Per tensor: ``ceil(n/2)`` packed bytes; one float32 absmax per block, or
    with double quantization one byte per block, one float32 per 256 blocks,
    a float32 offset and the 256-value dynamic map; and the 16-value code book.
    It equals :func:`qlora_tutorial.memory.quant_state_bytes` plus the packed
    bytes, which the tests check.
    """
    params = packed = absmax_bytes = nested = books = 0
    for shape in shapes:
        numel = math.prod(shape)
        blocks = block_count(numel, block_size)
        params += numel
        packed += -(-numel // 2)
        books += 16 * 4
        if double_quant:
            absmax_bytes += blocks
            nested += ABSMAX_BYTES * block_count(blocks, nested_block_size) + 4 + 256 * 4
        else:
            absmax_bytes += ABSMAX_BYTES * blocks
    if params == 0:
        raise ValueError("storage_bill got no tensors: pass the shapes of the weight matrices to quantize.")
    return StorageBill(params, packed, absmax_bytes, nested, books)


def bert_linear_shapes(layers: int, hidden: int, intermediate: int) -> list[tuple[int, int]]:
    """Weight shapes of a BERT encoder's linear layers: per layer query, key, value, output, and the MLP pair.

    ``bert_linear_shapes(12, 768, 3072)`` is bert-base; ``(6, 384, 1536)`` the packaged MiniLM.
    """
    one_layer = [(hidden, hidden)] * 4 + [(intermediate, hidden), (hidden, intermediate)]
    return one_layer * layers


def encoder_linear_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """Weight shapes of every ``nn.Linear`` inside a model's ``encoder`` (the layers QLoRA quantizes)."""
    return [
        tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".encoder." in f".{name}"
    ]
