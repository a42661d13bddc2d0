"""Quantization from scratch, checked against bitsandbytes on the CPU."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch
from transformers import AutoModel

from qlora_tutorial import quantization as q
from qlora_tutorial.memory import quant_state_bytes
from qlora_tutorial.sources import packaged_minilm_dir


@pytest.fixture(scope="module")
def real_weight() -> torch.Tensor:
    """Encoder layer 0's query weight of the packaged MiniLM (384 x 384)."""
    model = AutoModel.from_pretrained(packaged_minilm_dir())
    return model.encoder.layer[0].attention.self.query.weight.detach().clone()


def random_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    with_outlier = torch.randn(1000, generator=generator)
    with_outlier[123] = 40.0
    return {
        "normal 64x64": torch.randn(64, 64, generator=generator),
        "1000 elements (not a multiple of 64)": torch.randn(1000, generator=generator),
        "999 elements (odd: a spare nibble)": torch.randn(999, generator=generator),
        "outlier": with_outlier,
        "7x33": torch.randn(7, 33, generator=generator) * 0.02,
        "with zero block": torch.cat([torch.zeros(64), torch.randn(64, generator=generator)]),
    }


def test_code_books_equal_bitsandbytes() -> None:
    assert torch.equal(q.nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(q.fp4_code(), bnbf.get_4bit_type("fp4", device="cpu").sort().values)
    assert torch.equal(q.dynamic_map(), bnbf.create_dynamic_map())


def test_nf4_code_shape() -> None:
    code = q.nf4_code()
    assert code.numel() == 16
    assert code.min() == -1 and code.max() == 1
    assert (code == 0).sum() == 1
    assert int((code > 0).sum()) == 8 and int((code < 0).sum()) == 7


@pytest.mark.parametrize("name", list(random_tensors()))
@pytest.mark.parametrize("block_size", [64, 128])
def test_nf4_matches_bitsandbytes_on_random_tensors(name: str, block_size: int) -> None:
    x = random_tensors()[name]
    packed, state = bnbf.quantize_4bit(x, blocksize=block_size, quant_type="nf4")
    ours = q.quantize_4bit(x, "nf4", block_size)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    assert q.dequantize_4bit(ours).shape == x.shape
    # bitsandbytes 0.50.2's CPU dequantize kernel goes wrong when a block is longer than an (even) row,
    # so its output is the reference only where blocks fit in a row.
    if block_size <= x.shape[-1] or x.shape[-1] % 2:
        restored = bnbf.dequantize_4bit(packed, state).reshape(-1)
        torch.testing.assert_close(q.dequantize_4bit(ours).reshape(-1), restored)


def test_nf4_matches_bitsandbytes_on_a_real_weight(real_weight: torch.Tensor) -> None:
    packed, state = bnbf.quantize_4bit(real_weight, blocksize=64, quant_type="nf4")
    ours = q.quantize_4bit(real_weight)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    torch.testing.assert_close(q.dequantize_4bit(ours), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("name", list(random_tensors()))
def test_fp4_values_match_bitsandbytes(name: str) -> None:
    x = random_tensors()[name]
    packed, state = bnbf.quantize_4bit(x, blocksize=64, quant_type="fp4")
    ours = q.quantize_4bit(x, "fp4")
    assert torch.equal(ours.absmax, state.absmax)
    torch.testing.assert_close(q.dequantize_4bit(ours).reshape(-1), bnbf.dequantize_4bit(packed, state).reshape(-1))


def test_pack_order_is_high_nibble_first() -> None:
    packed = q.pack_4bit(torch.tensor([1, 2, 15, 0], dtype=torch.uint8))
    assert packed.reshape(-1).tolist() == [0x12, 0xF0]
    assert q.unpack_4bit(packed, 3).tolist() == [1, 2, 15]


def test_double_quantization_follows_bitsandbytes(real_weight: torch.Tensor) -> None:
    packed, state = bnbf.quantize_4bit(real_weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = q.quantize_4bit(real_weight, double_quant=True)
    nested = ours.absmax
    assert isinstance(nested, q.NestedAbsmax)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(nested.offset, state.offset)
    assert torch.equal(nested.quantized.absmax, state.state2.absmax)
    assert state.state2.blocksize == nested.quantized.block_size == 256
    # bitsandbytes' CPU search sometimes picks a neighbour code near a midpoint; ours is always the nearest.
    assert (nested.quantized.indices != state.absmax).float().mean() < 0.01
    exact = q.blockwise_absmax(real_weight.reshape(-1), 64)
    ours_error = (q.dequantize_absmax(nested) - exact).abs()
    theirs = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert bool((ours_error <= (theirs - exact).abs() + 1e-7).all())
    torch.testing.assert_close(q.dequantize_4bit(ours), bnbf.dequantize_4bit(packed, state), atol=0.01, rtol=0)


def test_8bit_blockwise_is_nearest_and_close_to_bitsandbytes() -> None:
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(1))
    codes, state = bnbf.quantize_blockwise(x, blocksize=256)
    ours = q.quantize_blockwise(x, q.dynamic_map(), 256)
    assert torch.equal(ours.absmax, state.absmax)
    scaled = q.scale_to_unit(x, ours.absmax, 256)
    code = q.dynamic_map()
    ours_distance = (scaled - code[ours.indices.long()]).abs()
    their_distance = (scaled - code[codes.long()]).abs()
    brute_force = (scaled[:, None] - code[None, :]).abs().min(dim=1).values
    torch.testing.assert_close(ours_distance, brute_force, atol=0, rtol=0)
    assert float((their_distance - ours_distance).max()) < 1e-4
    assert (ours.indices != codes).float().mean() < 0.01


def test_absmax_int8_round_trip() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 1.0, 0.25])
    quantized = q.absmax_quantize(x)
    assert quantized.codes.tolist() == [-127, -32, 0, 64, 16]
    assert quantized.absmax.tolist() == [2.0]
    restored = q.absmax_dequantize(quantized)
    assert float((restored - x).abs().max()) <= 2.0 / 127 / 2 + 1e-7


def test_blockwise_beats_per_tensor_with_an_outlier() -> None:
    x = random_tensors()["outlier"]
    per_tensor = q.relative_error(x, q.absmax_dequantize(q.absmax_quantize(x)))
    blockwise = q.relative_error(x, q.absmax_dequantize(q.absmax_quantize(x, block_size=64)))
    assert blockwise < per_tensor / 2


def test_int4_code_book_equals_absmax_int4() -> None:
    x = torch.randn(640, generator=torch.Generator().manual_seed(2))
    as_code = q.dequantize_4bit(q.quantize_4bit(x, "int4"))
    as_integers = q.absmax_dequantize(q.absmax_quantize(x, bits=4, block_size=64))
    torch.testing.assert_close(as_code, as_integers)


def test_nf4_beats_fp4_and_int4_on_a_real_weight(real_weight: torch.Tensor) -> None:
    errors = {
        kind: q.relative_error(real_weight, q.dequantize_4bit(q.quantize_4bit(real_weight, kind)))
        for kind in q.FOUR_BIT_TYPES
    }
    assert errors["nf4"] < errors["int4"] and errors["nf4"] < errors["fp4"]


def test_bits_per_parameter_bill() -> None:
    assert q.bits_per_parameter() == 4.5
    assert q.bits_per_parameter(double_quant=True) == pytest.approx(4.127, abs=5e-4)
    assert q.bits_per_parameter(double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(384, 384), (1000,), (999,), (1536, 384)])
def test_storage_bill_equals_bitsandbytes_state(shape: tuple[int, ...], double_quant: bool) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    packed, state = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    bill = q.storage_bill([shape], double_quant=double_quant)
    assert bill.packed_bytes == packed.numel()
    assert bill.total_bytes - bill.packed_bytes == quant_state_bytes(state)


def test_storage_bill_of_bert_base_tends_to_the_formula() -> None:
    shapes = q.bert_linear_shapes(12, 768, 3072)
    assert len(shapes) == 72
    bill = q.storage_bill(shapes, double_quant=True)
    assert bill.params == 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    assert (
        q.bits_per_parameter(double_quant=True) < bill.bits_per_param < q.bits_per_parameter(double_quant=True) + 0.02
    )


def test_encoder_shapes_of_the_packaged_model() -> None:
    model = AutoModel.from_pretrained(packaged_minilm_dir())
    assert q.encoder_linear_shapes(model) == q.bert_linear_shapes(6, 384, 1536)


@pytest.mark.parametrize("block_size", [0, -64, 64.0, True, "64"])
def test_bad_block_size_is_refused(block_size: object) -> None:
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        q.quantize_4bit(torch.randn(128), block_size=block_size)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        q.bits_per_parameter(block_size=block_size)  # type: ignore[arg-type]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        q.quantize_4bit(torch.arange(10))
    with pytest.raises(ValueError, match="empty"):
        q.absmax_quantize(torch.empty(0))
    with pytest.raises(ValueError, match="Unknown 4-bit type 'nf3'"):
        q.quantize_4bit(torch.randn(64), "nf3")
    with pytest.raises(ValueError, match="bits must be between 2 and 8"):
        q.absmax_quantize(torch.randn(8), bits=16)
    with pytest.raises(ValueError, match="sorted"):
        q.quantize_blockwise(torch.randn(64), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="offset"):
        q.nf4_code(0.3)
    with pytest.raises(ValueError, match="even number"):
        q.pack_4bit(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no tensors"):
        q.storage_bill([])
