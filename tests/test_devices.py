"""One device for every model and batch: the placement, the batch helper, and a check of every load in the package.

A CPU-only machine cannot show a model split between the CPU and a GPU, so
the structure is tested instead: every ``from_pretrained`` of a model in
``src/qlora_tutorial`` names ``device_map`` (read from the source with ``ast``),
and ``model_device`` refuses a model whose weights sit on two devices (made
here with the ``meta`` device).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from transformers import BatchEncoding

from qlora_tutorial.devices import model_device, placement, to_model_device
from qlora_tutorial.settings import load_settings

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "qlora_tutorial"
NOT_MODELS = {
    "AutoTokenizer": "a tokenizer holds no weights",
    "AutoConfig": "a config holds no weights",
    "PeftModel": "loads an adapter into the base it wraps, whose parameters already sit on one device",
}


def receiver(call: ast.Call) -> str:
    """``AutoModel`` for ``AutoModel.from_pretrained(...)`` and for ``transformers.AutoModel.from_pretrained(...)``."""
    target = call.func.value  # type: ignore[attr-defined]
    if isinstance(target, ast.Name):
        return target.id
    return target.attr if isinstance(target, ast.Attribute) else ast.unparse(target)


def from_pretrained_calls() -> list[tuple[str, str, set[str]]]:
    """(file:line, receiver, keyword names) of every ``X.from_pretrained(...)`` call in the package."""
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_pretrained"
            ):
                keywords = {keyword.arg for keyword in node.keywords if keyword.arg}
                found.append((f"{path.name}:{node.lineno}", receiver(node), keywords))
    return found


def test_every_model_load_in_the_package_names_its_device():
    calls = from_pretrained_calls()
    assert any(
        where.startswith("modeling.py") and who == "AutoModelForSequenceClassification" for where, who, _ in calls
    )
    unplaced = [
        f"{where} {who}.from_pretrained"
        for where, who, keywords in calls
        if who not in NOT_MODELS and "device_map" not in keywords
    ]
    assert not unplaced, (
        f"these loads leave the device to transformers (pass device_map=placement(settings)): {unplaced}"
    )


def test_placement_puts_the_whole_model_on_the_settings_device():
    settings = load_settings("smoke")
    assert placement(settings) == {"": settings.device} == {"": "cpu"}


def test_model_device_is_the_one_device_of_all_parameters():
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


def test_a_model_on_two_devices_is_refused():
    split = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError, match=r"weights on several devices \(cpu, meta\).*device_map=.*placement"):
        model_device(split)


def test_a_model_without_parameters_has_no_device():
    with pytest.raises(ValueError, match="has no parameters"):
        model_device(torch.nn.ReLU())


def test_batches_of_every_kind_go_to_the_model_device():
    model = torch.nn.Linear(2, 2, device="meta")
    ids = torch.ones(1, 3, dtype=torch.long)
    assert to_model_device(ids, model).device.type == "meta"
    encoded = to_model_device(BatchEncoding({"input_ids": ids, "attention_mask": ids}), model)
    assert isinstance(encoded, BatchEncoding) and encoded["attention_mask"].device.type == "meta"
    moved = to_model_device({"input_ids": ids, "labels": [0]}, model)
    assert moved["input_ids"].device.type == "meta" and moved["labels"] == [0]
    assert to_model_device(ids, torch.device("meta")).device.type == "meta"


def test_a_batch_of_another_kind_is_refused():
    with pytest.raises(TypeError, match="pass a tensor, a tokenizer's output or a dict of tensors"):
        to_model_device([1, 2, 3], torch.nn.Linear(2, 2))  # type: ignore[arg-type]
