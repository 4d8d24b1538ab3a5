# FedCap: `make run` sets up .venv and runs the main job; `make test` runs the test suite.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedcap-installed
# torch and torchvision first, pinned: this machine serves these builds from its own disk.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# pip warns "Location '...' is ignored" once per package and configured index that lacks it (dozens
# per install): drop those lines only; every other line, errors included, passes, and pipefail keeps
# pip's exit status.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PIP_FILTER := 2>&1 | sed -u "/^WARNING: Location '.*' is ignored/d"

.PHONY: install run test bench stop clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH) $(PIP_FILTER)
	$(BIN)/pip install -q -e ".[dev]" $(PIP_FILTER)
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m simulations.run

stop:  # stop the local SuperLink that `flwr run` leaves running
	$(BIN)/python -m simulations.run --stop-superlink

# Test files run in TEST_WORKERS processes (pytest-xdist, a file per process): most of the suite's time is
# Flower runs waiting on their processes and timeouts, which two files share well on 2 cores.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/synthetic_speed.py
	$(BIN)/python benchmarks/dp_step.py

clean:
	rm -rf $(VENV) .pytest_cache
