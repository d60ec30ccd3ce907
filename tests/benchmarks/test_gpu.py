"""benchmarks/gpu.py on CPU with a tiny configuration: it runs without TensorFlow and writes its results."""

import json
import os
import subprocess
import sys

from tests.helpers import REPO


def test_gpu_benchmark_runs_without_tensorflow(tmp_path):
    # A `tensorflow` that cannot be imported first on the path: the script and its per-run
    # subprocesses must never need it.
    blocker = tmp_path / "blocker" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('benchmarks/gpu.py imported tensorflow')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent),
           # compile little and reuse it (as tests/run_jax.sh); these are not timings that matter
           "XLA_FLAGS": "--xla_backend_optimization_level=0",
           "JAX_COMPILATION_CACHE_DIR": str(REPO / ".venv" / "jax-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--sizes", "16", "--filters", "2",
                           "--depth", "1", "--batch", "2", "--steps", "1", "--warmup", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "gpu.json").read_text())
    assert [(r["framework"], r["precision"]) for r in results] == [
        ("keras-jax", "float32"), ("keras-jax", "mixed_float16"), ("torch", "float32"), ("torch", "bf16"),
        ("torch", "fp16")]
    for run in results[:2]:
        assert "error" not in run, run
        assert run["slices_per_s"] > 0 and run["device"].startswith("cpu") and run["peak_bytes"] is None
    table = (out / "gpu.md").read_text().splitlines()
    assert table[0].startswith("| size | framework | precision |") and len(table) == 2 + len(results)
    assert "| 16² | keras-jax | mixed_float16 | 2 |" in table[3]
    assert proc.stdout.strip().splitlines()[-1].startswith("JAX mixed_float16 / float32 slices/s: 16²: ")
