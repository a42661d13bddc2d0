"""Shared fixtures: a random-init tiny BERT and tiny Llama saved like Hub models, and AG News folders."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
import torch
from huggingface_hub import constants as hub
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from qlora_tutorial.data import LABEL_NAMES, SPLIT_FILES, load_ag_news
from qlora_tutorial.errors import MissingInputError
from qlora_tutorial.settings import DATA_DIR_ENV, Settings, load_settings
from qlora_tutorial.sources import packaged_minilm_dir, packaged_smollm2_gguf

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "ag_news"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test starts from no profile or model override, with runs kept in its own folder."""
    for name in ("QLORA_PROFILE", "QLORA_MODEL", "QLORA_DECODER_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QLORA_RUNS_DIR", str(tmp_path / "runs"))


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection (never in offline mode); downloads nothing."""
    if hub.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(hub.ENDPOINT)
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def holds_ag_news(folder: Path) -> bool:
    return all((folder / file).is_file() for file in SPLIT_FILES.values())


@pytest.fixture(scope="session")
def ag_news_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AG News as a folder of parquet files: QLORA_DATA_DIR, else ../shared/data/ag_news, else a copy of the Hub's.

    CI keeps the offline folder. A contributor with neither folder but with Hub
    access gets the Hub's splits, saved once per session; with no Hub either,
    the tests that need real data are skipped, saying what to set.
    """
    configured = os.environ.get(DATA_DIR_ENV)
    folder = Path(configured) if configured else SHARED_DATA
    if holds_ag_news(folder):
        return folder
    if configured:
        pytest.fail(
            f"{DATA_DIR_ENV}={configured} holds no train.parquet and test.parquet. Point it at the offline "
            f"AG News folder, or unset it to use {SHARED_DATA} or the Hugging Face Hub."
        )
    if not hub_reachable():
        pytest.skip(
            f"No AG News data: {SHARED_DATA} does not exist and the Hugging Face Hub cannot be reached. "
            f"Set {DATA_DIR_ENV} to a folder with train.parquet and test.parquet, or run with Hub access."
        )
    copy = tmp_path_factory.mktemp("ag_news_from_hub")
    for name, split in load_ag_news(None).items():
        split.to_parquet(copy / SPLIT_FILES[name])
    return copy


def tiny_texts(rows: int) -> pd.DataFrame:
    """A small AG-News-shaped frame: one clearly worded headline per class, repeated."""
    headlines = (
        "Leaders meet at the United Nations to discuss the border war",
        "The striker scored twice as the team won the league final",
        "Shares fell as the bank reported lower quarterly profit",
        "Researchers released new software for faster computer chips",
    )
    return pd.DataFrame(
        {"text": [f"{headlines[i % 4]} {i}" for i in range(rows)], "label": [i % 4 for i in range(rows)]}
    )


@pytest.fixture
def tiny_data_dir(tmp_path: Path) -> Path:
    """A folder with small train/test parquet files in the Hub schema."""
    folder = tmp_path / "ag_news_tiny"
    folder.mkdir()
    tiny_texts(200).to_parquet(folder / "train.parquet")
    tiny_texts(40).to_parquet(folder / "test.parquet")
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer, 64-wide BERT classifier with MiniLM's tokenizer, saved as safetensors."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=len(LABEL_NAMES),
    )
    BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(packaged_minilm_dir()).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_settings(monkeypatch: pytest.MonkeyPatch, tiny_bert_dir: Path, tiny_data_dir: Path) -> Settings:
    """Smoke-profile settings on the tiny BERT and the tiny data."""
    monkeypatch.setenv("QLORA_MODEL", str(tiny_bert_dir))
    return load_settings("smoke", data_dir=tiny_data_dir)


def fake_cuda(monkeypatch: pytest.MonkeyPatch, name: str, capability: tuple[int, int]) -> None:
    """Make ``torch.cuda`` answer as the named GPU does, on a machine without one.

    ``is_bf16_supported`` answers the way torch 2.13's does: True at compute
    capability 8.0 or higher, and below that True by default (a bf16 tensor can
    be made, so emulation counts) and False only with ``including_emulation=False``.
    """
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability >= (8, 0) or including_emulation
    )


@pytest.fixture
def fake_t4(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA faked as Colab's Tesla T4 (compute capability 7.5: bf16 only emulated)."""
    fake_cuda(monkeypatch, "Tesla T4", (7, 5))


@pytest.fixture
def fake_a100(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA faked as an NVIDIA A100 (compute capability 8.0: native bf16)."""
    fake_cuda(monkeypatch, "NVIDIA A100-SXM4-40GB", (8, 0))


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer and chat template, read once from the packaged GGUF file and saved."""
    try:
        gguf_path = packaged_smollm2_gguf()
    except MissingInputError as error:
        pytest.skip(f"The decoder tests need SmolLM2's tokenizer: {error}")
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def decoder_tokenizer(smollm2_tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer (49,152 tokens, with its chat template), shared: tests must not change it."""
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, decoder_tokenizer: PreTrainedTokenizerBase) -> Path:
    """A randomly initialised 2-layer, 32-wide Llama with SmolLM2's tokenizer, saved as safetensors.

    Its weights are drawn ten times wider than a Llama's default, so its
    next-token scores differ clearly from token to token (the default gives
    near-uniform ones, against which a scoring test could not fail).
    """
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(decoder_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=decoder_tokenizer.bos_token_id,
        eos_token_id=decoder_tokenizer.eos_token_id,
        pad_token_id=decoder_tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    decoder_tokenizer.save_pretrained(folder)
    return folder
