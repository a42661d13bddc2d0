import subprocess
import sys

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


def test_report_on_this_machine_tells_the_truth():
    checks = run_checks()
    names = [check.name for check in checks]
    assert {"torch", "transformers", "peft", "bitsandbytes", "CUDA", "bitsandbytes 4-bit", "profile"} <= set(names)
    text = report(checks)
    assert "not available: CPU only" in text and "cpu (float32 compute" in text
    assert text.splitlines()[-2].startswith("READY")


def test_unknown_profile_makes_the_doctor_fail(monkeypatch):
    monkeypatch.setenv("QLORA_PROFILE", "nope")
    finished = subprocess.run(
        [sys.executable, "-m", "qlora_tutorial.doctor"], capture_output=True, text=True, env=None, check=False
    )
    assert finished.returncode == 1
    assert "FAIL  profile" in finished.stdout and "NOT READY" in finished.stdout


def test_versions_are_checked_against_the_pins(monkeypatch):
    assert doctor.pinned_specifiers()["transformers"] == "==5.23.0"
    monkeypatch.setattr(doctor, "pinned_specifiers", lambda: {"transformers": "==4.0.0"})
    transformers_check = next(check for check in doctor.version_checks() if check.name == "transformers")
    assert not transformers_check.ok and "(pinned ==4.0.0)" in transformers_check.found
