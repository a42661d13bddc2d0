from importlib.metadata import version

import pytest
import torch
from packaging.specifiers import SpecifierSet

from qlora_tutorial import doctor
from qlora_tutorial.doctor import Check, bitsandbytes_check, nf4_round_trip_error, report, run_checks, verdict


def test_nf4_round_trip_really_runs_on_the_cpu():
    error = nf4_round_trip_error("cpu")
    assert 0 < error < doctor.ROUND_TRIP_TOLERANCE


def test_a_failing_bitsandbytes_is_reported_not_raised(monkeypatch):
    def broken(device):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(doctor, "nf4_round_trip_error", broken)
    check = bitsandbytes_check("cpu")
    assert not check.ok and "no kernel for this device" in check.found


def test_verdict_names_what_failed():
    assert verdict([Check("a", "x", True)]).startswith("READY")
    assert verdict([Check("a", "x", True), Check("bf16", "y", False)]).startswith("NOT READY: bf16 failed")


def test_report_without_a_gpu_runs_4bit_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    checks = run_checks()
    names = [check.name for check in checks]
    assert {"torch", "transformers", "peft", "bitsandbytes", "CUDA", "bitsandbytes 4-bit", "profile"} <= set(names)
    text = report(checks)
    assert "not available: CPU only" in text and "cpu (float32 compute" in text
    assert "NF4 round trip on cpu" in text
    assert text.splitlines()[-2].startswith("READY")


def test_report_on_a_bf16_gpu_picks_the_gpu_profile(monkeypatch, fake_a100):
    """The GPU branch, on any machine: CUDA is faked, and so is the round trip that would run on it."""
    round_trips = []
    monkeypatch.setattr(doctor, "nf4_round_trip_error", lambda device: round_trips.append(device) or 0.09)
    text = report(run_checks())
    assert round_trips == ["cuda"]
    assert "NVIDIA A100" in text and "compute capability  8.0" in text
    assert "compute dtype       bfloat16: compute capability 8.0 has native bf16" in text
    assert "gpu (bfloat16 compute" in text


def test_report_on_a_t4_says_fp16_and_why(monkeypatch, fake_t4):
    """A T4 answers is_bf16_supported() True (emulation counts); the doctor must still say fp16, with the reason."""
    monkeypatch.setattr(doctor, "nf4_round_trip_error", lambda device: 0.09)
    text = report(run_checks())
    assert "Tesla T4" in text and "compute capability  7.5" in text
    assert "float16: compute capability 7.5 has no native bf16 (it needs 8.0; below, bf16 is emulated)" in text
    assert "gpu (float16 compute" in text


def test_unknown_profile_makes_the_doctor_fail(monkeypatch, capsys):
    monkeypatch.setenv("QLORA_PROFILE", "nope")
    assert doctor.main() == 1
    printed = capsys.readouterr().out
    assert "FAIL  profile" in printed and "Unknown profile 'nope'" in printed and "NOT READY" in printed


@pytest.mark.parametrize("name", ["transformers", "peft", "bitsandbytes"])
def test_installed_versions_meet_the_declared_ranges(name):
    assert version(name) in SpecifierSet(doctor.pinned_specifiers()[name])


def test_a_version_outside_the_declared_range_fails(monkeypatch):
    monkeypatch.setattr(doctor, "pinned_specifiers", lambda: {"transformers": "==4.0.0"})
    transformers_check = next(check for check in doctor.version_checks() if check.name == "transformers")
    assert not transformers_check.ok and "(pinned ==4.0.0)" in transformers_check.found
