# liverpipe: `make test` and `make demo` are the two commands a new machine needs.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?=
DEMO_DIR ?= demo
DEMO_CASES ?= 36
DEMO_CONFIG ?= auto
PYTEST_ARGS ?=
PREFECT_PORT ?= 4200
SERVE_ARGS ?=

export HF_HUB_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MPLBACKEND := Agg
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: install orthanc test lint demo serve down clean bench

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

# The PACS tests start a real Orthanc with its DICOMweb plugin: Debian packages, installed
# here with apt-get (as root, or through sudo) when missing. Where that cannot work, the
# other tests still run and the PACS tests fail naming the packages.
ORTHANC_PLUGIN := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
orthanc:
	@if ! command -v Orthanc >/dev/null || [ ! -f $(ORTHANC_PLUGIN) ]; then \
	  sudo=""; if [ "$$(id -u)" -ne 0 ]; then sudo=sudo; fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$sudo apt-get install -y orthanc orthanc-dicomweb \
	    || { $$sudo apt-get update && $$sudo apt-get install -y orthanc orthanc-dicomweb; } \
	    || echo "could not install orthanc and orthanc-dicomweb: the PACS tests will fail"; \
	fi

test: $(STAMP) orthanc
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

# ruff, strict mypy and the import contract (the layers in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check liverpipe storage flows tests bench
	$(VENV)/bin/ruff format --check liverpipe storage flows tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The main job, through the Prefect deployments: phantoms (without DATA=...), a local
# server and the served deployments, then preprocess/preprocess and train-all/train-all.
# CPU: configs/cpu.toml; with CUDA: configs/full.toml (DEMO_CONFIG=... overrides).
demo: $(STAMP)
	@set -e; data="$(DATA)"; \
	if [ -z "$$data" ]; then \
	  data=$(DEMO_DIR)/phantoms; \
	  $(VENV)/bin/liverpipe synth $$data --cases $(DEMO_CASES) --seed 0 --size full --workers 2 --preview; \
	fi; \
	data=$$(realpath "$$data"); out=$$(realpath -m $(DEMO_DIR)); config="$(DEMO_CONFIG)"; \
	if [ "$$config" = auto ]; then \
	  config=$$($(PY) -c 'import torch; print("configs/full.toml" if torch.cuda.is_available() else "configs/cpu.toml")'); \
	fi; \
	echo "demo: data $$data, config $$config, outputs in $$out"; \
	$(VENV)/bin/liverpipe check "$$data" --config $$config || echo "some cases are invalid; preprocess records them and goes on"; \
	$(VENV)/bin/liverpipe serve --detach --port $(PREFECT_PORT) --config $$config --store $$out/store.zarr \
	  --runs $$out/runs --report $$out/report --inbox $$out/inbox --outputs $$out/outputs; \
	export PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_PORT)/api}; \
	$(VENV)/bin/prefect deployment run preprocess/preprocess -p data_dir="$$data" --watch; \
	$(VENV)/bin/liverpipe store info $$out/store.zarr; \
	$(VENV)/bin/prefect deployment run train-all/train-all --watch; \
	echo; sed -n '/^## Headline/,/^## Seed/p' $$out/report/report.md | sed '$$d'; \
	echo "report: $$out/report/report.html"; \
	echo "Prefect UI: $${PREFECT_API_URL%/api} (flow runs, artifacts, the ingest schedule)"; \
	echo "stop the server and the deployments: make down"

# Serve the deployments in the background (a local server on 127.0.0.1 unless
# PREFECT_API_URL is set); `make down` stops what it started.
serve: $(STAMP)
	$(VENV)/bin/liverpipe serve --detach --port $(PREFECT_PORT) $(SERVE_ARGS)

down: $(STAMP)
	$(VENV)/bin/liverpipe down

bench: $(STAMP)
	$(PY) bench/check.py

clean:
	-@if [ -x $(VENV)/bin/liverpipe ]; then $(VENV)/bin/liverpipe down; fi
	rm -rf $(DEMO_DIR) .prefect .pytest_cache .hypothesis .mypy_cache .ruff_cache
