"""Notebook 08's question before loading: the decoder's shape from its config, the batch that fits, the merge's size."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from qlora_tutorial import decoder_fit
from qlora_tutorial.decoder import attach_decoder_lora, load_decoder
from qlora_tutorial.decoder_fit import (
    available_memory,
    batch_verdicts,
    free_memory,
    merge_verdict,
    merged_bytes,
    micro_batch_size,
    shape_from_config,
    training_spec,
)
from qlora_tutorial.decoder_profile import decoder_profile
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.estimator import RunSpec, RunWouldNotFit, estimate_peak
from qlora_tutorial.memory import weight_memory
from qlora_tutorial.projection import GIB
from qlora_tutorial.settings import Settings, load_settings
from qlora_tutorial.shapes import get_decoder_shape


@pytest.fixture
def settings(tiny_data_dir: Path) -> Settings:
    return load_settings("smoke", data_dir=tiny_data_dir)


@pytest.mark.parametrize("name", ["smollm2-135m", "llama-3-8b", "mistral-7b"])
def test_a_published_config_gives_the_published_shape(name):
    """The shape read from a config builds the same model as the shape written out in ``shapes``."""
    published = get_decoder_shape(name)
    shape = shape_from_config(published.llama_config(), name)
    assert shape.parameters == published.parameters == published.published_parameters
    assert (shape.kv_heads, shape.tied_embeddings, shape.vocab) == (
        published.kv_heads,
        published.tied_embeddings,
        published.vocab,
    )


def test_the_tiny_llamas_saved_config_reads_as_its_parameter_count(tiny_llama_dir, settings):
    model = load_decoder(settings, decoder_profile(settings, model_name=str(tiny_llama_dir)), "fp32")
    shape = shape_from_config(AutoConfig.from_pretrained(tiny_llama_dir), "tiny")
    assert shape.parameters == sum(parameter.numel() for parameter in model.parameters())


def test_multi_head_attention_without_kv_heads_counts_as_many_as_heads():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config.num_key_value_heads = None
    assert shape_from_config(config, "mha").kv_heads == 4


def test_a_config_that_is_not_a_llama_like_decoder_is_refused():
    config = SimpleNamespace(hidden_size=64, num_hidden_layers=2, vocab_size=512, num_attention_heads=4)
    with pytest.raises(UserInputError, match=r"bert's config has no intermediate_size: .*Llama-architecture"):
        shape_from_config(config, "bert")


def test_the_training_spec_is_the_profiles_qlora_run_on_this_device(settings):
    profile = decoder_profile(settings)
    spec = training_spec(settings, profile, get_decoder_shape("tiny-llama"), 77)
    assert (spec.method, spec.batch_size, spec.seq_len, spec.lora_r) == (
        "qlora",
        profile.batch_size,
        77,
        profile.lora_r,
    )
    assert (spec.compute_dtype, spec.device, spec.gradient_checkpointing) == ("fp32", "cpu", False)
    half = replace(settings, compute_dtype=torch.float16, device="cuda")
    assert training_spec(half, profile, spec.shape, 77).compute_dtype == "fp16"


def llama_on(batch_size: int) -> RunSpec:
    return RunSpec(get_decoder_shape("llama-3-8b"), "qlora", batch_size=batch_size, seq_len=256, compute_dtype="fp16")


def test_the_batch_is_halved_along_its_divisors_until_it_fits():
    spec = llama_on(12)
    needs = {batch: estimate_peak(replace(spec, batch_size=batch)).total_bytes for batch in (12, 6, 4)}
    available = round(needs[4] / 0.9) + 1  # batch 4 just fits with the 10% margin, 6 does not
    verdicts = batch_verdicts(spec, available, "a test GPU")
    assert list(verdicts) == [12, 6, 4], "divisors of 12, largest first, stopping at the first that fits"
    assert [verdict.fits for verdict in verdicts.values()] == [False, False, True]
    assert "a test GPU has" in verdicts[4].message
    assert micro_batch_size(verdicts) == 4


def test_a_batch_that_fits_is_kept():
    verdicts = batch_verdicts(llama_on(8), 1000 * GIB, "a big GPU")
    assert list(verdicts) == [8] and micro_batch_size(verdicts) == 8


def test_a_run_that_does_not_fit_even_one_example_at_a_time_is_refused():
    verdicts = batch_verdicts(llama_on(4), 4 * GIB, "a small GPU")
    assert list(verdicts) == [4, 2, 1]
    with pytest.raises(
        RunWouldNotFit, match=r"At a batch of one example, QLoRA of llama-3-8b needs .* a small GPU has"
    ):
        micro_batch_size(verdicts)


def test_the_cpus_memory_is_this_machines_available_memory(settings, monkeypatch):
    monkeypatch.setattr(decoder_fit.psutil, "virtual_memory", lambda: SimpleNamespace(available=5 * GIB))
    assert available_memory(settings) == (5 * GIB, "this machine")
    assert free_memory(settings) == (5 * GIB, "this machine")


def test_a_gpus_memory_is_what_cuda_reports_and_its_free_memory_counts_the_cache(settings, monkeypatch):
    """Faked CUDA: the card's total for the estimate before loading; free plus unused cache for the merge."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=15 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (3 * GIB, 15 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 6 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 5 * GIB)
    on_gpu = replace(settings, device="cuda")
    assert available_memory(on_gpu) == (15 * GIB, "Tesla T4")
    assert free_memory(on_gpu) == (4 * GIB, "Tesla T4")


@pytest.fixture
def tiny_qlora(settings, tiny_llama_dir):
    """The tiny Llama in NF4 with rank-1 adapters (rank 16 would outweigh its 32-wide linear layers)."""
    profile = decoder_profile(settings, model_name=str(tiny_llama_dir), lora_r=1)
    return attach_decoder_lora(load_decoder(settings, profile), settings, profile)


def test_the_merged_size_counts_every_base_parameter_once_and_no_adapter(tiny_qlora, tiny_llama_dir, settings):
    plain = load_decoder(settings, decoder_profile(settings, model_name=str(tiny_llama_dir)), "fp32")
    count = sum(parameter.numel() for parameter in plain.parameters())  # the tied embeddings once
    assert merged_bytes(tiny_qlora, torch.float16) == 2 * count
    assert merged_bytes(tiny_qlora, torch.float32) == 4 * count


def test_a_merge_fits_when_the_merged_model_less_the_4bit_one_fits(tiny_qlora):
    extra = merged_bytes(tiny_qlora, torch.float32) - weight_memory(tiny_qlora).total_bytes
    assert extra > 0, "the 4-bit layers grow fourfold and more in fp32"
    fits = merge_verdict(tiny_qlora, torch.float32, round(extra / 0.9) + 1, "a test GPU")
    assert fits.fits and fits.message.startswith("the fp32 merge is") and fits.message.endswith(": fits")
    too_big = merge_verdict(tiny_qlora, torch.float32, extra, "a test GPU")
    assert not too_big.fits and too_big.message.endswith("too large, the adapter ships alone")
