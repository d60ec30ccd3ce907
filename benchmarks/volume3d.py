"""3D U-Net on this CPU: training throughput and sliding-window inference per volume, against 2D.

Figures (float32, the default network of ``train``: filters 32, depth 4; the 3D patch
48x128x128, 2 patches per step and per call, isotropic pooling):

* **training throughput**, voxels per second: ``--steps`` timed steps of kerasunet's kind
  (``tf.function`` around a GradientTape step with Adam and binary cross-entropy, as
  benchmarks/memory.py) after one untimed step that traces it; 3D on ``--batch`` random
  patches, 2D on ``--batch-2d`` random 512x512 slices;
* **inference per 512x512x100 volume**: 3D is the sliding window of ``kerasunet.predict``
  (50 % overlap, Gaussian weighting, ``PredictSettings.patch_batch_size`` windows per call,
  two outputs). Running all its windows through a filters-32 network takes tens of minutes
  on 2 shared cores, so the figure is ``calls x`` the mean time of ``--calls`` timed
  network calls (after one untimed call), plus the measured time of the window assembly
  itself (``sliding_window_predict`` on the whole volume with a network that costs
  nothing). 2D is 100 slices through ``predict_on_batch`` in batches of ``--batch-2d``,
  likewise ``calls x`` timed calls. Both leave out reading, resampling and post-processing.

The last line is the ratio 3D / 2D of both figures.

``--demo DIR`` instead compares 3D with 2D on demo-sized CT phantoms (``make demo``'s 64x64
CT, fewer cases) at the same training time: both networks with the ``small`` experiment
preset's settings (filters 16, depth 3, bce_dice, augmentation, cosine schedule; 2D batch 16,
3D patch 16x48x48 batch 2), 2D for ``--demo-epochs`` epochs, then a two-epoch 3D probe and
the 3D run for as many epochs as fit the 2D run's training time: its first epoch (with the
start and tracing) as the probe's, each further one as the probe's second. Time is CPU time
of this process (``time.process_time``, all threads), as benchmarks/quality.py counts it, so
other jobs on a shared machine stretch the wall time but not the budget.
Both are evaluated on the same held-out cases (``kerasunet.evaluate``, default
post-processing); it prints the liver and tumour Dice per case of each, and the paired
difference with ``kerasunet.compare``'s bootstrap interval. Usage::

    nice -n 10 python benchmarks/volume3d.py
    python benchmarks/volume3d.py --patch 16x32x32 --filters 8 --depth 2 --steps 1 --calls 1   # quick
    nice -n 10 python benchmarks/volume3d.py --demo /tmp/demo3d
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np  # noqa: E402

from kerasunet.planner import format_size  # noqa: E402
from kerasunet.predict import PredictSettings  # noqa: E402
from kerasunet.sliding_window import OVERLAP, sliding_window_predict, window_starts  # noqa: E402

VOLUME = (100, 512, 512)  # (D, H, W): 100 slices of 512x512
OUTPUTS = 2  # CT: liver and tumour


def train_seconds(model, shape, batch: int, steps: int) -> float:
    """Mean seconds of one training step on random ``[batch, *shape, 1]`` inputs."""
    import keras
    import tensorflow as tf

    optimizer, loss_fn = keras.optimizers.Adam(1e-4), keras.losses.BinaryCrossentropy()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((batch, *shape, 1), np.float32))
    y = tf.constant((rng.random((batch, *shape, OUTPUTS)) > 0.9).astype(np.float32))
    step(x, y).numpy()  # trace
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y).numpy()
    return (time.perf_counter() - start) / steps


def call_seconds(model, shape, batch: int, calls: int) -> float:
    """Mean seconds of one ``predict_on_batch`` of ``[batch, *shape, 1]``, after one untimed call."""
    x = np.random.default_rng(1).random((batch, *shape, 1), np.float32)
    model.predict_on_batch(x)
    start = time.perf_counter()
    for _ in range(calls):
        model.predict_on_batch(x)
    return (time.perf_counter() - start) / calls


def assembly_seconds(patch, batch: int) -> float:
    """Seconds of the sliding window over :data:`VOLUME` with a network that costs nothing."""
    volume = np.zeros((*VOLUME, 1), np.float32)
    start = time.perf_counter()
    sliding_window_predict(lambda b: np.zeros((len(b), *patch, OUTPUTS), np.float32), volume, patch, OVERLAP, batch)
    return time.perf_counter() - start


def demo(out: Path, epochs_2d: int, cases: int) -> None:
    """3D against 2D on demo-sized CT phantoms at the same training time (module docstring)."""
    import csv

    from kerasunet.compare import compare_pair
    from kerasunet.evaluate import EvaluateSettings, evaluate
    from kerasunet.experiment import PRESETS
    from kerasunet.synth import synth_dataset
    from kerasunet.train import train
    from kerasunet.train_settings import TrainSettings
    from tfrecords_builder.build import BuildSettings, build_records

    quiet = lambda line: None  # noqa: E731  (build_records' log)
    preset = PRESETS["small"]
    synth_dataset(out / "phantoms", ct_cases=cases, mri_cases=0, size=64, ct_slices=(24, 40), seed=0)
    records = {}
    for name, volumes in (("2D", False), ("3D", True)):
        records[name] = out / f"records-{name}"
        build_records(BuildSettings(source=str(out / "phantoms" / "lits"), dataset="lits", out=str(records[name]),
                                    seed=0, holdout="last", val_fraction=0.2, test_fraction=0.25, workers=1,
                                    volumes=volumes, context=0), log=quiet)  # the 2D arm: single slices
    common = dict(epochs=epochs_2d, lr=preset.ct_lr, loss=preset.loss, filters=preset.filters, depth=preset.depth,
                  augment=preset.augment, oversample_tumour=preset.oversample_tumour, schedule=preset.schedule,
                  dropout=preset.dropout, monitor=preset.monitor, seed=0, mixed_precision="off")
    three = dict(dims=3, patch_size=preset.patch_size, batch_size=preset.patch_batch_size)

    def run(name, **fields) -> tuple[float, float, list[float]]:
        """CPU and wall seconds of one training run, and the CPU seconds at the end of each epoch."""
        cpu, wall, ends = time.process_time(), time.perf_counter(), []

        def progress(line: str) -> None:
            if " done in " in line:  # train's end-of-epoch line
                ends.append(time.process_time() - cpu)

        train(TrainSettings(records=str(records[name[:2]]), out=str(out / name), **{**common, **fields}),
              progress=progress)
        return time.process_time() - cpu, time.perf_counter() - wall, ends

    cpu_2d, wall_2d, _ = run("2D", batch_size=preset.ct_batch_size)
    _, _, (first, second) = run("3D-probe", **{**three, "epochs": 2})
    epochs_3d = 1 + max(0, int((cpu_2d - first) // (second - first)))
    cpu_3d, wall_3d, _ = run("3D", **{**three, "epochs": epochs_3d})
    print(f"demo CT phantoms ({cases} cases, 64x64), training time as CPU s (wall s): 2D {epochs_2d} epochs "
          f"{cpu_2d:.0f} ({wall_2d:.0f}); 3D {epochs_3d} epochs {cpu_3d:.0f} ({wall_3d:.0f}); 3D probe: first "
          f"epoch {first:.0f}, then {second - first:.0f} per epoch")
    evaluate({"2D": out / "2D", "3D": out / "3D"}, records["2D"], out / "eval", EvaluateSettings(n_overlays=0),
             progress=quiet)
    with open(out / "eval" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for structure in ("liver", "tumour"):
        dice = {m: {r["case"]: float(r[f"{structure}_dice"] or "nan") for r in rows if r["model"] == m}
                for m in ("2D", "3D")}
        cells = ", ".join(f"{case} {dice['2D'][case]:.3f}/{dice['3D'][case]:.3f}" for case in dice["2D"])
        means = {m: np.nanmean(list(d.values())) for m, d in dice.items()}
        print(f"{structure} Dice per case (2D/3D): {cells}; mean 2D {means['2D']:.3f}, 3D {means['3D']:.3f}")
        try:
            print("  " + compare_pair("3D", dice["3D"], "2D", dice["2D"]).describe())
        except ValueError as exc:
            print(f"  {exc}")


def parse_size(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split("x"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", default="48x128x128", help="3D patch DxHxW")
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="3D patches per training step")
    parser.add_argument("--batch-2d", type=int, default=4, help="2D slices per training step and per call")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps")
    parser.add_argument("--calls", type=int, default=2, help="timed inference calls")
    parser.add_argument("--demo", type=Path, default=None, help="instead: 3D vs 2D on demo phantoms, in this folder")
    parser.add_argument("--demo-epochs", type=int, default=10, help="--demo: epochs of the 2D run")
    parser.add_argument("--demo-cases", type=int, default=12, help="--demo: CT phantoms")
    args = parser.parse_args()
    if args.demo:
        return demo(args.demo, args.demo_epochs, args.demo_cases)

    import keras

    from kerasunet.model import build_unet

    patch, windows_per_call = parse_size(args.patch), PredictSettings.patch_batch_size
    keras.utils.set_random_seed(0)
    net3d = build_unet((None, None, None, 1), OUTPUTS, filters=args.filters, depth=args.depth, dims=3)
    net2d = build_unet((None, None, 1), OUTPUTS, filters=args.filters, depth=args.depth)
    print(f"network: filters {args.filters}, depth {args.depth}, float32, {os.cpu_count()} CPU(s) "
          f"(load average {os.getloadavg()[0]:.1f} at the start); "
          f"3D patch {format_size(patch)}, batch {args.batch}; 2D slices 512x512, batch {args.batch_2d}")

    step3d = train_seconds(net3d, patch, args.batch, args.steps)
    step2d = train_seconds(net2d, VOLUME[1:], args.batch_2d, args.steps)
    voxels3d = args.batch * math.prod(patch) / step3d
    voxels2d = args.batch_2d * math.prod(VOLUME[1:]) / step2d
    print(f"training 3D: {step3d:.2f} s per step, {voxels3d:,.0f} voxels/s")
    print(f"training 2D: {step2d:.2f} s per step, {voxels2d:,.0f} voxels/s")

    windows = math.prod(len(window_starts(s, p)) for s, p in zip(VOLUME, patch))
    calls3d = math.ceil(windows / windows_per_call)
    per_call3d = call_seconds(net3d, patch, windows_per_call, args.calls)
    assembly = assembly_seconds(patch, windows_per_call)
    volume3d = calls3d * per_call3d + assembly
    calls2d = math.ceil(VOLUME[0] / args.batch_2d)
    per_call2d = call_seconds(net2d, VOLUME[1:], args.batch_2d, args.calls)
    volume2d = calls2d * per_call2d
    print(f"inference 3D per 512x512x100 volume: {volume3d:.0f} s ({windows} windows, {calls3d} calls x "
          f"{per_call3d:.2f} s + {assembly:.1f} s assembly)")
    print(f"inference 2D per 512x512x100 volume: {volume2d:.0f} s ({calls2d} calls x {per_call2d:.2f} s)")
    print(f"ratio 3D / 2D: training voxels/s x{voxels3d / voxels2d:.2f}, inference time per volume "
          f"x{volume3d / volume2d:.1f}")


if __name__ == "__main__":
    main()
