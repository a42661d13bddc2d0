"""AG News: loading, the train/validation/test split, tokenization.

Taught in notebook 04. The data comes from a local folder of parquet files in
the Hub schema (``QLORA_DATA_DIR``) or from the Hugging Face Hub
(``fancyzhx/ag_news``). The official training split is sampled and split
80/20 into train and validation with a fixed seed; the official test split is
kept apart for the final evaluation.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset
from sklearn.model_selection import train_test_split
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from qlora_tutorial.settings import Settings
from qlora_tutorial.sources import HUB_DATASET

LABEL_NAMES: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")
REQUIRED_COLUMNS = ("text", "label")
SPLIT_FILES = {"train": "train.parquet", "test": "test.parquet"}


def id2label() -> dict[int, str]:
    """Label ids to names, as a model config wants them."""
    return dict(enumerate(LABEL_NAMES))


def label2id() -> dict[str, int]:
    """Label names to ids, as a model config wants them."""
    return {name: index for index, name in enumerate(LABEL_NAMES)}


def check_schema(dataset: Dataset, origin: str) -> None:
    """Raise a clear error unless ``dataset`` has a ``text`` and a ``label`` 0 to 3 column."""
    missing = [column for column in REQUIRED_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{origin} lacks the column(s) {missing}; it has {dataset.column_names}. "
            "AG News files need a string column `text` and an integer column `label` (0 to 3), "
            "as in the Hub dataset fancyzhx/ag_news."
        )
    labels = set(dataset.unique("label"))
    unexpected = labels - set(range(len(LABEL_NAMES)))
    if unexpected:
        raise ValueError(
            f"{origin} has labels {sorted(unexpected)} outside 0 to 3. "
            f"Map them to 0 {LABEL_NAMES[0]}, 1 {LABEL_NAMES[1]}, 2 {LABEL_NAMES[2]}, 3 {LABEL_NAMES[3]}."
        )


def load_ag_news(data_dir: Path | None) -> DatasetDict:
    """Load the official ``train`` and ``test`` splits, from a folder or the Hub."""
    if data_dir is None:
        raw = load_dataset(HUB_DATASET)
        origin = f"the Hub dataset {HUB_DATASET}"
        splits = DatasetDict({name: raw[name] for name in SPLIT_FILES})
    else:
        paths = {name: Path(data_dir) / file for name, file in SPLIT_FILES.items()}
        absent = [str(path) for path in paths.values() if not path.is_file()]
        if absent:
            raise FileNotFoundError(
                f"Missing {', '.join(absent)}. QLORA_DATA_DIR must name a folder holding "
                "train.parquet and test.parquet (text, label); unset it to use the Hub."
            )
        splits = DatasetDict({name: Dataset.from_parquet(str(path)) for name, path in paths.items()})
        origin = str(data_dir)
    for name, split in splits.items():
        check_schema(split, f"The {name} split of {origin}")
    return DatasetDict({name: split.select_columns(list(REQUIRED_COLUMNS)) for name, split in splits.items()})


def stratified_indices(labels: np.ndarray, rows: int | None, seed: int) -> np.ndarray:
    """Indices of a class-balanced random sample of ``rows`` labels (all of them, shuffled, if None)."""
    everything = np.random.default_rng(seed).permutation(len(labels))
    if rows is None or rows >= len(labels):
        return everything
    chosen, _ = train_test_split(everything, train_size=rows, stratify=labels[everything], random_state=seed)
    return np.asarray(chosen)


def make_splits(raw: DatasetDict, settings: Settings) -> DatasetDict:
    """Sample the profile's rows and split train 80/20 into train/validation, stratified, seeded.

    The official test split is only sampled (for the smoke profile), never
    mixed with training data.
    """
    profile = settings.profile
    train_labels = np.asarray(raw["train"]["label"])
    pool = stratified_indices(train_labels, profile.train_pool_rows, profile.seed)
    train_idx, validation_idx = train_test_split(
        pool,
        test_size=profile.validation_fraction,
        stratify=train_labels[pool],
        random_state=profile.seed,
    )
    test_idx = stratified_indices(np.asarray(raw["test"]["label"]), profile.test_rows, profile.seed)
    return DatasetDict(
        train=raw["train"].select(train_idx),
        validation=raw["train"].select(validation_idx),
        test=raw["test"].select(np.sort(test_idx)),
    )


def load_splits(settings: Settings) -> DatasetDict:
    """The profile's train, validation and test splits (untokenized)."""
    return make_splits(load_ag_news(settings.data_dir), settings)


def class_balance(splits: DatasetDict) -> dict[str, dict[str, int]]:
    """Rows per class name in each split."""
    return {
        name: {LABEL_NAMES[label]: count for label, count in sorted(Counter(split["label"]).items())}
        for name, split in splits.items()
    }


def tokenize_splits(
    splits: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    pad_to_max_length: bool = False,
) -> DatasetDict:
    """Tokenize with truncation at ``max_length``; ``label`` becomes ``labels``.

    No padding here by default: the collator pads each batch to its own
    longest text (dynamic padding). ``pad_to_max_length`` pads every row to
    ``max_length`` instead, to show what that costs (notebook 04).
    """
    padding = "max_length" if pad_to_max_length else False

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, max_length=max_length, padding=padding)

    encoded = splits.map(encode, batched=True, remove_columns=["text"], desc="Tokenizing")
    return encoded.rename_column("label", "labels")


def make_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorWithPadding:
    """Pads each batch to its longest sequence (dynamic padding)."""
    return DataCollatorWithPadding(tokenizer=tokenizer)
