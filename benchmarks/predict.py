"""Benchmark of ``kerasunet predict``: the Keras engine against onnxruntime, and predict's overhead.

Builds a CT phantom (``kerasunet.synth``, default 128x128x64) and an untrained U-Net
(default filters 16, depth 4) in a temporary run folder, writes its ``model.onnx``
(``kerasunet.onnx_engine``, as ``kerasunet export --format onnx`` does), then times, for each
engine (``keras``: the ``.keras`` model under TensorFlow; ``onnx``: onnxruntime on CPU):

1. what ``predict_path`` does per volume (model already loaded), without TTA: load,
   normalise, 2.5D stacks, padding, model calls, labels, post-processing, atomic NIfTI write;
2. the bare model's batched call (``predict_on_batch``) on the same prepared slices.

Overhead = (1 - 2) / 1, the share of the time predict spends outside the network (target
< 15%). Both engines run in this one process on the same volume, so their ratio, printed
last, holds even when the machine's load moves the absolute times. Weights are random: the
timing does not depend on them. The defaults keep ``make bench`` short; the LiTS-sized case::

    python benchmarks/predict.py --size 512 --slices 100 --filters 32 --depth 4 --rounds 1
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np


def make_volume(folder: Path, size: int, slices: int) -> Path:
    """A CT phantom from ``kerasunet.synth`` (random HU noise if it is unavailable)."""
    try:
        from kerasunet.synth import synth_lits

        return synth_lits(folder, 1, size=size, slices=(slices, slices))[0]
    except ImportError:
        import nibabel as nib

        data = np.random.default_rng(0).normal(40, 200, size=(size, size, slices)).astype(np.float32)
        path = folder / "volume-0.nii"
        nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))
        return path


def make_run(folder: Path, filters: int, depth: int, context: int) -> Path:
    """An untrained U-Net saved as a run folder (best.keras + config.json)."""
    from kerasunet.model import build_unet
    from kerasunet.core.preprocessing import NormSettings
    from kerasunet.core.records_format import context_channels

    channels = context_channels(context)
    build_unet((None, None, channels), 2, filters=filters, depth=depth).save(folder / "best.keras")
    config = {"model": {"input_channels": channels, "num_outputs": 2, "filters": filters, "depth": depth,
                        "dropout": 0.5},
              "data": {"modality": "ct", "context": context, "norm": NormSettings("ct").to_dict(), "image_size": None}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def bare_model_seconds(model, info, volume_path: Path, batch_size: int) -> float:
    """Seconds for the model's batched calls alone on the volume's prepared slices."""
    from kerasunet.core.nifti import load_volume
    from kerasunet.predict import slice_batch
    from kerasunet.core.preprocessing import case_stats, normalize_np

    volume = load_volume(volume_path)
    stats = case_stats(volume.data, info.norm)
    slices = normalize_np(np.ascontiguousarray(np.moveaxis(volume.data, 2, 0)), stats)
    step = 2**info.depth
    padded = tuple(-(-s // step) * step for s in slices.shape[1:])
    batches = [slice_batch(slices, np.arange(i, min(i + batch_size, len(slices))), info.context, padded, -1.0)
               for i in range(0, len(slices), batch_size)]
    start = time.perf_counter()
    for batch in batches:
        model.predict_on_batch(batch)
    return time.perf_counter() - start


def predict_one_volume(model, info, volume_path: Path, out: Path, settings) -> None:
    """What ``predict_path`` does per volume once the model is loaded: read, segment, write."""
    from kerasunet.core.nifti import load_volume, save_like
    from kerasunet.predict import predict_volume

    volume = load_volume(volume_path)
    labels, _ = predict_volume(model, info, volume, settings)
    save_like(labels, volume, out, dtype=np.uint8)


def time_engine(model, info, volume: Path, out: Path, batch_size: int) -> tuple[float, float]:
    """(predict seconds per volume, bare model seconds) of one timed run."""
    from kerasunet.predict import PredictSettings

    start = time.perf_counter()
    predict_one_volume(model, info, volume, out, PredictSettings(batch_size=batch_size))
    total = time.perf_counter() - start
    return total, bare_model_seconds(model, info, volume, batch_size)


@click.command()
@click.option("--size", default=128, show_default=True, help="In-plane size of the phantom.")
@click.option("--slices", default=64, show_default=True, help="Axial slices of the phantom.")
@click.option("--filters", default=16, show_default=True, help="U-Net filters of the first level.")
@click.option("--depth", default=4, show_default=True, help="U-Net depth.")
@click.option("--context", default=0, show_default=True, help="2.5D context K (2K+1 channels).")
@click.option("--batch-size", default=16, show_default=True, help="Slices per model call.")
@click.option("--rounds", default=3, show_default=True,
              help="Timed runs per engine, taken in turn; the fastest counts (the least disturbed by other jobs).")
def main(size, slices, filters, depth, context, batch_size, rounds):
    """Time predict on one phantom volume with the Keras and the onnxruntime engine."""
    from kerasunet.onnx_engine import onnx_model_of, write_onnx
    from kerasunet.predict import load_predictor

    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "run").mkdir()
        volume = make_volume(tmp / "data", size, slices)
        run = make_run(tmp / "run", filters, depth, context)
        write_onnx(onnx_model_of(run), run)
        engines = {engine: load_predictor(run, engine) for engine in ("keras", "onnx")}
        for engine, (model, info) in engines.items():  # warm-up: traces the full and the last batch shape
            time_engine(model, info, volume, tmp / "warm.nii", batch_size)
        for _ in range(rounds):
            for engine, (model, info) in engines.items():
                run_times = time_engine(model, info, volume, tmp / f"mask-{engine}.nii", batch_size)
                times[engine] = tuple(map(min, zip(times.get(engine, run_times), run_times)))
    print(f"phantom {size}x{size}x{slices}, U-Net filters {filters} depth {depth}, context {context}, "
          f"batch {batch_size}, no TTA, fastest of {rounds} rounds")
    for engine, (total, bare) in times.items():
        print(f"{engine:>5} predict:    {total:.2f} s per volume, {slices / total:.1f} slices/s")
        print(f"{engine:>5} bare model: {bare:.2f} s, {slices / bare:.1f} slices/s (batched predict_on_batch)")
        print(f"{engine:>5} overhead:   {100 * max(total - bare, 0.0) / total:.1f}% of predict's time "
              "(target < 15%)")
    print(f"onnxruntime / keras, predict slices/s: {times['keras'][0] / times['onnx'][0]:.2f}x")


if __name__ == "__main__":
    main()
