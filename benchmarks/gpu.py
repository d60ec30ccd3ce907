"""GPU training throughput and peak memory: kerasunet's U-Net under JAX next to PyTorch (not a test).

Needs only keras, jax and numpy (torch for the peer); it never imports TensorFlow, so it
runs on a GPU machine with ``pip install keras jax[cuda12]`` and a kerasunet checkout.
For each image size (default 256x256 and 512x512, filters 32, depth 4), it times:

* kerasunet's U-Net (``kerasunet.model.build_unet``, loss ``bce_dice``, Adam) under
  ``KERAS_BACKEND=jax`` in float32 and in ``mixed_float16`` (``model.train_on_batch``, XLA);
* the same network in PyTorch (``benchmarks/peer_torch.torch_unet``), channels-last, in
  float32 and with bf16 and fp16 autocast, when torch is installed.

Each configuration runs in its own process, so each peak memory (JAX's
``peak_bytes_in_use``, ``torch.cuda.max_memory_allocated``; none on CPU) is its own and one
framework's allocator never holds memory for the other. Steps are timed on one batch
already on the device, after ``--warmup`` steps (compilation). It writes ``gpu.json`` and
``gpu.md`` (a markdown table) into ``--out`` and prints the table; the last line is the
mixed-precision over float32 ratio of the JAX runs. About 5 minutes on one modern GPU::

    python benchmarks/gpu.py --out gpu_results
    python benchmarks/gpu.py --sizes 32 --filters 4 --depth 2 --batch 2 --steps 1 --warmup 1  # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = [("keras-jax", "float32"), ("keras-jax", "mixed_float16"),
        ("torch", "float32"), ("torch", "bf16"), ("torch", "fp16")]
DEFAULT_BATCH = {256: 16, 512: 8}  # other sizes: 8


def jax_run(size: int, filters: int, depth: int, batch: int, steps: int, warmup: int, precision: str) -> dict:
    """One kerasunet configuration under JAX, in this (fresh) process."""
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import keras
    import numpy as np

    from kerasunet.losses import get_loss
    from kerasunet.model import build_unet

    keras.mixed_precision.set_global_policy(precision)  # compile() adds loss scaling for mixed_float16
    keras.utils.set_random_seed(0)
    model = build_unet((size, size, 1), 2, filters=filters, depth=depth)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=get_loss("bce_dice", ("liver", "tumour")))
    rng = np.random.default_rng(0)
    liver = rng.random((batch, size, size, 1)) > 0.7
    y = np.concatenate([liver, liver & (rng.random(liver.shape) > 0.8)], -1).astype(np.float32)
    x, y = jax.device_put(rng.standard_normal((batch, size, size, 1), dtype=np.float32)), jax.device_put(y)
    for _ in range(warmup):
        model.train_on_batch(x, y)  # returns the loss on the host: each step ends on the device
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    seconds = time.perf_counter() - start
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    return {"slices_per_s": batch * steps / seconds, "peak_bytes": stats.get("peak_bytes_in_use"),
            "device": f"{device.platform}: {device.device_kind}"}


def torch_run(size: int, filters: int, depth: int, batch: int, steps: int, warmup: int, precision: str) -> dict:
    """The PyTorch twin in this process (channels-last, CUDA when available)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peer_torch

    peer_torch.DEPTH = depth
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = peer_torch.torch_rate(size, filters, batch, steps, channels_last=True, device=device,
                                   autocast=None if precision == "float32" else precision, warmup=warmup)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {**result, "device": f"{device}: {name}"}


def run_child(framework: str, precision: str, args, size: int) -> dict:
    """Runs one configuration in a subprocess; its result, or the reason it could not run."""
    batch = args.batch or DEFAULT_BATCH.get(size, 8)
    spec = {"framework": framework, "precision": precision, "size": size, "filters": args.filters,
            "depth": args.depth, "batch": batch, "steps": args.steps, "warmup": args.warmup}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**spec, "error": reason[:300]}
    return {**spec, **json.loads(lines[-1][len("RESULT "):])}


def child(spec: dict) -> None:
    run = jax_run if spec["framework"] == "keras-jax" else torch_run
    result = run(spec["size"], spec["filters"], spec["depth"], spec["batch"], spec["steps"], spec["warmup"],
                 spec["precision"])
    print("RESULT " + json.dumps(result))


def markdown(results: list[dict]) -> str:
    """The results as a markdown table, one row per configuration."""
    rows = ["| size | framework | precision | batch | slices/s | peak memory | device |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rate, peak, device = "—", "—", f"not run: {r['error']}"
        else:
            rate = f"{r['slices_per_s']:.1f}"
            peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f} GiB"
            device = r["device"]
        rows.append(f"| {r['size']}² | {r['framework']} | {r['precision']} | {r['batch']} | {rate} | {peak} | "
                    f"{device} |")
    return "\n".join(rows) + "\n"


def mixed_ratio(results: list[dict]) -> str:
    """``mixed_float16 / float32`` slices/s of the JAX runs, per size."""
    rate = {(r["size"], r["precision"]): r["slices_per_s"] for r in results
            if r["framework"] == "keras-jax" and "error" not in r}
    parts = [f"{size}²: {rate[(size, 'mixed_float16')] / rate[(size, 'float32')]:.2f}x"
             for size in sorted({s for s, _ in rate}) if (size, "float32") in rate and (size, "mixed_float16") in rate]
    return "JAX mixed_float16 / float32 slices/s: " + (", ".join(parts) or "not measured")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=None, help="default: 16 at 256², 8 at 512² and others")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--frameworks", nargs="+", choices=["keras-jax", "torch"], default=["keras-jax", "torch"])
    parser.add_argument("--timeout", type=float, default=300, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=Path("gpu_results"))
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    results = [run_child(framework, precision, args, size) for size in args.sizes
               for framework, precision in RUNS if framework in args.frameworks]
    sys.path.insert(0, str(ROOT))
    from kerasunet.core.atomic import atomic_path, write_json

    table = markdown(results)
    write_json(args.out / "gpu.json", results)
    with atomic_path(args.out / "gpu.md") as tmp:
        tmp.write_text(table)
    print(table + f"written: {args.out / 'gpu.json'}, {args.out / 'gpu.md'}")
    print(mixed_ratio(results))


if __name__ == "__main__":
    main()
