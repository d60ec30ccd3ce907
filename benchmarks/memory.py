"""Peak training memory of the 3D U-Net: measured against kerasunet.planner's estimate (not a test).

For each patch size a fresh Python process (TensorFlow, float32) builds the 3D U-Net
with spatial sizes left open, runs one warm-up step of kerasunet's kind (``tf.function``
around a GradientTape step with Adam) on the smallest valid patch, which traces the step
and creates the optimiser state, and then one step on the patch. Beside
:func:`kerasunet.planner.estimate_memory` for the same setting it prints, with the ratios
estimate / measured:

* ``measured``: the peak minus the level after importing TensorFlow and running one op
  (weights, Adam state, gradients, activations, plus what TensorFlow keeps for tracing
  and kernels, which the estimate does not model), against the estimate's total;
* ``fixed``: the level after the warm-up step minus that first level;
* ``meas. act.``: the peak minus the level after the warm-up step (what the patch itself
  costs), against the estimate's activations. This checks the planner's activation model.

On CPU the levels are the process's RSS and the peak its peak RSS; with a GPU visible
they are ``tf.config.experimental.get_memory_info("GPU:0")`` (current, peak). The loss
is plain binary cross-entropy: its few output-sized tensors are negligible beside the
network's.

Usage::

    python benchmarks/memory.py                                  # 16x64x64, 24x96x96, 32x128x128
    python benchmarks/memory.py --sizes 8x32x32,16x64x64 --filters 4 --depth 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from kerasunet.planner import (GIB, estimate_memory, format_size, pooling_factors, pooling_plan,  # noqa: E402
                               research_setting)

SPACING = (3.0, 1.2, 1.2)  # thick-slice MRI, (D, H, W) mm


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(patch, filters: int, depth: int, batch: int) -> dict:
    """One training step in this (fresh) process; memory figures in bytes."""
    import numpy as np
    import tensorflow as tf

    import keras
    from kerasunet.model import build_unet

    gpu = bool(tf.config.list_physical_devices("GPU"))

    def level() -> int:
        return tf.config.experimental.get_memory_info("GPU:0")["current"] if gpu else rss_bytes()

    tf.constant(1.0) + 1.0  # load the runtime before the baseline
    start = level()
    keras.utils.set_random_seed(0)
    model = build_unet((None, None, None, 1), 1, filters=filters, depth=depth, dims=3, spacing=SPACING)
    optimizer, loss_fn = keras.optimizers.Adam(1e-4), keras.losses.BinaryCrossentropy()
    spec = tf.TensorSpec([None, None, None, None, 1], "float32")

    @tf.function(input_signature=[spec, spec])
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    rng = np.random.default_rng(0)

    def batch_of(size):
        return (tf.constant(rng.random((batch, *size, 1), np.float32)),
                tf.constant((rng.random((batch, *size, 1)) > 0.9).astype(np.float32)))

    step(*batch_of(pooling_factors(pooling_plan(SPACING, depth))))
    x, y = batch_of(patch)
    if gpu:
        tf.config.experimental.reset_memory_stats("GPU:0")
    warm = level()
    step(x, y).numpy()
    if gpu:
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"device": "GPU" if gpu else "CPU", "start": start, "warm": warm, "peak": peak}


def measure(patch, filters: int, depth: int, batch: int) -> dict:
    """Runs :func:`child` in a fresh interpreter and returns its figures."""
    args = [sys.executable, __file__, "--child", format_size(patch), "--filters", str(filters),
            "--depth", str(depth), "--batch", str(batch)]
    proc = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_size(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split("x"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16x64x64,24x96x96,32x128x128", help="comma-separated DxHxW")
    parser.add_argument("--filters", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(parse_size(args.child), args.filters, args.depth, args.batch)))
        return
    print("The research's own setting, in the planner's words:")
    print(research_setting(12.0))
    print()
    print(f"3D U-Net, filters {args.filters}, depth {args.depth}, batch {args.batch}, spacing {SPACING}, "
          "float32; MiB")
    print(f"{'patch':>12} {'estimate':>9} {'measured':>9} {'ratio':>6} {'fixed':>6} {'est. act.':>9} "
          f"{'meas. act.':>10} {'ratio':>6}")
    for text in args.sizes.split(","):
        patch = parse_size(text)
        estimate = estimate_memory(patch, args.batch, filters=args.filters, depth=args.depth, spacing=SPACING)
        got = measure(patch, args.filters, args.depth, args.batch)
        total, activations = got["peak"] - got["start"], got["peak"] - got["warm"]
        mib = GIB / 1024
        print(f"{text + ' ' + got['device']:>12} {estimate.total / mib:9.0f} {total / mib:9.0f} {estimate.total / total:6.2f} "
              f"{(got['warm'] - got['start']) / mib:6.0f} {estimate.activations / mib:9.0f} {activations / mib:10.0f} "
              f"{estimate.activations / activations:6.2f}")


if __name__ == "__main__":
    main()
