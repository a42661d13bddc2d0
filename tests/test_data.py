from collections import Counter

import numpy as np
import pandas as pd
import pytest
from datasets import ClassLabel, Dataset, Features, Value

from qlora_tutorial.data import (
    LABEL_NAMES,
    check_schema,
    class_balance,
    load_ag_news,
    load_splits,
    make_collator,
    shortest_first,
    stratified_indices,
    tokenize_splits,
)
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.modeling import load_tokenizer
from qlora_tutorial.settings import load_settings


def test_offline_sample_loads_with_the_hub_schema(ag_news_dir):
    raw = load_ag_news(ag_news_dir)
    assert set(raw) == {"train", "test"}
    assert raw["train"].column_names == ["text", "label"]
    assert len(raw["test"]) == 7600


def test_cpu_profile_splits_are_stratified_disjoint_and_full_test(ag_news_dir):
    splits = load_splits(load_settings("cpu", data_dir=ag_news_dir))
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (3200, 800, 7600)
    assert not set(splits["train"]["text"]) & set(splits["validation"]["text"])
    for name in ("train", "validation"):
        counts = Counter(splits[name]["label"])
        assert max(counts.values()) - min(counts.values()) <= 0.05 * len(splits[name])


def test_splits_are_reproducible(ag_news_dir):
    chosen = load_settings("smoke", data_dir=ag_news_dir)
    first, second = load_splits(chosen), load_splits(chosen)
    assert first["train"]["text"] == second["train"]["text"]
    assert len(first["train"]) == 320 and len(first["validation"]) == 80 and len(first["test"]) == 200


def test_stratified_sample_keeps_classes_balanced():
    labels = np.array([0] * 700 + [1] * 100 + [2] * 100 + [3] * 100)
    chosen = stratified_indices(labels, 100, seed=0)
    assert len(chosen) == 100 and len(set(chosen)) == 100
    assert Counter(labels[chosen]) == {0: 70, 1: 10, 2: 10, 3: 10}
    assert sorted(stratified_indices(labels, None, seed=0)) == list(range(1000))


def test_missing_file_names_it(tmp_path):
    pd.DataFrame({"text": ["a"], "label": [0]}).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(FileNotFoundError, match=r"test\.parquet.*QLORA_DATA_DIR must name a folder"):
        load_ag_news(tmp_path)


def test_wrong_columns_say_what_is_expected(tmp_path):
    for name in ("train", "test"):
        pd.DataFrame({"headline": ["a"], "topic": [0]}).to_parquet(tmp_path / f"{name}.parquet")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['text', 'label'\].*string column `text`"):
        load_ag_news(tmp_path)


def test_labels_out_of_range_are_refused():
    dataset = Dataset.from_dict({"text": ["a", "b"], "label": [0, 7]})
    with pytest.raises(UserInputError, match=r"labels \[7\] outside 0 to 3"):
        check_schema(dataset, "test data")


def test_the_hubs_named_labels_pass_the_check():
    """The Hub's `label` is a ClassLabel (integers with names): the path without QLORA_DATA_DIR must accept it."""
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(LABEL_NAMES))})
    check_schema(Dataset.from_dict({"text": ["a", "b"], "label": [0, 3]}, features=features), "the Hub data")


def test_too_few_rows_per_label_to_sample_names_the_split():
    labels = np.array([0, 0, 1, 2, 3, 3])
    with pytest.raises(UserInputError, match=r"^The test split of x has too few rows to split by label: 6 rows"):
        stratified_indices(labels, 2, seed=0, what="The test split of x")


def test_class_balance_uses_names(tiny_settings):
    balance = class_balance(load_splits(tiny_settings))
    assert set(balance) == {"train", "validation", "test"}
    assert list(balance["train"]) == list(LABEL_NAMES)


def test_tokenization_truncates_renames_and_pads_dynamically(tiny_settings):
    tokenizer = load_tokenizer(tiny_settings)
    splits = load_splits(tiny_settings)
    long_text = splits["train"].select(range(2)).map(lambda row: {"text": row["text"] + " word" * 300})
    tokenized = tokenize_splits(splits.__class__(train=long_text), tokenizer, max_length=16)
    assert "labels" in tokenized["train"].column_names and "text" not in tokenized["train"].column_names
    assert all(len(ids) == 16 for ids in tokenized["train"]["input_ids"])
    short = tokenize_splits(splits, tokenizer, max_length=128)["train"]
    batch = make_collator(tokenizer)([short[i] for i in range(4)])
    assert batch["input_ids"].shape[1] == max(len(short[i]["input_ids"]) for i in range(4)) < 128


def test_fixed_padding_pads_every_row(tiny_settings):
    tokenizer = load_tokenizer(tiny_settings)
    tokenized = tokenize_splits(load_splits(tiny_settings), tokenizer, max_length=128, pad_to_max_length=True)
    assert {len(ids) for ids in tokenized["train"]["input_ids"]} == {128}


def test_shortest_first_sorts_by_length_and_returns_the_order(tiny_settings):
    tokenized = tokenize_splits(load_splits(tiny_settings), load_tokenizer(tiny_settings), max_length=128)
    ordered, order = shortest_first(tokenized["test"])
    lengths = [len(ids) for ids in ordered["input_ids"]]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    assert sorted(order.tolist()) == list(range(len(tokenized["test"])))
    assert ordered["labels"] == [tokenized["test"]["labels"][i] for i in order]
