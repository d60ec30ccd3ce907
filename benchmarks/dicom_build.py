"""Record building from a DICOM series vs the same case as ``.nii.gz``, per slice.

Writes one CT phantom (``kerasunet.synth``, 512×512×130 by default) twice: as the ``dicom``
layout's series (one file per slice, written with SimpleITK, as ``synth --layout dicom`` does)
and as its NIfTI twin in the LiTS layout (``.nii.gz``). Then builds the records of each,
``--repeats`` times, with one in-process worker and every slice kept, checks that both builds
hold the same examples, and prints the best wall time per slice of each and, last, the time
ratio DICOM / NIfTI (the target is no slower: at most 1.0) and its inverse, the speed of DICOM
relative to NIfTI (at least 1.0).

Also prints the time of reading the volume alone (``load_image``: the SimpleITK series reader
vs nibabel), the part of a build that differs between the two.

Usage: ``python benchmarks/dicom_build.py [--size 512] [--slices 130] [--repeats 3]``. Not a
test: it prints figures and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _examples(out: Path, manifest: dict) -> list[dict]:
    """The stored examples' features, less the ones that name the case (its id differs by layout)."""
    import tensorflow as tf

    files = [str(out / s["file"]) for entry in manifest["splits"].values() for s in entry["shards"]]
    examples = []
    for record in tf.data.TFRecordDataset(files):
        features = tf.train.Example.FromString(record.numpy()).features.feature
        examples.append({k: v.SerializeToString() for k, v in features.items()
                         if k not in ("image/source_id", "image/case_id")})
    return examples


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the phantom")
    parser.add_argument("--slices", type=int, default=130)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from kerasunet.core.cases import load_image
    from kerasunet.synth import CtSettings
    from kerasunet.synth_layouts import synth_layout
    from tfrecords_builder.build import BuildSettings, build_records

    ct = CtSettings(args.size, (args.slices, args.slices))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        synth_layout("dicom", tmp / "dicom", 1, ct=ct)
        synth_layout("lits", tmp / "lits", 1, ct=ct, compress=True)
        print(f"phantom {args.size}x{args.size}x{args.slices} written as DICOM and .nii.gz in "
              f"{time.perf_counter() - start:.1f} s")
        read = {"dicom": tmp / "dicom" / "case00", "nifti": tmp / "lits" / "volume-0.nii.gz"}
        per_read = {name: _best(lambda p=path: load_image(p), args.repeats) for name, path in read.items()}
        built, per_slice = {}, {}
        for name, (layout, folder) in {"dicom": ("dicom", "dicom"), "nifti": ("lits", "lits")}.items():
            out = tmp / f"records-{name}"

            def build(layout=layout, folder=folder, out=out):
                settings = BuildSettings(source=str(tmp / folder), dataset=layout, out=str(out), workers=1,
                                         val_fraction=0.0, test_fraction=0.0, all_slices=True, overwrite=True,
                                         context=0)  # single slices, as benchmarks/README.md records
                built[name] = build_records(settings)

            seconds = _best(build, args.repeats)
            per_slice[name] = seconds / built[name]["splits"]["train"]["num_examples"]
            print(f"{name}: read {per_read[name]:.2f} s; build {seconds:.2f} s, "
                  f"{1000 * per_slice[name]:.1f} ms/slice (best of {args.repeats})")
        dicom, nifti = (_examples(tmp / f"records-{n}", built[n]) for n in ("dicom", "nifti"))
        same = len(dicom) == len(nifti) and dicom == nifti  # case ids differ (case00, volume-0), slices must not
        print(f"same examples: {same}")
        print(f"ratio DICOM / NIfTI per slice: {per_slice['dicom'] / per_slice['nifti']:.2f} (time; target <= 1.0)")
        print(f"DICOM speed relative to NIfTI: {per_slice['nifti'] / per_slice['dicom']:.2f}x (target >= 1.0x)")


if __name__ == "__main__":
    main()
