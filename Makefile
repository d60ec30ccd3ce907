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
	$(BIN)/python -m cli.demo

# Every benchmark with quick arguments (about 10 minutes on 2 cores); each prints its ratio last.
# benchmarks/README.md gives the full-size commands. peer_torch says it is skipped without PyTorch.
bench: $(STAMP)
	export TF_CPP_MIN_LOG_LEVEL=2; set -e; \
	$(BIN)/python benchmarks/input_pipeline.py --slices 128 --rounds 1 --train-steps 0; \
	$(BIN)/python benchmarks/train_step.py --quick --configs 128; \
	$(BIN)/python benchmarks/predict.py --slices 32 --rounds 1; \
	$(BIN)/python benchmarks/peer_torch.py --quick --configs 128; \
	$(BIN)/python benchmarks/scaling.py --build-cases 2 --build-size 128 --rounds 1; \
	$(BIN)/python benchmarks/metrics.py --size 128 --slices 64; \
	$(BIN)/python benchmarks/memory.py --sizes 8x32x32,16x64x64 --filters 4 --depth 2; \
	$(BIN)/python benchmarks/build.py --cases 4 --size 64 --slices 12,16; \
	$(BIN)/python benchmarks/dicom_build.py --size 128 --slices 32 --repeats 1; \
	$(BIN)/python benchmarks/serving.py --size 64 --slices 16 --filters 8 --depth 3; \
	out=$$(mktemp -d); XLA_FLAGS=--xla_backend_optimization_level=0 $(BIN)/python benchmarks/gpu.py \
	  --sizes 16 --filters 2 --depth 1 --batch 2 --steps 1 --warmup 1 --out $$out; rm -rf $$out

clean:
	rm -rf $(VENV) demo_output build *.egg-info
