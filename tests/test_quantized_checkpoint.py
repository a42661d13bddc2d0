"""Saved 4-bit checkpoints: the builder writes what save_pretrained writes, and a saved model reloads exactly."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open

from qlora_tutorial import quantized_checkpoint
from qlora_tutorial.cpu_packing import PackedWeightsError, linear4bit_layers, repack_for_cpu, standard_layout_kept
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.quantized_checkpoint import (
    BUILD_FILE,
    INDEX_FILE,
    checkpoint_dir,
    dequantized_weights,
    ensure_random_checkpoint,
    load_quantizing,
    load_saved_4bit,
    random_shards,
    save_quantized,
    write_random_checkpoint,
)
from qlora_tutorial.shapes import get_decoder_shape

TINY = get_decoder_shape("tiny-llama")
TINY_TIED = replace(TINY, name="tiny-llama-tied", tied_embeddings=True)


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as file:
            tensors.update({key: file.get_tensor(key) for key in file.keys()})  # noqa: SIM118
    return tensors


@pytest.fixture(scope="module", params=[TINY, TINY_TIED], ids=["untied", "tied"])
def twins(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same random weights written twice, layer by layer: saved in 4 bit, and in bf16."""
    root = tmp_path_factory.mktemp("checkpoints")
    shape = request.param
    four_bit, _ = ensure_random_checkpoint(shape, root, "nf4-dq", fresh_process=False)
    sixteen_bit, _ = ensure_random_checkpoint(shape, root, "bf16", fresh_process=False)
    return four_bit, sixteen_bit


def test_the_builder_writes_exactly_what_save_pretrained_writes_for_the_same_weights(twins, tmp_path: Path):
    four_bit, sixteen_bit = twins
    saved = save_quantized(load_quantizing(sixteen_bit, torch.bfloat16), tmp_path / "saved")
    built, reference = stored_tensors(four_bit), stored_tensors(saved)
    assert set(built) == set(reference)
    assert any(key.endswith(".weight.quant_state.bitsandbytes__nf4") for key in built)
    for key, tensor in built.items():
        assert tensor.dtype == reference[key].dtype and tensor.shape == reference[key].shape, key
        assert torch.equal(tensor, reference[key]), key
    assert json.loads((four_bit / "config.json").read_text()) == json.loads((saved / "config.json").read_text())


def test_both_ways_of_loading_give_identical_dequantized_weights(twins):
    four_bit, sixteen_bit = twins
    saved = dequantized_weights(load_saved_4bit(four_bit, torch.bfloat16))
    quantized_on_load = dequantized_weights(load_quantizing(sixteen_bit, torch.bfloat16))
    assert len(saved) == 7 * TINY.layers
    assert saved.keys() == quantized_on_load.keys()
    assert all(torch.equal(saved[name], quantized_on_load[name]) for name in saved)


def test_the_sixteen_bit_twin_holds_the_values_the_four_bit_one_was_quantized_from(twins):
    _, sixteen_bit = twins
    stored = stored_tensors(sixteen_bit)
    shape = TINY if "lm_head.weight" in stored else TINY_TIED  # the tied shape stores its embeddings once
    drawn = {key: value for shard in random_shards(shape) for key, value in shard.items()}
    assert stored.keys() == drawn.keys()
    assert all(torch.equal(stored[key], drawn[key]) for key in drawn)
    index = json.loads((sixteen_bit / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(stored)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())


def test_a_saved_4bit_model_reloads_with_its_weights_state_and_skipped_modules(twins, tmp_path: Path):
    _, sixteen_bit = twins
    original = load_quantizing(sixteen_bit, torch.float32)  # the CPU's compute dtype, as load_decoder has it
    reloaded = load_saved_4bit(save_quantized(original, tmp_path / "saved"), torch.float32)
    before, after = dequantized_weights(original), dequantized_weights(reloaded)
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
    layers = dict(zip(before, linear4bit_layers(original), strict=True))
    for name, layer in zip(after, linear4bit_layers(reloaded), strict=True):
        kept, state = layers[name].weight.quant_state, layer.weight.quant_state
        assert state.nested and state.quant_type == kept.quant_type == "nf4"
        assert state.blocksize == kept.blocksize and state.dtype == kept.dtype
        assert torch.equal(state.absmax, kept.absmax) and torch.equal(state.code, kept.code)
        assert torch.equal(state.state2.absmax, kept.state2.absmax) and torch.equal(state.offset, kept.offset)
        assert layer.compute_dtype == torch.float32
    assert not isinstance(reloaded.lm_head, bnb.nn.Linear4bit)
    assert reloaded.config.quantization_config.llm_int8_skip_modules == ["lm_head"]
    assert standard_layout_kept(reloaded)


def test_the_saved_checkpoint_computes_in_the_dtype_the_run_asks_for(twins):
    four_bit, _ = twins
    model = load_saved_4bit(four_bit, torch.float32)
    assert {layer.compute_dtype for layer in linear4bit_layers(model)} == {torch.float32}
    unquantized = [p for p in model.parameters() if not isinstance(p, bnb.nn.Params4bit)]
    assert {p.dtype for p in unquantized} == {torch.float32}  # cast even where transformers leaves them in bf16


def test_a_repacked_model_is_not_saved(twins, tmp_path: Path):
    _, sixteen_bit = twins
    model = load_quantizing(sixteen_bit, torch.bfloat16)
    repack_for_cpu(linear4bit_layers(model)[0])
    with pytest.raises(PackedWeightsError, match="repacked"):
        save_quantized(model, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_saving_a_model_without_4bit_layers_is_refused(twins, tmp_path: Path):
    four_bit, _ = twins
    model = load_saved_4bit(four_bit)
    with pytest.raises(UserInputError, match="no 4-bit layers"):
        save_quantized(model.dequantize(), tmp_path / "saved")


def test_a_16bit_checkpoint_is_not_loaded_as_a_saved_4bit_one(twins):
    _, sixteen_bit = twins
    with pytest.raises(UserInputError, match="not a saved 4-bit checkpoint"):
        load_saved_4bit(sixteen_bit)


def test_a_finished_build_is_reused_and_an_interrupted_one_is_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder, record = ensure_random_checkpoint(TINY, tmp_path, "nf4-dq", fresh_process=False)
    assert (
        folder == checkpoint_dir(tmp_path, TINY, "nf4-dq") and not folder.with_name(folder.name + ".partial").exists()
    )
    assert record["file_bytes"] == sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert record["build_peak"]["hwm_bytes"] > 0

    def no_rebuild(*args: object) -> None:
        raise AssertionError("rebuilt a finished checkpoint")

    monkeypatch.setattr(quantized_checkpoint, "write_random_checkpoint", no_rebuild)
    assert ensure_random_checkpoint(TINY, tmp_path, "nf4-dq", fresh_process=False) == (folder, record)
    (folder / BUILD_FILE).unlink()  # as if the build had stopped before its record was written
    with pytest.raises(AssertionError, match="rebuilt"):
        ensure_random_checkpoint(TINY, tmp_path, "nf4-dq", fresh_process=False)


@pytest.mark.parametrize(("precision", "message"), [("int4", "Unknown checkpoint precision"), ("fp32", "built at")])
def test_only_bf16_and_nf4_dq_checkpoints_are_built(tmp_path: Path, precision: str, message: str):
    with pytest.raises(UserInputError, match=message):
        write_random_checkpoint(TINY, tmp_path / "x", precision)


@pytest.mark.slow
def test_a_build_in_a_fresh_process_leaves_its_record(tmp_path: Path):
    folder, record = ensure_random_checkpoint(TINY, tmp_path, "nf4-dq")
    assert record == json.loads((folder / BUILD_FILE).read_text())
    assert record["build_peak"]["start_resident_bytes"] < record["build_peak"]["hwm_bytes"]
