# visionflow: `make run` runs the pipeline on the built-in dataset, `make test` runs the tests.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PIP_QUIET := { grep -v -e '^WARNING: Location' -e 'is ignored: it is neither' || true; }

export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run test lint bench clean

install: $(STAMP)

# Re-installs only when the dependency pins change; `make run` twice installs once.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing into $(VENV) (first time: several minutes, torch is large)"
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]' 2>&1 | $(PIP_QUIET)
	@$(BIN)/python -c "import visionflow, torch, mlflow, prefect, dvc, great_expectations"
	@touch $(STAMP)

run: install
	$(BIN)/vflow data init
	$(BIN)/python flows/retrain.py

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src flows tests bench
	$(BIN)/lint-imports

clean:
	rm -rf outputs .cache
