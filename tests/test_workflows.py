"""The GitHub Actions workflows: pinned actions, least permissions, a book workflow that builds what `make book` does.

`make workflows` runs zizmor (and actionlint where it is installed) on the
same files; these checks need neither tool, so they hold on every machine, and
they pin down what this repository asks beyond zizmor: that no job but the
Pages deployment may write, and that the published book is the one `make book`
builds from the committed outputs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
TAG_COMMENT = re.compile(r"uses:\s*(\S+)\s+#\s*v\d+(\.\d+)*\s*$")
READ_ONLY = {"contents": "read"}
PAGES_DEPLOY = {"pages": "write", "id-token": "write"}
CONFIG = yaml.safe_load((REPO / "book" / "_config.yml").read_text(encoding="utf-8"))


def load(path: Path) -> dict[str, Any]:
    workflow = yaml.safe_load(path.read_text(encoding="utf-8"))
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads the key `on` as True
    return workflow


def steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def unpinned_actions(workflow: dict[str, Any]) -> list[str]:
    """Every `uses:` that is not owner/repo@<full commit SHA> (a tag or branch can be moved under us)."""
    return [step["uses"] for step in steps(workflow) if "uses" in step and not PINNED.match(step["uses"])]


def uses_without_tag_comment(text: str) -> list[str]:
    """Every `uses:` line that does not name, in a comment, the release its SHA is (so a reader can update it)."""
    lines = [line.strip() for line in text.splitlines() if re.match(r"^\s*(- )?uses:", line)]
    return [line for line in lines if not TAG_COMMENT.search(line)]


def permission_problems(workflow: dict[str, Any]) -> list[str]:
    """What grants more than least privilege: the workflow grants nothing, each job only what it names.

    A job may read the repository; only a job whose one action is deploy-pages may
    write, and only to Pages (with the OIDC token that proves where the artifact came from).
    """
    problems = [] if workflow.get("permissions") == {} else [f"workflow-level {workflow.get('permissions')!r}"]
    for name, job in workflow["jobs"].items():
        granted = job.get("permissions")
        actions = [step.get("uses", "").split("@")[0] for step in job.get("steps", [])]
        if granted == PAGES_DEPLOY and actions == ["actions/deploy-pages"]:
            continue
        if not isinstance(granted, dict) or not set(granted.items()) <= set(READ_ONLY.items()):
            problems.append(f"job {name}: {granted!r}")
    return problems


def credential_keeping_checkouts(workflow: dict[str, Any]) -> list[str]:
    """Checkouts that leave the token in .git/config, where a later step or an artifact could take it."""
    return [
        step["uses"]
        for step in steps(workflow)
        if step.get("uses", "").startswith("actions/checkout@")
        and step.get("with", {}).get("persist-credentials") is not False
    ]


def makefile_line(target: str, command: str) -> str:
    """The line of a Makefile target's recipe that runs ``command``, without the $(BIN)/ prefix."""
    recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert recipe, f"the Makefile has no target {target}"
    line = next(line.strip() for line in recipe.group(1).splitlines() if command in line)
    return line.replace("$(BIN)/", "")


def run_steps(workflow: dict[str, Any]) -> list[str]:
    return [step["run"].strip() for step in steps(workflow) if "run" in step]


BAD = {
    "on": {"push": None},
    "permissions": "write-all",
    "jobs": {
        "build": {
            "permissions": {"contents": "write"},
            "steps": [{"uses": "actions/checkout@v4"}, {"uses": "actions/deploy-pages@main"}],
        }
    },
}


def test_the_checks_catch_a_tag_pinned_write_all_workflow() -> None:
    assert unpinned_actions(BAD) == ["actions/checkout@v4", "actions/deploy-pages@main"]
    assert permission_problems(BAD) == ["workflow-level 'write-all'", "job build: {'contents': 'write'}"]
    assert credential_keeping_checkouts(BAD) == ["actions/checkout@v4"]
    assert uses_without_tag_comment("      - uses: a/b@" + "0" * 40 + "\n") == ["- uses: a/b@" + "0" * 40]


def test_the_book_and_the_tests_have_a_workflow() -> None:
    assert {path.name for path in WORKFLOWS} >= {"book.yml", "test.yml"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_every_action_is_pinned_to_a_commit_sha_with_its_tag(path: Path) -> None:
    assert not unpinned_actions(load(path))
    assert not uses_without_tag_comment(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_permissions_are_least(path: Path) -> None:
    assert not permission_problems(load(path))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_checkouts_do_not_keep_the_token(path: Path) -> None:
    assert not credential_keeping_checkouts(load(path))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_each_job_has_a_time_limit_and_each_workflow_a_concurrency_group(path: Path) -> None:
    workflow = load(path)
    assert workflow["concurrency"]["group"]
    assert all(job.get("timeout-minutes") for job in workflow["jobs"].values())


def test_the_public_ci_runs_make_test() -> None:
    assert any(line.startswith("make test ") for line in run_steps(load(REPO / ".github" / "workflows" / "test.yml")))


def test_make_test_checks_the_workflows_offline() -> None:
    assert makefile_line("test", "workflows") == "$(MAKE) workflows"
    assert "--offline" in makefile_line("workflows", "zizmor").split()


def test_the_book_is_published_from_main_after_every_push() -> None:
    workflow = load(REPO / ".github" / "workflows" / "book.yml")
    assert workflow["on"]["push"]["branches"] == [CONFIG["repository"]["branch"]]
    assert workflow["concurrency"]["cancel-in-progress"] is False, "a deployment is never cancelled halfway"
    deploy = workflow["jobs"]["deploy"]
    assert deploy["needs"] == "build"
    assert deploy["environment"]["name"] == "github-pages"


def test_the_book_workflow_builds_what_make_book_builds() -> None:
    """The same command, on the committed outputs (nothing installed that could execute a notebook), same folder."""
    workflow = load(REPO / ".github" / "workflows" / "book.yml")
    assert makefile_line("book", "jupyter-book build") in run_steps(workflow)
    upload = next(step for step in steps(workflow) if step.get("uses", "").startswith("actions/upload-pages-artifact@"))
    book_html = re.search(r"^BOOK_HTML := (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert book_html and upload["with"]["path"] == book_html.group(1)


def test_the_book_workflow_installs_the_book_extra_at_the_pinned_versions() -> None:
    workflow = load(REPO / ".github" / "workflows" / "book.yml")
    install = next(line for line in run_steps(workflow) if "pip install" in line).split()
    assert install[install.index("--constraint") + 1] == "constraints.txt"
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["book"]
    named = install[install.index("--constraint") + 2 :]
    assert named == [Requirement(line).name for line in extra]
