"""Environment check: ``python -m qlora_tutorial.doctor`` (shown in notebook 00).

Prints the versions of the pinned stack, the GPU and its compute capability,
the compute dtype that gives and why (bf16 only where it is native), whether
bitsandbytes 4-bit really works here (a tiny NF4 quantize/dequantize round
trip, not an import check), whether the CPU lists ``avx512_bf16`` and whether
the series' guard against bitsandbytes' CPU repacking holds (notebook 02), the
profile a run would pick, and one verdict line. Run it at the door of a workshop.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, requires

import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from qlora_tutorial.settings import PROFILE_ENV, compute_dtype_reason, load_settings, source_checkout
from qlora_tutorial.training import library_versions

ROUND_TRIP_TOLERANCE = 0.2


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, what was found, and whether it is fine."""

    name: str
    found: str
    ok: bool


def constraint_pins() -> dict[str, str]:
    """The exact pins of ``constraints.txt`` in a source checkout (what ``make`` installs); none elsewhere."""
    root = source_checkout()
    path = root / "constraints.txt" if root else None
    if path is None or not path.is_file():
        return {}
    entries = filter(None, (line.split("#", 1)[0].strip() for line in path.read_text().splitlines()))
    return {canonicalize_name(r.name): str(r.specifier) for r in map(Requirement, entries)}


def pinned_specifiers() -> dict[str, str]:
    """The versions this machine should have: the package's declared ranges, narrowed by the constraints' pins."""
    try:
        declared = requires("qlora-tutorial") or []
    except PackageNotFoundError:
        declared = []
    parsed = (Requirement(line) for line in declared if "extra ==" not in line)
    ranges = {canonicalize_name(requirement.name): str(requirement.specifier) for requirement in parsed}
    return {**ranges, **constraint_pins()}


def version_checks() -> list[Check]:
    """Each library's version, failing where it breaks the package's pin."""
    pins = pinned_specifiers()
    checks = []
    for name, found in library_versions().items():
        pin = pins.get(name, "")
        ok = not pin or Version(found) in Requirement(f"{name}{pin}").specifier
        note = f" (pinned {pin})" if pin else ""
        checks.append(Check(name, f"{found}{note}", ok))
    return checks


def nf4_round_trip_error(device: str) -> float:
    """Quantize a random 64x64 matrix to NF4 and back with bitsandbytes; return the max relative error."""
    import bitsandbytes.functional as bnbf

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 64, generator=generator).to(device)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    restored = bnbf.dequantize_4bit(packed, state)
    return float(((restored - weight).abs().max() / weight.abs().max()).item())


def bitsandbytes_check(device: str) -> Check:
    """A real 4-bit round trip on ``device``; any failure is reported, not raised."""
    try:
        error = nf4_round_trip_error(device)
    except Exception as failure:  # the doctor reports every failure as a finding, never raises
        return Check("bitsandbytes 4-bit", f"fails on {device}: {type(failure).__name__}: {failure}", False)
    ok = error < ROUND_TRIP_TOLERANCE
    return Check("bitsandbytes 4-bit", f"NF4 round trip on {device}, max relative error {error:.3f}", ok)


def guard_holds() -> bool:
    """A guarded NF4 layer keeps its standard layout through an eval-mode forward pass without gradients."""
    import bitsandbytes as bnb

    from qlora_tutorial.cpu_packing import keep_standard_layout, standard_layout_kept

    layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    keep_standard_layout(layer).eval()
    with torch.no_grad():
        layer(torch.ones(1, 64))
    return standard_layout_kept(layer)


def cpu_packing_check() -> Check:
    """The CPU's ``avx512_bf16`` flag, whether bitsandbytes would repack here, and whether the guard holds."""
    from qlora_tutorial.cpu_packing import CPU_FLAG, bitsandbytes_packs_here, cpu_lists_avx512_bf16

    listed = "listed" if cpu_lists_avx512_bf16() else "not listed"
    packs = "live (unguarded layers repack)" if bitsandbytes_packs_here() else "off on this CPU"
    try:
        holds = guard_holds()
    except Exception as failure:  # the doctor reports every failure as a finding, never raises
        return Check("CPU packing guard", f"{CPU_FLAG} {listed}; the check failed: {failure}", False)
    guard = "active" if holds else "NOT holding: 4-bit weights repack in eval passes"
    return Check("CPU packing guard", f"{CPU_FLAG} {listed}, bitsandbytes' packed path {packs}; guard {guard}", holds)


def gpu_checks() -> list[Check]:
    """CUDA availability, the GPU, its compute capability, and which compute dtype that gives and why.

    bf16 counts only where the GPU has it natively (``settings.has_native_bf16``):
    ``torch.cuda.is_bf16_supported()`` also answers True on a T4, where bf16 is emulated.
    """
    if not torch.cuda.is_available():
        return [Check("CUDA", "not available: CPU only (4-bit runs on the CPU, slowly)", True)]
    major, minor = torch.cuda.get_device_capability()
    return [
        Check("CUDA", f"{torch.version.cuda}, {torch.cuda.get_device_name()}", True),
        Check("compute capability", f"{major}.{minor}", True),
        Check("compute dtype", compute_dtype_reason("cuda"), True),
    ]


def profile_check() -> Check:
    """The profile and compute dtype a run would use with the current environment."""
    try:
        settings = load_settings()
    except (ValueError, FileNotFoundError) as error:
        return Check("profile", str(error), False)
    dtype = str(settings.compute_dtype).removeprefix("torch.")
    return Check("profile", f"{settings.profile.name} ({dtype} compute, data from {settings.data_source})", True)


def run_checks() -> list[Check]:
    """Every check, in report order."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return version_checks() + gpu_checks() + [bitsandbytes_check(device), cpu_packing_check(), profile_check()]


def verdict(checks: list[Check]) -> str:
    """The closing line: ready, or what failed."""
    failed = [check.name for check in checks if not check.ok]
    if failed:
        return f"NOT READY: {', '.join(failed)} failed. Fix the lines marked FAIL above, then rerun."
    return "READY: this machine can run the QLoRA series."


def report(checks: list[Check]) -> str:
    """The checks as aligned lines, then the verdict."""
    width = max(len(check.name) for check in checks)
    lines = [f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.found}" for c in checks]
    return "\n".join([*lines, "", verdict(checks), f"(change the profile with {PROFILE_ENV}=smoke|cpu|gpu)"])


def main() -> int:
    """Print the report; exit 1 when a check failed."""
    checks = run_checks()
    print(report(checks))
    return 0 if all(check.ok for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
