# Everything a fresh clone needs: `make tune` runs the headline study, `make test` runs the suite.
# Each target builds .venv first (Python 3.10+; 3.11 tested) and reinstalls when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
METHOD ?= gcl

.PHONY: setup tune train test test-cluster lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

tune: setup
	$(BIN)/raysemi tune --method $(METHOD)

train: setup
	$(BIN)/raysemi train --method mt --dataset synthetic

# Two test workers share the cores at equal priority: there, waiting threads that sleep beat spinning ones
# (BENCHMARKS.md section 3).
test: setup
	$(BIN)/ruff check raysemi tests benchmarks
	OMP_WAIT_POLICY=PASSIVE $(BIN)/pytest -q -n 2 --dist loadscope --durations=15

# Only the simulated autoscaling cluster's end-to-end tests (scale-up from zero, a lost node, scale-down; also in
# make test), about 2-4 minutes.
test-cluster: setup
	$(BIN)/pytest -q -m cluster --durations=5

lint: setup
	$(BIN)/ruff check raysemi tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
