"""Record building: the local engine vs the Beam engine (DirectRunner) on the same phantoms.

Writes 16 CT phantoms in the LiTS layout (``kerasunet.synth``), then builds their records
twice in one run, with the same settings: ``--engine local`` (``--workers`` processes) and
``--engine beam`` (the DirectRunner, by default in multi-process mode with as many workers).
It checks that both builds hold the same examples, then prints each wall time and, last,
the ratio Beam / local (the target is within 2x on one machine).

Usage: ``python benchmarks/build.py [--cases 16] [--size 256] [--slices 48,96] [--workers 2]
[--beam-options "..."]``. Not a test: it prints figures and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _examples(out: Path, manifest: dict) -> dict:
    import tensorflow as tf

    return {split: collections.Counter(r.numpy() for r in tf.data.TFRecordDataset(
        [str(out / s["file"]) for s in entry["shards"]])) for split, entry in manifest["splits"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="in-plane size of the phantoms")
    parser.add_argument("--slices", default="48,96", help="MIN,MAX slices per phantom")
    parser.add_argument("--workers", type=int, default=2, help="local processes and Beam workers")
    parser.add_argument("--beam-options", default=None,
                        help="default: --direct_num_workers=WORKERS --direct_running_mode=multi_processing")
    args = parser.parse_args()

    from kerasunet.synth import synth_lits
    from tfrecords_builder.build import BuildSettings, build_records

    beam_options = args.beam_options
    if beam_options is None:
        beam_options = f"--direct_num_workers={args.workers} --direct_running_mode=multi_processing"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "lits"
        lo, hi = (int(v) for v in args.slices.split(","))
        synth_lits(source, args.cases, size=args.size, slices=(lo, hi), seed=0)
        times, results = {}, {}
        for engine in ("local", "beam"):
            out = Path(tmp) / engine
            settings = BuildSettings(source=str(source), dataset="lits", out=str(out), engine=engine,
                                     workers=args.workers, beam_options=beam_options if engine == "beam" else "",
                                     context=0)  # single slices, as benchmarks/README.md records
            start = time.perf_counter()
            manifest = build_records(settings)
            times[engine] = time.perf_counter() - start
            results[engine] = (manifest, _examples(out, manifest))
        examples = sum(e["num_examples"] for e in results["local"][0]["splits"].values())
        same = results["local"][1] == results["beam"][1]
        print(f"{args.cases} phantoms {args.size}x{args.size}x{lo}-{hi}, {examples} examples; "
              f"same examples per split: {same}")
        print(f"local engine ({args.workers} processes): {times['local']:.1f} s")
        print(f"beam engine (DirectRunner, {beam_options}): {times['beam']:.1f} s")
        print(f"beam / local: {times['beam'] / times['local']:.2f}x")


if __name__ == "__main__":
    main()
