"""The README's results table is the benchmark's output, pasted verbatim; its commands exist in the Makefile."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_results_block_is_the_generated_table():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- results:begin -->\n(.*)\n<!-- results:end -->", readme, re.DOTALL)
    assert block, "README.md lacks the results markers"
    assert block.group(1).strip() == (REPO / "benchmarks" / "results" / "cpu.md").read_text().strip()


def test_every_make_target_the_readme_names_exists():
    targets = set(re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(), re.MULTILINE))
    named = set(re.findall(r"\bmake ([a-z][a-z-]*)", (REPO / "README.md").read_text()))
    assert {"run", "test"} <= named <= targets
