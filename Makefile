# Every target works on a fresh machine: `make setup` creates or refreshes .venv idempotently.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.quantkit-installed
# Tests and CI never touch the Hugging Face hub; kernels run in the Triton interpreter.
TEST_ENV := TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PYTEST_ARGS ?=

.PHONY: setup run test test-fast bench inspect clean

setup: $(STAMP)

# torch==2.13.0 goes in first and alone: any other torch spec pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: setup
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/run.py $(ARGS)

test: setup
	$(TEST_ENV) $(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

test-fast: setup
	$(TEST_ENV) $(BIN)/python -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python scripts/bench_kernels.py

# every kernel config the dispatchers select on an H200, compiled for sm90 (no GPU needed)
inspect: setup
	$(BIN)/python scripts/inspect_kernels.py $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
