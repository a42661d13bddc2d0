"""AG News: loading, the train/validation/test split, tokenization.

Taught in notebook 04. The data comes from a local folder of parquet files in
the Hub schema (``QLORA_DATA_DIR``) or from the Hugging Face Hub
(``fancyzhx/ag_news``). The official training split is sampled and split
80/20 into train and validation with a fixed seed; the official test split is
kept apart for the final evaluation.

Every check a local data folder needs runs here, before any model loads, and
fails with a ``UserInputError`` that names the file and says what to fix:
files that are not parquet, empty splits, wrong columns or types, missing
texts or labels, labels outside 0 to 3, too few rows to split by class.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, load_dataset
from sklearn.model_selection import train_test_split
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from qlora_tutorial.errors import MissingInputError, UserInputError
from qlora_tutorial.settings import DATA_DIR_ENV, Settings
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


def label_help() -> str:
    """How the four label ids map to names, for error messages."""
    return ", ".join(f"{index} {name}" for index, name in enumerate(LABEL_NAMES))


def describe_column(kind: pa.DataType) -> str:
    """What a column holds, in words: ``strings`` or e.g. ``double values``."""
    return "strings" if pa.types.is_string(kind) or pa.types.is_large_string(kind) else f"{kind} values"


def check_schema(data: Dataset | pa.Table, origin: str) -> None:
    """Raise a ``UserInputError`` unless ``data`` has a string ``text`` and an integer ``label`` 0 to 3, no nulls.

    Checked on the Arrow table, so a local file is checked before ``datasets``
    prepares it (and prints its progress bars).
    """
    table = data.data.table if isinstance(data, Dataset) else data
    missing = [column for column in REQUIRED_COLUMNS if column not in table.column_names]
    if missing:
        raise UserInputError(
            f"{origin} lacks the column(s) {missing}; it has {table.column_names}. "
            "AG News files need a string column `text` and an integer column `label` (0 to 3), "
            "as in the Hub dataset fancyzhx/ag_news."
        )
    text, label = table.column("text"), table.column("label")
    if describe_column(text.type) != "strings":
        raise UserInputError(
            f"{origin} has a `text` column of {describe_column(text.type)}; it must hold strings (the news texts)."
        )
    if not pa.types.is_integer(label.type):
        raise UserInputError(
            f"{origin} has a `label` column of {describe_column(label.type)}; it must hold integers 0 to 3. "
            f"Map the labels to {label_help()}."
        )
    for name, column in (("text", text), ("label", label)):
        if column.null_count:
            raise UserInputError(
                f"{origin} has {column.null_count} empty (null) value(s) in `{name}`. Drop those rows or fill them in."
            )
    unexpected = set(label.unique().to_pylist()) - set(range(len(LABEL_NAMES)))
    if unexpected:
        raise UserInputError(f"{origin} has labels {sorted(unexpected)} outside 0 to 3. Map them to {label_help()}.")


def read_split(path: Path, origin: str) -> Dataset:
    """One split from a parquet file, checked first: it must open, have rows and the right columns.

    The checks run on the file itself because ``datasets`` reports an empty or
    unreadable file only as "An error occurred while generating the dataset".
    """
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise UserInputError(
            f"{path} is not a readable parquet file ({error}). Write it again, e.g. with pandas: "
            "`DataFrame.to_parquet(path)` with columns `text` and `label`."
        ) from None
    if table.num_rows == 0:
        raise UserInputError(f"{path} has no rows. Fill it with AG News rows (`text`, `label` 0 to 3).")
    check_schema(table, origin)
    return Dataset.from_parquet(str(path))


def missing_files_message(absent: list[Path]) -> str:
    """What to do about split files that are not in the data folder (a CSV in their place gets its own hint)."""
    message = (
        f"Missing {', '.join(str(path) for path in absent)}. {DATA_DIR_ENV} must name a folder holding "
        "train.parquet and test.parquet (text, label); unset it to use the Hub."
    )
    csv = [path.with_suffix(".csv") for path in absent if path.with_suffix(".csv").is_file()]
    if csv:
        message += (
            f" Found {', '.join(path.name for path in csv)} instead: convert each with "
            "`pandas.read_csv(csv_path).to_parquet(parquet_path)`."
        )
    return message


def data_origin(data_dir: Path | None) -> str:
    """Where the data comes from, as error messages name it."""
    return str(data_dir) if data_dir is not None else f"the Hub dataset {HUB_DATASET}"


def load_ag_news(data_dir: Path | None) -> DatasetDict:
    """Load the official ``train`` and ``test`` splits, from a folder or the Hub, and check them."""
    origins = {name: f"The {name} split of {data_origin(data_dir)}" for name in SPLIT_FILES}
    if data_dir is None:
        raw = load_dataset(HUB_DATASET)
        splits = DatasetDict({name: raw[name] for name in SPLIT_FILES})
        for name, split in splits.items():
            check_schema(split, origins[name])
    else:
        paths = {name: Path(data_dir) / file for name, file in SPLIT_FILES.items()}
        absent = [path for path in paths.values() if not path.is_file()]
        if absent:
            raise MissingInputError(missing_files_message(absent))
        splits = DatasetDict({name: read_split(path, origins[name]) for name, path in paths.items()})
    return DatasetDict({name: split.select_columns(list(REQUIRED_COLUMNS)) for name, split in splits.items()})


def stratified_split(
    indices: np.ndarray, labels: np.ndarray, seed: int, what: str, **sizes: float | int
) -> tuple[np.ndarray, np.ndarray]:
    """``train_test_split`` of ``indices`` stratified by ``labels``; too few rows per label is the user's to fix.

    ``sizes`` is ``train_size`` or ``test_size``; ``what`` names the split in the message.
    """
    try:
        first, second = train_test_split(indices, stratify=labels, random_state=seed, **sizes)
    except ValueError as error:  # scikit-learn refuses a stratified split with too few rows per label
        counts = {int(label): count for label, count in sorted(Counter(labels.tolist()).items())}
        raise UserInputError(
            f"{what} has too few rows to split by label: {len(indices)} rows, per label {counts} "
            f"(scikit-learn: {error}). Give every label more rows, e.g. the full AG News files."
        ) from None
    return np.asarray(first), np.asarray(second)


def stratified_indices(labels: np.ndarray, rows: int | None, seed: int, what: str = "The data") -> np.ndarray:
    """Indices of a class-balanced random sample of ``rows`` labels (all of them, shuffled, if None)."""
    everything = np.random.default_rng(seed).permutation(len(labels))
    if rows is None or rows >= len(labels):
        return everything
    chosen, _ = stratified_split(everything, labels[everything], seed, what, train_size=rows)
    return chosen


def make_splits(raw: DatasetDict, settings: Settings) -> DatasetDict:
    """Sample the profile's rows and split train 80/20 into train/validation, stratified, seeded.

    The official test split is only sampled (for the smoke profile), never
    mixed with training data.
    """
    profile = settings.profile
    train, test = (f"The {name} split of {data_origin(settings.data_dir)}" for name in ("train", "test"))
    train_labels = np.asarray(raw["train"]["label"])
    pool = stratified_indices(train_labels, profile.train_pool_rows, profile.seed, train)
    train_idx, validation_idx = stratified_split(
        pool, train_labels[pool], profile.seed, train, test_size=profile.validation_fraction
    )
    test_idx = stratified_indices(np.asarray(raw["test"]["label"]), profile.test_rows, profile.seed, test)
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


def shortest_first(dataset: Dataset) -> tuple[Dataset, np.ndarray]:
    """The tokenized rows sorted by length, and the order that sorted them (``dataset.select(order)``).

    Evaluation batches are drawn in order, and dynamic padding pads each to its
    longest row: sorted, a batch holds rows of similar length, so it pads
    little. On AG News this halves the time of a pass over the test split on a
    CPU (notebook 04). The order maps predictions back to the dataset's rows.
    """
    order = np.argsort([len(ids) for ids in dataset["input_ids"]], kind="stable")
    return dataset.select(order), order


def make_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorWithPadding:
    """Pads each batch to its longest sequence (dynamic padding)."""
    return DataCollatorWithPadding(tokenizer=tokenizer)
