import pytest

from qlora_tutorial.errors import UserInputError
from qlora_tutorial.estimator import GPUS, RunSpec, estimate_peak
from qlora_tutorial.gpu_fits import QUESTION_GPUS, ROW_COLUMNS, fits_table, format_fits_table
from qlora_tutorial.shapes import get_decoder_shape


@pytest.fixture(scope="module")
def table():
    return fits_table()


def test_the_table_answers_every_combination_of_the_question(table):
    assert list(table.columns) == [*ROW_COLUMNS, *QUESTION_GPUS]
    assert len(table) == 3 * 3 * 2 * 3  # shapes x methods x checkpointing x sequence lengths
    assert set(table["shape"]) == {"llama-3-8b", "mistral-7b", "qwen2.5-7b"}


def test_each_row_is_the_estimators_gpu_prediction(table):
    row = table[(table["shape"] == "mistral-7b") & (table["method"] == "qlora") & table["checkpointing"]]
    row = row[row["seq_len"] == 1024].iloc[0]
    spec = RunSpec(get_decoder_shape("mistral-7b"), "qlora", seq_len=1024, compute_dtype="bf16", device="cuda")
    assert row["predicted_gib"] == estimate_peak(spec).total_gib
    assert row["T4"] == (row["predicted_gib"] <= 0.9 * GPUS["T4"].usable_gib)


def test_bigger_cards_fit_whatever_smaller_ones_fit(table):
    assert (table["T4"] <= table["A100 40GB"]).all() and (table["A100 40GB"] <= table["A100 80GB"]).all()
    full = table[table["method"] == "full"]
    assert not full["A100 80GB"].any()  # fp32 weights, gradients and AdamW: 16+ bytes per parameter
    qlora = table[(table["method"] == "qlora") & table["checkpointing"] & (table["seq_len"] == 512)]
    assert qlora["T4"].all()


def test_checkpointing_and_shorter_sequences_never_cost_memory(table):
    for _, group in table.groupby(["shape", "method", "checkpointing"]):
        assert group["predicted_gib"].is_monotonic_increasing
    on = table[table["checkpointing"]].reset_index(drop=True)
    off = table[~table["checkpointing"]].reset_index(drop=True)
    assert (on["predicted_gib"] <= off["predicted_gib"]).all()


def test_the_text_has_a_line_per_shape_method_and_checkpointing(table):
    text = format_fits_table(table)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["shape", "method", "ckpt"] and "seq 2048" in lines[0]
    assert len(lines) == 2 + 3 * 3 * 2 + 1
    assert lines[-1].endswith("T4, A100 40GB, A100 80GB it fits)")
    assert any(line.startswith("llama-3-8b   full") and line.count("none") == 3 for line in lines)


def test_a_batch_argument_scales_the_activations():
    one, two = (fits_table(["mistral-7b"], ["T4"], [512], ["qlora"], [False], batch_size=b) for b in (1, 2))
    assert two["predicted_gib"].iloc[0] > one["predicted_gib"].iloc[0]


def test_unknown_names_and_empty_lists_are_refused():
    with pytest.raises(UserInputError, match="Unknown GPU 'K80'"):
        fits_table(gpus=["K80"])
    with pytest.raises(UserInputError, match="Unknown shape 'gpt-2'"):
        fits_table(shapes=["gpt-2"])
    with pytest.raises(UserInputError, match="Unknown method 'dora'"):
        fits_table(methods=["dora"])
    with pytest.raises(UserInputError, match="at least one sequence length"):
        fits_table(seq_lens=[])
    with pytest.raises(UserInputError, match="seq_len must be at least 1"):
        fits_table(seq_lens=[0])
