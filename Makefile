# One command to set up and run the default evaluation (`make demo`), one to run the tests (`make test`).
# TORCH pins the CPU build that CI installs; on a GPU machine keep the torch you have (make TORCH=).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= hf,mpi,plot,dev
BIN := $(VENV)/bin

.PHONY: venv demo test test-all bench clean

$(BIN)/evalctx: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if [ -n "$(TORCH)" ]; then $(BIN)/pip install -q "$(TORCH)"; fi
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	@touch $@

venv: $(BIN)/evalctx

demo: venv
	$(BIN)/evalctx run

test: venv
	$(BIN)/python -m pytest -q

test-all: venv
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: venv
	$(BIN)/python benchmarks/bench_generate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
