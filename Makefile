# `make demo` and `make test` set themselves up on a fresh machine with only Python 3.11 and make.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test install clean bench

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python -m pytest -q -n 2   # two workers: CI has 2 cores and much of a test is Python
	sh tests/run_jax.sh $(BIN)/python   # the model code again, under KERAS_BACKEND=jax

demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python -m cli.demo

bench: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python benchmarks/input_pipeline.py
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python benchmarks/train_step.py
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python benchmarks/predict.py

clean:
	rm -rf $(VENV) demo_output build *.egg-info
