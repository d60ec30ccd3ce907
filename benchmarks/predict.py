"""Benchmark of ``kerasunet predict``: seconds per volume, slices/s, and predict's own overhead.

Builds a CT phantom (``kerasunet.synth``, default 512x512x100) and an untrained U-Net
(default filters 32, depth 4) in a temporary run folder, then times:

1. what ``predict_path`` does per volume (model already loaded), without TTA: load,
   normalise, 2.5D stacks, padding, model calls, labels, post-processing, atomic NIfTI write;
2. the bare model's batched call (``predict_on_batch``) on the same prepared slices.

Overhead = (1 - 2) / 1, the share of the time predict spends outside the network (target
< 15%). Weights are random: the timing does not depend on them, but post-processing then
sees whatever the untrained net outputs. Run with small options for a quick check::

    python benchmarks/predict.py --size 128 --slices 24 --filters 8 --depth 3
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

    channels = 2 * context + 1
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


@click.command()
@click.option("--size", default=512, show_default=True, help="In-plane size of the phantom.")
@click.option("--slices", default=100, show_default=True, help="Axial slices of the phantom.")
@click.option("--filters", default=32, show_default=True, help="U-Net filters of the first level.")
@click.option("--depth", default=4, show_default=True, help="U-Net depth.")
@click.option("--context", default=0, show_default=True, help="2.5D context K (2K+1 channels).")
@click.option("--batch-size", default=16, show_default=True, help="Slices per model call.")
def main(size, slices, filters, depth, context, batch_size):
    """Time predict on one phantom volume and compare with the bare model."""
    from kerasunet.predict import PredictSettings, load_predictor

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "run").mkdir()
        volume = make_volume(tmp / "data", size, slices)
        model, info = load_predictor(make_run(tmp / "run", filters, depth, context))
        settings = PredictSettings(batch_size=batch_size)
        # warm-up: traces the predict function for the full and the last (partial) batch shape
        predict_one_volume(model, info, volume, tmp / "warm.nii", settings)
        bare_model_seconds(model, info, volume, batch_size)

        start = time.perf_counter()
        predict_one_volume(model, info, volume, tmp / "mask.nii", settings)
        total = time.perf_counter() - start
        bare = bare_model_seconds(model, info, volume, batch_size)
    print(f"phantom {size}x{size}x{slices}, U-Net filters {filters} depth {depth}, context {context}, "
          f"batch {batch_size}, no TTA")
    print(f"predict:    {total:.2f} s per volume, {slices / total:.1f} slices/s")
    print(f"bare model: {bare:.2f} s, {slices / bare:.1f} slices/s (batched predict_on_batch)")
    print(f"overhead:   {100 * max(total - bare, 0.0) / total:.1f}% of predict's time (target < 15%)")


if __name__ == "__main__":
    main()
