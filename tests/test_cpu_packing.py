"""The guard against bitsandbytes' AVX512-BF16 CPU repacking (``qlora_tutorial.cpu_packing``).

Every test runs on a CPU that repacks: the real one where bitsandbytes reports
AVX512-BF16, elsewhere one simulated by letting every new ``Linear4bit`` believe
it has the flag, so its eval-mode forward calls bitsandbytes' own repacking
function. Each invariant is checked with the guard (it must hold) and, as a
control, without it (it must break), so the simulation is shown to bite on
every machine that runs these tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from peft import PeftModel

import qlora_tutorial.cpu_packing as cpu_packing
import qlora_tutorial.modeling as modeling
from qlora_tutorial import doctor
from qlora_tutorial.cpu_packing import (
    PackedWeightsError,
    bitsandbytes_packs_here,
    cpu_lists_avx512_bf16,
    is_packed_for_cpu,
    keep_standard_layout,
    linear4bit_layers,
    repack_for_cpu,
    standard_layout_kept,
)
from qlora_tutorial.inference import load_requantized, load_trained, merge_into_4bit, save_merged
from qlora_tutorial.modeling import attach_lora, load_classifier, load_tokenizer
from qlora_tutorial.settings import Settings

HEADLINES = ["Stocks rallied after the central bank held rates.", "The striker scored twice in the final."]


@pytest.fixture(autouse=True)
def packing_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make unguarded 4-bit layers repack in eval passes, for real or through bitsandbytes' repacking function."""
    if not bitsandbytes_packs_here():
        monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)


@pytest.fixture(params=["guarded", "unguarded"])
def guarded(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a test with the series' guard, and once with it removed from every loader (the control)."""
    if request.param == "unguarded":
        monkeypatch.setattr(modeling, "keep_standard_layout", lambda model: model)
    return request.param == "guarded"


def inputs(settings: Settings) -> dict[str, torch.Tensor]:
    return dict(load_tokenizer(settings)(HEADLINES, padding=True, return_tensors="pt"))


def eval_pass(model: torch.nn.Module, settings: Settings) -> None:
    """What the Trainer's evaluation does between epochs: eval mode, no gradients."""
    model.eval()
    with torch.no_grad():
        model(**inputs(settings))


def layer0_adapters(model: PeftModel) -> dict[str, torch.nn.Module]:
    attention = model.base_model.model.bert.encoder.layer[0].attention.self
    return {name: getattr(attention, name) for name in ("query", "value")}


def make_lora_b_nonzero(model: PeftModel) -> None:
    """``B`` starts at zero, which zeroes ``A``'s gradient even on an intact path; give it fixed values."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def dequantized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    weights = {}
    for name, layer in model.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            weights[name] = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()
    return weights


def layer0_gradients(settings: Settings, with_eval_pass: bool) -> dict[str, torch.Tensor | None]:
    """The layer-0 adapter gradients of one training step (same model, batch and dropout masks every call)."""
    model = attach_lora(load_classifier(settings, "nf4-dq"))
    make_lora_b_nonzero(model)
    if with_eval_pass:
        eval_pass(model, settings)
    model.train()
    torch.manual_seed(0)
    model(**inputs(settings), labels=torch.tensor([2, 1])).loss.backward()
    return {
        f"{name}.{matrix}": getattr(layer, matrix)["default"].weight.grad
        for name, layer in layer0_adapters(model).items()
        for matrix in ("lora_A", "lora_B")
    }


def adapters_train_after_eval(settings: Settings) -> bool:
    """Every layer-0 adapter gets a gradient after an eval pass, non-zero, and the one it gets without the pass."""
    reference = layer0_gradients(settings, with_eval_pass=False)
    try:
        after_eval = layer0_gradients(settings, with_eval_pass=True)
    except RuntimeError:  # on AVX512-BF16 CPUs: an in-place error on a view of a leaf, from the packed kernel
        return False
    reached = all(grad is not None and grad.abs().sum() > 0 for grad in after_eval.values())
    return reached and all(torch.allclose(after_eval[name], reference[name]) for name in reference)


def weights_survive_eval(settings: Settings) -> bool:
    model = load_classifier(settings, "nf4-dq")
    before = dequantized(model)
    eval_pass(model, settings)
    after = dequantized(model)
    nested = all(layer.weight.quant_state.nested for layer in linear4bit_layers(model))
    return nested and all(torch.equal(before[name], after[name]) for name in before)


def merged_weights(settings: Settings, with_eval_pass: bool) -> dict[str, torch.Tensor]:
    model = attach_lora(load_classifier(settings, "nf4-dq"))
    make_lora_b_nonzero(model)
    if with_eval_pass:
        eval_pass(model, settings)
    return dequantized(model.merge_and_unload())


def merge_unchanged_by_eval(settings: Settings) -> bool:
    before, after = merged_weights(settings, False), merged_weights(settings, True)
    return all(torch.equal(before[name], after[name]) for name in before)


INVARIANTS: dict[str, Callable[[Settings], bool]] = {
    "adapters train after an eval pass": adapters_train_after_eval,
    "weights and nested state survive an eval pass": weights_survive_eval,
    "a merge after an eval pass equals one before": merge_unchanged_by_eval,
}


@pytest.mark.parametrize("invariant", INVARIANTS, ids=lambda name: name.replace(" ", "-"))
def test_invariant_holds_only_with_the_guard(invariant: str, guarded: bool, tiny_settings: Settings) -> None:
    assert INVARIANTS[invariant](tiny_settings) is guarded


def test_every_loading_path_leaves_the_guard_on(tiny_settings: Settings, tmp_path: Path) -> None:
    loaded = {precision: load_classifier(tiny_settings, precision) for precision in ("fp4", "nf4", "nf4-dq")}
    adapted = attach_lora(loaded["nf4-dq"])
    adapted.save_pretrained(tmp_path / "adapter")
    load_tokenizer(tiny_settings).save_pretrained(tmp_path / "adapter")
    reloaded = load_trained(tiny_settings, tmp_path / "adapter")
    merged = merge_into_4bit(tiny_settings, tmp_path / "adapter")
    merged_full = load_trained(tiny_settings, tmp_path / "adapter", "fp32").merge_and_unload()
    requantized = load_requantized(
        tiny_settings, save_merged(merged_full, load_tokenizer(tiny_settings), tmp_path / "merged")
    )
    models = {**loaded, "attach_lora": adapted, "load_trained": reloaded, "merge_into_4bit": merged}
    models["load_requantized"] = requantized
    for name, model in models.items():
        assert linear4bit_layers(model), f"{name}: no 4-bit layers to guard"
        eval_pass(model, tiny_settings)
        assert standard_layout_kept(model), f"{name}: a 4-bit layer can still repack"


def test_repack_for_cpu_reproduces_the_mutation(tiny_settings: Settings) -> None:
    layer = linear4bit_layers(load_classifier(tiny_settings, "nf4-dq"))[0]
    original = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()
    repack_for_cpu(layer)
    state = layer.weight.quant_state
    assert is_packed_for_cpu(layer)
    assert not state.nested and not hasattr(state, "state2")
    assert state.absmax.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    assert not torch.equal(bnbf.dequantize_4bit(layer.weight.data, state), original)


def test_guard_refuses_a_model_already_repacked(tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modeling, "keep_standard_layout", lambda model: model)
    model = load_classifier(tiny_settings, "nf4")
    repack_for_cpu(linear4bit_layers(model)[0])
    with pytest.raises(PackedWeightsError, match="Reload the model"):
        keep_standard_layout(model)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [("flags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n", True), ("flags\t\t: fpu sse avx2 avx512f\n", False)],
)
def test_cpu_flag_is_read_from_cpuinfo(tmp_path: Path, flags: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: a CPU that mentions avx512_bf16 in its name\n" + flags)
    assert cpu_lists_avx512_bf16(cpuinfo) is expected


def test_no_cpuinfo_means_no_flag(tmp_path: Path) -> None:
    assert cpu_lists_avx512_bf16(tmp_path / "missing") is False


def test_doctor_reports_the_flag_and_the_guard() -> None:
    check = doctor.cpu_packing_check()
    assert check.ok and "guard active" in check.found
    assert ("avx512_bf16 listed" in check.found) is cpu_lists_avx512_bf16()


def test_doctor_fails_when_the_guard_does_not_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_packing, "keep_standard_layout", lambda layer: layer)
    check = doctor.cpu_packing_check()
    assert not check.ok and "NOT holding" in check.found


def test_guard_covers_a_quantized_head_that_never_got_a_state(tiny_settings: Settings) -> None:
    trapped = load_classifier(tiny_settings, "nf4", skip_modules=None)  # the classifier-head trap of notebook 02
    assert not is_packed_for_cpu(trapped.classifier)
    assert standard_layout_kept(trapped)
