"""Training-step throughput of the kerasunet U-Net, in slices per second (not a test).

For each configuration (256×256 with filters 32, 128×128 with filters 16; batch 16)
it times ``model.fit`` on CPU twice:

* fed from one in-memory batch repeated (the bare model's speed),
* fed from the records reader ``kerasunet.data.get_dataset`` on ``kerasunet.synth``
  CT phantoms built into records in a temporary folder by ``tfrecords_builder``,

and prints the ratio records / memory; then it times the project's own training loop
(``kerasunet.train``, the custom ``tf.distribute`` loop) on the same records. The reader
must not slow training by more than 5% (ratio >= 0.95). Epoch 1 (tracing) is not timed; the slices/s is that of
the fastest later epoch. Reference on this machine's 2 cores: plain Keras about 27
slices/s at 128×128, batch 16, filters 16.

Usage::

    python benchmarks/train_step.py            # 3 timed epochs of 10 steps per run
    python benchmarks/train_step.py --quick    # 2 timed epochs of 4 steps per run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: tfrecords_builder too

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kerasunet.core.labels import OUTPUTS  # noqa: E402
from kerasunet.losses import get_loss  # noqa: E402
from kerasunet.model import build_unet  # noqa: E402

CONFIGS = {"256": (256, 32), "128": (128, 16)}  # size: (height = width, filters)
DEPTH = 4
NAMES = OUTPUTS["ct"]


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock seconds of each epoch."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def compiled_model(size: int, filters: int):
    keras.utils.set_random_seed(0)
    model = build_unet((size, size, 1), len(NAMES), filters=filters, depth=DEPTH)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=get_loss("bce_dice", NAMES))
    return model


def slices_per_second(fit_data: dict, size: int, filters: int, batch: int, steps: int, epochs: int) -> float:
    """Fits ``1 + epochs`` epochs of ``steps`` steps each and returns the fastest timed epoch.

    The first epoch (tracing, shuffle buffer filling) is not timed. The fastest epoch
    is the one least disturbed by other processes on a shared machine.
    """
    model, timer = compiled_model(size, filters), EpochTimer()
    model.fit(**fit_data, epochs=1 + epochs, callbacks=[timer], verbose=0, shuffle=False)
    return batch * steps / min(timer.seconds[1:])


def in_memory(size: int, batch: int, steps: int) -> dict:
    """One constant batch already in memory, repeated: the bare model's step rate, no input cost.

    (``model.fit`` on numpy arrays would time Keras's array slicing too.)
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, 1), dtype=np.float32)
    y = (rng.random((batch, size, size, len(NAMES))) > 0.9).astype(np.float32)
    return {"x": tf.data.Dataset.from_tensors((x, y)).repeat(), "steps_per_epoch": steps}


def project_loop(records: str, tmp: Path, size: int, filters: int, batch: int, steps: int, epochs: int) -> float:
    """Slices/s of kerasunet's own training loop (``kerasunet.train``) on the same records.

    Read from the run's ``timing.csv``; the fastest epoch after the first (tracing).
    """
    from kerasunet.curves import read_history
    from kerasunet.train import TrainSettings, train

    run = train(TrainSettings(records=records, out=str(tmp / "run"), mode="scratch", epochs=1 + epochs,
                              batch_size=batch, lr=1e-4, loss="bce_dice", filters=filters, depth=DEPTH,
                              augment=False, oversample_tumour=0.0, steps_per_epoch=steps, seed=0),
                progress=lambda line: None)
    seconds = [row["seconds"] for row in read_history(run / "timing.csv")]
    return batch * steps / min(seconds[1:])


def from_records(tmp: Path, size: int, batch: int, steps: int) -> dict:
    from kerasunet.data import get_dataset, targets_from_labels
    from kerasunet.synth import synth_lits
    from tfrecords_builder.build import BuildSettings, build_records

    synth_lits(tmp / "lits", n_cases=3, size=size, slices=(2 * batch, 2 * batch))
    settings = BuildSettings(source=str(tmp / "lits"), dataset="lits", out=str(tmp / "records"),
                             all_slices=True, val_fraction=0.0, test_fraction=0.0, workers=1,
                             context=0)  # single slices, as benchmarks/README.md records
    build_records(settings)
    # model.fit needs the float32 targets; kerasunet's own loop expands the uint8 labels in its step
    dataset = get_dataset(settings.out, "train", batch, training=True, repeat=True, seed=0).map(
        lambda x, labels: (x, targets_from_labels(labels, NAMES)))
    return {"x": dataset, "steps_per_epoch": steps}


def xla_rates(size: int, filters: int, batch: int, steps: int, rounds: int = 2) -> dict:
    """Slices/s of one training step as a plain ``tf.function`` and with ``jit_compile=True`` (XLA).

    The step is kerasunet's (forward, BCE + Dice from batch sums, gradients, Adam) on one
    in-memory batch; both are timed in turn, ``rounds`` times, and the fastest round counts.
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((batch, size, size, 1), dtype=np.float32))
    y = tf.constant((rng.random((batch, size, size, len(NAMES))) > 0.8).astype(np.float32))

    def make(jit: bool):
        model = compiled_model(size, filters)
        loss_fn, optimizer = get_loss("bce_dice", NAMES), keras.optimizers.Adam(1e-4)
        optimizer.build(model.trainable_variables)  # its variables exist before tracing

        @tf.function(jit_compile=jit)
        def step():
            with tf.GradientTape() as tape:
                loss = loss_fn.from_sums(loss_fn.batch_sums(y, model(x, training=True)))
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
            return loss

        step().numpy(), step().numpy()  # traces and compiles; the second call checks nothing is left to trace
        return step

    steps_of = {"tf.function": make(False), "tf.function(jit_compile=True)": make(True)}
    rates = dict.fromkeys(steps_of, 0.0)
    for _ in range(rounds):
        for name, step in steps_of.items():
            start = time.perf_counter()
            for _ in range(steps):
                loss = step()
            loss.numpy()
            rates[name] = max(rates[name], batch * steps / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 timed epochs of 4 steps per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["256", "128"])
    parser.add_argument("--no-records", action="store_true", help="skip the records-reader runs")
    parser.add_argument("--xla", action="store_true",
                        help="instead, time the step with and without XLA (jit_compile); compiling takes minutes")
    args = parser.parse_args()
    steps, epochs = (4, 2) if args.quick else (10, 3)
    batch = args.batch_size
    print(f"keras {keras.__version__} backend={keras.backend.backend()} policy="
          f"{keras.mixed_precision.global_policy().name} batch={batch} steps/epoch={steps} timed epochs={epochs}")
    if args.xla:
        for key in args.configs:
            rates = xla_rates(*CONFIGS[key], batch, steps)
            print(", ".join(f"{name} {rate:.1f}" for name, rate in rates.items()) + f" slices/s at {key}²")
            ratio = rates["tf.function(jit_compile=True)"] / rates["tf.function"]
            print(f"XLA / plain tf.function, {key}²: {ratio:.2f}x")
        return
    for key in args.configs:
        size, filters = CONFIGS[key]
        memory = slices_per_second(in_memory(size, batch, steps), size, filters, batch, steps, epochs)
        line = f"{size}x{size} filters={filters}: in-memory {memory:6.1f} slices/s"
        if not args.no_records:
            with tempfile.TemporaryDirectory() as tmp:
                data = from_records(Path(tmp), size, batch, steps)
                records = slices_per_second(data, size, filters, batch, steps, epochs)
                loop = project_loop(str(Path(tmp) / "records"), Path(tmp), size, filters, batch, steps, epochs)
            ratio = records / memory
            verdict = "ok" if ratio >= 0.95 else "SLOWER than 5% budget"
            line += (f" | records {records:6.1f} slices/s | ratio {ratio:.3f} ({verdict})"
                     f" | kerasunet train loop on records {loop:6.1f} slices/s ({loop / memory:.2f}x bare)")
        print(line, flush=True)


if __name__ == "__main__":
    main()
