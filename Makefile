# The two commands a newcomer runs: `make demo` and `make test`. Each sets itself up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
DEMO_OUT ?= demo-output
PYTEST_ARGS ?=

.PHONY: demo test venv lint fmt crd unit integration e2e bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[trainer,operator,dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(PY) -m finetune_trainer.demo --output $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

fmt: $(STAMP)
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

# Regenerate the CRD from the spec model (a unit test fails when they drift).
crd: $(STAMP)
	$(PY) -m finetune_operator.crd > charts/finetune-operator/crds/finetunejobs.finetune.dev.yaml

bench: $(STAMP)
	$(PY) bench/train_loop.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
