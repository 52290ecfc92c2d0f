# liverpipe: `make test` and `make demo` are the two commands a new machine needs.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?=
DEMO_DIR ?= demo
DEMO_CASES ?= 8
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MPLBACKEND := Agg

.PHONY: install test lint demo clean bench

install: $(STAMP)

# (Re)install whenever pyproject.toml or constraints.txt change; recreate a broken venv.
$(STAMP): pyproject.toml constraints.txt
	@if ! $(PY) -c 'import sys' >/dev/null 2>&1; then rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check liverpipe storage flows tests bench
	$(VENV)/bin/mypy

# The main job. Without DATA=..., synthesise a phantom dataset first.
demo: $(STAMP)
	@if [ -z "$(DATA)" ]; then \
	  $(VENV)/bin/liverpipe synth $(DEMO_DIR)/phantoms --cases $(DEMO_CASES) --seed 0 --workers 2 --preview; \
	  $(VENV)/bin/liverpipe check $(DEMO_DIR)/phantoms; \
	else \
	  $(VENV)/bin/liverpipe check "$(DATA)"; \
	fi

bench: $(STAMP)
	$(PY) bench/check.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .hypothesis .mypy_cache .ruff_cache
