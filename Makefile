# Every target bootstraps .venv itself. Set QLORA_PROFILE (smoke|cpu|gpu) and
# QLORA_DATA_DIR (a folder with train.parquet/test.parquet) to change what runs.
PYTHON ?= python3
# The CPU build of torch; on a CUDA machine use e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index.
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
BOOK_HTML := book/_build/html

.PHONY: run outputs test unit notebooks book lab lint doctor student-copies benchmark clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,book]"
	rm -f $(VENV)/.installed-* && touch $@

## run: the main job, the whole series on the default profile (executed copies in runs/series/)
run: $(STAMP)
	$(BIN)/python tools/run_series.py

## outputs: rerun the series and write its outputs into notebooks/ (commit them from a cpu run), then the student copies
outputs: $(STAMP)
	$(BIN)/python tools/run_series.py --in-place
	$(BIN)/python tools/make_student_copies.py

## test: lint, unit tests, every notebook under nbval on the smoke profile, the book with warnings as errors
test: $(STAMP)
	$(BIN)/ruff check .
	QLORA_PROFILE=smoke $(BIN)/python -m pytest tests notebooks --nbval-lax -p no:cacheprovider
	$(MAKE) book

unit: $(STAMP)
	$(BIN)/python -m pytest tests

notebooks: $(STAMP)
	QLORA_PROFILE=smoke $(BIN)/python -m pytest notebooks --nbval-lax

book: $(STAMP)
	rm -rf book/_build
	$(BIN)/jupyter-book build book --warningiserror --nitpick --keep-going

lab: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[lab]"
	$(BIN)/jupyter lab notebooks

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

doctor: $(STAMP)
	$(BIN)/python -m qlora_tutorial.doctor

student-copies: $(STAMP)
	$(BIN)/python tools/make_student_copies.py

## benchmark: full fine-tuning vs LoRA vs QLoRA and the reference recipe vs ours -> benchmarks/results/<profile>.json/.md (not in CI)
benchmark: $(STAMP)
	$(BIN)/python benchmarks/compare_methods.py

clean:
	rm -rf $(VENV) book/_build runs notebooks/runs
