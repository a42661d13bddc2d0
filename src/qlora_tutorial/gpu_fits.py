"""Which 7B-8B models fit which GPU for fine-tuning: the estimator's answer as a table.

Taught in notebook 09, after the estimator has been checked against this
machine's measured runs. Every row is a prediction, not a measurement: the
estimator's parts on a GPU (``estimator.estimate_peak`` with ``device="cuda"``:
allocated bytes plus the CUDA context), compared with what CUDA reports for the
card (``estimator.GPUS``), leaving ``margin`` of it free for the caching
allocator's fragmentation. QLoRA and 16-bit LoRA compute in bf16 (fp16 on a T4,
which costs the same bytes); full fine-tuning keeps fp32 weights and AdamW.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from qlora_tutorial.errors import UserInputError
from qlora_tutorial.estimator import METHODS, RunSpec, check_fits, estimate_peak, get_gpu
from qlora_tutorial.shapes import get_decoder_shape

QUESTION_SHAPES = ("llama-3-8b", "mistral-7b", "qwen2.5-7b")
QUESTION_GPUS = ("T4", "A100 40GB", "A100 80GB")
QUESTION_SEQ_LENS = (512, 1024, 2048)
QUESTION_METHODS = ("qlora", "lora-bf16", "full")
GPU_COMPUTE = {"full": "fp32", "lora-bf16": "bf16", "lora-fp32": "fp32", "qlora": "bf16"}
ROW_COLUMNS = ("shape", "method", "checkpointing", "seq_len", "batch_size", "predicted_gib")  # then one per GPU


def fits_table(
    shapes: Sequence[str] = QUESTION_SHAPES,
    gpus: Sequence[str] = QUESTION_GPUS,
    seq_lens: Sequence[int] = QUESTION_SEQ_LENS,
    methods: Sequence[str] = QUESTION_METHODS,
    checkpointing: Sequence[bool] = (True, False),
    batch_size: int = 1,
    lora_r: int = 16,
    margin: float = 0.10,
) -> pd.DataFrame:
    """One row per shape, method, checkpointing and sequence length: the predicted GiB, and whether it fits.

    One boolean column per GPU (named as in ``estimator.GPUS``) after ``ROW_COLUMNS``.
    """
    if not seq_lens:
        raise UserInputError("Give at least one sequence length.")
    cards = [get_gpu(name) for name in gpus]
    rows = []
    for name in shapes:
        shape = get_decoder_shape(name)
        for method in methods:
            if method not in METHODS:
                raise UserInputError(f"Unknown method {method!r}. Known methods: {', '.join(METHODS)}.")
            for checkpoint in checkpointing:
                for seq_len in seq_lens:
                    spec = RunSpec(
                        shape, method, batch_size, seq_len, checkpoint, GPU_COMPUTE[method], lora_r, device="cuda"
                    )
                    estimate = estimate_peak(spec)
                    row = {
                        "shape": shape.name,
                        "method": method,
                        "checkpointing": checkpoint,
                        "seq_len": seq_len,
                        "batch_size": batch_size,
                        "predicted_gib": estimate.total_gib,
                    }
                    row.update({card.name: check_fits(estimate, card.usable_bytes, margin).fits for card in cards})
                    rows.append(row)
    return pd.DataFrame(rows)


def format_fits_table(table: pd.DataFrame) -> str:
    """The table as text, a line per shape, method and checkpointing.

    Per sequence length: the predicted GiB and the first of the table's GPUs (smallest first) that fits it.
    """
    gpus = [column for column in table.columns if column not in ROW_COLUMNS]
    seq_lens = sorted(table["seq_len"].unique())
    header = f"{'shape':<12} {'method':<10} {'ckpt':<4} " + " ".join(f"{f'seq {n}':<20}" for n in seq_lens)
    lines = [header, "-" * len(header)]
    for (shape, method, checkpoint), group in table.groupby(["shape", "method", "checkpointing"], sort=False):
        cells = []
        for seq_len in seq_lens:
            row = group[group["seq_len"] == seq_len].iloc[0]
            smallest = next((gpu for gpu in gpus if row[gpu]), "none")
            cells.append(f"{row.predicted_gib:5.1f} GiB {smallest:<10}")
        lines.append(f"{shape:<12} {method:<10} {'on' if checkpoint else 'off':<4} " + " ".join(cells))
    lines.append(f"(GiB predicted; then the first of {', '.join(gpus)} it fits)")
    return "\n".join(lines)
