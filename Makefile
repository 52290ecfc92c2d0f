# liverpipe: `make test` and `make demo` are the two commands a new machine needs.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?=
DEMO_DIR ?= demo
DEMO_CASES ?= 8
DEMO_CONFIG ?= configs/tiny.toml
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MPLBACKEND := Agg

.PHONY: install test lint demo clean bench

install: $(STAMP)

# (Re)install whenever pyproject.toml or constraints.txt change; recreate a broken venv.
# editable_mode=compat puts the repo root on sys.path. The default editable finder does not,
# and then Dask workers (which prepend their scratch folder, holding a spill folder named
# "storage", to sys.path) import that folder instead of our storage package.
$(STAMP): pyproject.toml constraints.txt
	@if ! $(PY) -c 'import sys' >/dev/null 2>&1; then rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]' --config-settings editable_mode=compat
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check liverpipe storage flows tests bench
	$(VENV)/bin/mypy

# The main job. Without DATA=..., synthesise a phantom dataset first.
demo: $(STAMP)
	@set -e; data="$(DATA)"; \
	if [ -z "$$data" ]; then \
	  data=$(DEMO_DIR)/phantoms; \
	  $(VENV)/bin/liverpipe synth $$data --cases $(DEMO_CASES) --seed 0 --workers 2 --preview; \
	fi; \
	$(VENV)/bin/liverpipe check "$$data" || echo "some cases are invalid; preprocess records them and goes on"; \
	rc=0; $(VENV)/bin/liverpipe preprocess "$$data" --store $(DEMO_DIR)/store.zarr --config $(DEMO_CONFIG) || rc=$$?; \
	if [ $$rc -gt 1 ]; then exit $$rc; fi; \
	$(VENV)/bin/liverpipe store info $(DEMO_DIR)/store.zarr

bench: $(STAMP)
	$(PY) bench/check.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .hypothesis .mypy_cache .ruff_cache
