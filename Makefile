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

.PHONY: install system-deps run test lint bench clean

install: $(STAMP)

# Re-installs only when the dependency pins change; `make run` twice installs once.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing into $(VENV) (first time: several minutes, torch is large)"
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,team]' 2>&1 | $(PIP_QUIET)
	@$(BIN)/python -c "import visionflow, torch, mlflow, prefect, dvc, great_expectations, optuna, psycopg, boto3, dvc_s3"
	@touch $(STAMP)

run: install
	$(BIN)/vflow data init
	$(BIN)/python flows/retrain.py

# The team-stack tests (-m stack) start PostgreSQL and, for two hosts, network namespaces
# (iproute2); the browser test drives Debian's Chromium. A clean Debian-like CI machine
# (root) gets them from apt when missing.
PG_FOUND = command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
system-deps:
	@if ! { $(PG_FOUND); } || ! command -v ip >/dev/null || ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing PostgreSQL, iproute2 and Chromium with apt (team-stack tests)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends postgresql iproute2 chromium >/dev/null; \
	  else echo "note: PostgreSQL, iproute2 or Chromium missing (not root with apt): stack tests skip"; fi; \
	fi

# as root (CI) the stack tests must run: a missing prerequisite fails them instead of skipping.
# Two pytest workers (pytest-xdist): a file at a time each, the stack tests all on one
# (tests/worker_units.py); TEST_WORKERS=0 runs them in this one process.
TEST_WORKERS ?= 2
test: install system-deps
	VFLOW_REQUIRE_STACK=$(shell [ "$$(id -u)" = 0 ] && echo 1 || echo 0) $(BIN)/python -m pytest -q \
	  -n $(TEST_WORKERS)

lint: install
	$(BIN)/ruff check src flows tests bench
	$(BIN)/lint-imports

clean:
	rm -rf outputs .cache
