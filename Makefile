# Set-up and checks. Two commands on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC picks the torch build: CI pins the CPU wheel (torch==2.13.0) so that no CUDA
# packages are downloaded; users with GPUs keep the default.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch>=2.6
# pytest processes (pytest-xdist); each trains with one thread. 0: one process, no xdist.
PYTEST_WORKERS ?= 2
BIN := $(VENV)/bin

.PHONY: demo test install install-test lint typecheck pytest clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The main job on the embedded defaults: the transfer-aware sweep (muP proxies of width 32, then
# the proxy's best two on the width-128 target) over a byte-level GPT on the stdlib corpus, every
# trial in MLflow under runs/; then what the published scaling laws say for a few budgets.
demo: install
	$(BIN)/scaleplan sweep studies/configs/transfer-quickstart.yaml
	$(BIN)/scaleplan plan --compute 1e19 1e21 1e23

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install-test
	$(BIN)/mypy

pytest: install-test
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup

# lint, type check, then the tests (the notebooks are executed by tests/e2e/test_notebooks.py).
test: lint typecheck pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
