#!/bin/sh
# The backend-neutral model tests a second time under KERAS_BACKEND=jax (`make test` runs it).
#
# Usage: tests/run_jax.sh [PYTHON [PYTEST ARGS...]]   (PYTHON defaults to .venv/bin/python)
#
# tests/conftest.py only sets KERAS_BACKEND when it is unset, so the value here wins. Tests of
# TensorFlow itself carry tests.helpers.tensorflow_only and are skipped in this run.
#
# JAX compiles every op and every initializer for the CPU with XLA the first time it meets a
# shape; at XLA's default optimisation level that compiling costs several times the tests
# themselves. Level 0 cuts it about six-fold (these are correctness tests, not benchmarks),
# and the persistent compilation cache under .venv/ makes every run after the first one
# compile almost nothing.
set -e
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}
[ $# -gt 0 ] && shift
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=2
export XLA_FLAGS="--xla_backend_optimization_level=0 ${XLA_FLAGS:-}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-.venv/jax-cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
exec "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/kerasunet/test_model.py tests/kerasunet/test_losses.py tests/kerasunet/test_metrics.py \
    tests/kerasunet/test_transfer.py tests/kerasunet/test_sliding_window.py "$@"
