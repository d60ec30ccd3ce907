"""How cost grows: record building with workers, predict with slices, scoring with image size (not a test).

Three measurements in one run, each on phantoms made here:

1. ``build-records`` (``tfrecords_builder.build.build_records``, every slice kept) on the same
   CT phantoms with 1 and with 2 worker processes: examples written per second.
2. ``predict`` (what ``predict_path`` does per volume once the model is loaded, as
   ``benchmarks/predict.py`` times it) on the same case cut to 100, 200 and 400 slices (the
   centre slices of one phantom), with an untrained U-Net: seconds per volume and per slice.
   Linear growth keeps the seconds per slice flat.
3. ``evaluate``'s per-case scoring (``kerasunet.lits_metrics.case_metrics``, ``lits2017``) on
   the phantom pair of ``benchmarks/metrics.py`` at 128x128xS and at 512x512x4S, the same shapes
   scaled by 4 along every axis: surfaces grow 16x, volumes 64x. The surface distances
   (``surface_distances`` of the two livers) are timed on their own as well; the printed exponent
   ``log(time ratio) / log(4)`` is 2 for cost that grows as the surface, 3 as the volume.

The last line holds the three ratios. Each timing is the fastest of ``--rounds``. Usage::

    python benchmarks/scaling.py                      # about 1-2 minutes on 2 cores
    python benchmarks/scaling.py --slices 100,200,400 --size 128 --filters 16 --score-slices 32
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # kerasunet, tfrecords_builder, and predict.py / metrics.py

import click  # noqa: E402
import numpy as np  # noqa: E402


def best_of(rounds: int, fn, *args) -> float:
    """The fastest of ``rounds`` wall-clock timings of ``fn(*args)`` (the least disturbed by other jobs)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def build_rates(tmp: Path, cases: int, size: int, slices: tuple[int, int], workers: tuple[int, ...],
                rounds: int) -> tuple[int, dict[int, float]]:
    """``(examples, {workers: examples per second})`` of building every slice of the same phantoms."""
    from kerasunet.data import read_manifest
    from kerasunet.synth import synth_lits
    from tfrecords_builder.build import BuildSettings, build_records

    synth_lits(tmp / "lits", cases, size=size, slices=slices, seed=0)
    rates = {}
    for n in workers:
        settings = BuildSettings(source=str(tmp / "lits"), dataset="lits", out=str(tmp / f"records-{n}"),
                                 all_slices=True, val_fraction=0.0, test_fraction=0.0, workers=n, overwrite=True,
                                 context=0)  # single slices, as benchmarks/README.md records
        seconds = best_of(rounds, build_records, settings)
        examples = sum(e["num_examples"] for e in read_manifest(settings.out)["splits"].values())
        rates[n] = examples / seconds
    return examples, rates


def cut_volumes(tmp: Path, size: int, counts: list[int]) -> dict[int, Path]:
    """The centre ``n`` slices of one phantom of ``max(counts)`` slices, for each ``n``, as NIfTI files."""
    import nibabel as nib

    from predict import make_volume

    source = nib.load(str(make_volume(tmp / "case", size, max(counts))))
    data = np.asarray(source.dataobj)
    paths = {}
    for n in counts:
        start = (data.shape[2] - n) // 2
        paths[n] = tmp / f"case-{n}.nii"
        nib.save(nib.Nifti1Image(data[:, :, start:start + n], source.affine, source.header), str(paths[n]))
    return paths


def predict_seconds(tmp: Path, size: int, counts: list[int], filters: int, depth: int, batch: int,
                    rounds: int) -> dict[int, float]:
    """Seconds per volume of predict (model loaded once, warmed up) for each slice count."""
    from kerasunet.predict import PredictSettings, load_predictor
    from predict import make_run, predict_one_volume

    volumes = cut_volumes(tmp, size, counts)
    (tmp / "run").mkdir()
    model, info = load_predictor(make_run(tmp / "run", filters, depth, 0), "keras")
    settings = PredictSettings(batch_size=batch)
    predict_one_volume(model, info, volumes[min(counts)], tmp / "warm.nii", settings)  # traces the batch shapes
    return {n: best_of(rounds, predict_one_volume, model, info, volumes[n], tmp / f"mask-{n}.nii", settings)
            for n in counts}


def scoring_seconds(size: int, slices: int, rounds: int) -> dict:
    """Per-case scoring and liver surface-distance seconds, with surface and volume voxel counts."""
    from kerasunet.lits_metrics import case_metrics, surface, surface_distances
    from metrics import SPACING, phantom_pair

    pred, truth = phantom_pair(size, slices)
    liver_pred, liver_truth = pred >= 1, truth >= 1
    return {"case": best_of(rounds, case_metrics, pred, truth, "ct", SPACING, "lits2017"),
            "surface_distances": best_of(rounds, surface_distances, liver_pred, liver_truth, SPACING),
            "surface_voxels": int(np.count_nonzero(surface(liver_truth))),
            "volume_voxels": int(np.count_nonzero(liver_truth))}


@click.command()
@click.option("--build-cases", default=4, show_default=True, help="CT phantoms built with 1 and 2 workers.")
@click.option("--build-size", default=256, show_default=True, help="In-plane size of the build phantoms.")
@click.option("--build-slices", default="48,64", show_default=True, help="MIN,MAX slices of the build phantoms.")
@click.option("--slices", default="100,200,400", show_default=True, help="Slice counts of the predicted case.")
@click.option("--size", default=64, show_default=True, help="In-plane size of the predicted case.")
@click.option("--filters", default=8, show_default=True, help="U-Net filters of the first level (predict).")
@click.option("--depth", default=4, show_default=True, help="U-Net depth (predict).")
@click.option("--batch-size", default=16, show_default=True, help="Slices per model call (predict).")
@click.option("--score-sizes", default="128,512", show_default=True, help="SMALL,LARGE in-plane sizes scored.")
@click.option("--score-slices", default=16, show_default=True,
              help="Slices of the small scored pair; the large one has SMALL/LARGE times more in every axis.")
@click.option("--rounds", default=2, show_default=True, help="Timed runs of each measurement; the fastest counts.")
def main(build_cases, build_size, build_slices, slices, size, filters, depth, batch_size, score_sizes,
         score_slices, rounds):
    """Times build-records with 1 and 2 workers, predict at three slice counts, scoring at two sizes."""
    lo, hi = (int(v) for v in build_slices.split(","))
    counts = sorted(int(v) for v in slices.split(","))
    small, large = (int(v) for v in score_sizes.split(","))
    scale = large / small
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        examples, rates = build_rates(tmp / "build", build_cases, build_size, (lo, hi), (1, 2), rounds)
        print(f"build-records, {build_cases} phantoms {build_size}x{build_size}x{lo}-{hi}, {examples} examples "
              f"(every slice), best of {rounds}:", flush=True)
        for n, rate in rates.items():
            print(f"  {n} worker(s): {rate:.1f} slices/s")
        seconds = predict_seconds(tmp / "predict", size, counts, filters, depth, batch_size, rounds)
    print(f"predict, one {size}x{size} case cut to {counts} slices, U-Net filters {filters} depth {depth}, "
          f"batch {batch_size}, best of {rounds}:", flush=True)
    for n, s in seconds.items():
        print(f"  {n} slices: {s:.2f} s per volume, {1000 * s / n:.1f} ms per slice")
    scores = {s: scoring_seconds(s, round(score_slices * s / small), rounds) for s in (small, large)}
    print(f"evaluate (lits2017 case_metrics), phantom pairs {small}²x{score_slices} and "
          f"{large}²x{round(score_slices * scale)} (x{scale:g} along every axis), best of {rounds}:")
    for s, r in scores.items():
        print(f"  {s}²: case {r['case']:.2f} s, liver surface distances {r['surface_distances']:.2f} s; "
              f"liver surface {r['surface_voxels']} voxels, volume {r['volume_voxels']} voxels")
    growth = {k: scores[large][k] / scores[small][k] for k in ("case", "surface_distances", "surface_voxels",
                                                                 "volume_voxels")}
    print(f"  growth {large}²/{small}²: surface x{growth['surface_voxels']:.1f}, "
          f"volume x{growth['volume_voxels']:.1f}, "
          f"case time x{growth['case']:.1f} (exponent {math.log(growth['case'], scale):.2f}), surface distances "
          f"x{growth['surface_distances']:.1f} (exponent {math.log(growth['surface_distances'], scale):.2f}; "
          "2 = as the surface, 3 = as the volume)")
    per_slice = (seconds[counts[-1]] / counts[-1]) / (seconds[counts[0]] / counts[0])
    print(f"ratios: build 2 / 1 workers {rates[2] / rates[1]:.2f}x; predict per slice {counts[-1]} / {counts[0]} "
          f"slices {per_slice:.2f}x (1.00 = linear); scoring {large}² / {small}² {growth['case']:.1f}x "
          f"(surface x{growth['surface_voxels']:.1f}, volume x{growth['volume_voxels']:.1f})")


if __name__ == "__main__":
    main()
