# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv if missing, installs everything, runs the main job
#   make test   creates .venv if missing, installs everything, runs the linter and the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# pip reads the machine's wheel folder (torch's CPU wheel) when there is one.
PIP := $(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONUNBUFFERED := 1

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -q --upgrade pip setuptools wheel
	# torch first and alone, from the pinned version, so nothing else can pick a CUDA build.
	$(PIP) -q torch
	$(PIP) -q -e ".[dev]"
	# zennit needs torchvision only for its torchvision canonizers; no CPU torchvision exists.
	$(PIP) -q --no-deps zennit
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/monai-kdx demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check monai_kdx tests benchmarks tutorials

# Two test processes (one per core of the 2-core machines the suite is sized for), each with one torch thread:
# two processes with two threads each on two cores slow small convolutions many times over. A test file runs
# whole in one process (its module fixtures are built once). TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2
test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) runs benchmarks/results .pytest_cache .ruff_cache
