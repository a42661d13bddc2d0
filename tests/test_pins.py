"""The fast-moving stack is pinned the same way in pyproject.toml, environment.yml and every Colab install cell."""

import re
from pathlib import Path

import nbformat
import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parent.parent
PINNED = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")
EXACT = PINNED[1:]
REQUIREMENT = re.compile(r"^([A-Za-z0-9_.-]+)\s*([<>=!~].*)$")


def requirements(lines):
    found = {}
    for line in lines:
        match = REQUIREMENT.match(line.strip().strip("\"'"))
        if match and match.group(1).lower() in PINNED:
            found[match.group(1).lower()] = match.group(2).replace(" ", "")
    return found


def pyproject_pins():
    return requirements(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])


def environment_pins():
    dependencies = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    pip_section = next(item["pip"] for item in dependencies if isinstance(item, dict))
    return requirements(pip_section)


def colab_cells():
    for path in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = [c for c in nbformat.read(path, as_version=4).cells if "google.colab" in c.source]
        yield path.name, cells


def test_pyproject_pins_the_stack_exactly_and_torch_by_range():
    pins = pyproject_pins()
    assert set(pins) == set(PINNED)
    assert all(pins[name].startswith("==") for name in EXACT)
    assert pins["torch"].startswith(">=") and "<" in pins["torch"]


def test_environment_matches_pyproject():
    assert environment_pins() == pyproject_pins()


@pytest.mark.parametrize(("name", "cells"), list(colab_cells()))
def test_colab_install_cell_matches_pyproject(name, cells):
    assert len(cells) == 1, f"{name} needs exactly one Colab install cell"
    words = cells[0].source.replace('"', " ").split()
    colab = requirements(word for word in words if "==" in word)
    assert colab == {k: v for k, v in pyproject_pins().items() if k in EXACT}, name
