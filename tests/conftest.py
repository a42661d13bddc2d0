"""Shared fixtures: a random-init tiny BERT saved like a Hub model, and AG News folders."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from qlora_tutorial.data import LABEL_NAMES
from qlora_tutorial.settings import Settings, load_settings
from qlora_tutorial.sources import packaged_minilm_dir

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "ag_news"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test starts from no profile or model override, with runs kept in its own folder."""
    for name in ("QLORA_PROFILE", "QLORA_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QLORA_RUNS_DIR", str(tmp_path / "runs"))


@pytest.fixture(scope="session")
def ag_news_dir() -> Path:
    """The offline AG News sample (QLORA_DATA_DIR, else ../shared/data/ag_news)."""
    folder = Path(os.environ.get("QLORA_DATA_DIR", SHARED_DATA))
    if not (folder / "train.parquet").is_file():
        pytest.fail(f"No AG News sample at {folder}: set QLORA_DATA_DIR to the offline data folder.")
    return folder


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
