# recloop — `make demo` runs the main job on the embedded default; `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

export RECLOOP_HOME ?= $(CURDIR)/.recloop
export DAGSTER_HOME ?= $(RECLOOP_HOME)/dagster
# The stack phones home by default; this machine (and many production ones) has no internet.
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export DAGSTER_DISABLE_TELEMETRY := true
export FEAST_USAGE := False

.PHONY: setup system-packages demo test ui mlflow bench bench-import clean

# torch is installed first and pinned: a bare or ranged requirement pulls a multi-GB CUDA build.
# constraints.txt pins every other package to the versions the suite was run with.
$(BIN)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"recloop needs Python 3.11, found {sys.version.split()[0]}"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,airflow,spark]"
	touch $@

setup: $(BIN)/.installed

# What the tests need from Debian besides Python: docker-compose (validates docker-compose.yml) and
# chromium (the browser tests drive it with Playwright; no browser download). Installed when root with
# apt-get, otherwise named (those tests then skip, and fail under CI=true).
system-packages:
	@bash .ci/system-packages

demo: setup
	$(BIN)/recloop demo

# Two worker processes, each taking whole test files (module fixtures are built once): most of a test's
# time is one core's work (imports, subprocesses, a server starting), so two of them keep both cores busy.
# TEST_WORKERS=0 runs everything in this process, in order.
TEST_WORKERS ?= 2
test: setup system-packages
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# `dagster dev` loads pyproject.toml's [tool.dagster]: module pipelines.definitions as code location
# `recloop`, the name the compose stack gives it and the CLI's runs are recorded under (pipelines/run.py).
ui: setup
	mkdir -p "$(DAGSTER_HOME)"
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000

# The MLflow UI on the embedded store (runs, models, aliases): http://127.0.0.1:5000 (docs/model_plane.md).
mlflow: setup
	mkdir -p "$(RECLOOP_HOME)/mlflow"
	$(BIN)/mlflow ui --backend-store-uri "sqlite:///$(RECLOOP_HOME)/mlflow/mlflow.db" -h 127.0.0.1 -p 5000

bench: setup
	$(BIN)/python bench/data_plane.py

# ml-latest-small (../shared/data/ml-latest-small, or --path) imported end to end: JSON out.
bench-import: setup
	$(BIN)/python bench/import_history.py

clean:
	rm -rf .recloop
