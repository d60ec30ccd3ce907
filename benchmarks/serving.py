"""Benchmark of served prediction: a volume through TF Serving's REST and gRPC APIs vs local predict.

Builds a CT phantom (``kerasunet.synth``, default 512x512x100) and an untrained U-Net
(default filters 32, depth 4, context 1: 3 channels) in a temporary run folder, exports it
(``kerasunet export``) and times one volume, the model already loaded and warmed up:

1. local: ``kerasunet.predict.predict_volume`` (normalise, 2.5D stacks, model calls in
   batches of ``--batch-size``, labels, post-processing);
2. REST: ``predict_volume_served`` against ``tests.helpers.ServingDouble``, the REST test
   double on 127.0.0.1 (JSON numbers both ways, ``--batch-size`` slices per request);
3. gRPC: the same against ``tests.helpers.GrpcServingDouble`` (tensor protos; requests cut
   to fit ``--grpc-max-message-mb``: one 512x512x3 slice per request at gRPC's default 4 MiB).

The doubles run the exported SavedModel with TensorFlow in this process, so client and
"server" share the machine, as with a server on localhost; they are not TF Serving. The last
line is the ratio of each served path to local predict (goal for gRPC: within 1.2x). Quick
check::

    python benchmarks/serving.py --size 128 --slices 16 --filters 8 --depth 3
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: tests.helpers too


def timed(fn, repeats: int) -> tuple[float, object]:
    """The fastest of ``repeats`` calls of ``fn`` in seconds, and its last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


@click.command()
@click.option("--size", default=512, show_default=True, help="In-plane size of the phantom.")
@click.option("--slices", default=100, show_default=True, help="Axial slices of the phantom.")
@click.option("--filters", default=32, show_default=True, help="U-Net filters of the first level.")
@click.option("--depth", default=4, show_default=True, help="U-Net depth.")
@click.option("--context", default=1, show_default=True, help="2.5D context K (2K+1 channels).")
@click.option("--batch-size", default=16, show_default=True, help="Slices per model call / REST request.")
@click.option("--grpc-max-message-mb", default=4.0, show_default=True, help="gRPC message limit (client and double).")
@click.option("--repeats", default=1, show_default=True, help="Timed runs per path (the fastest is kept).")
@click.option("--timeout", default=900.0, show_default=True, help="Seconds to wait for each served answer.")
@click.option("--skip-rest", is_flag=True, help="Leave out REST (JSON of a 512x512x100 volume is slow).")
def main(size, slices, filters, depth, context, batch_size, grpc_max_message_mb, repeats, timeout, skip_rest):
    """Time one volume through local predict, REST and gRPC; one line per path as it finishes."""
    from benchmarks.predict import make_run, make_volume
    from kerasunet.core.nifti import load_volume
    from kerasunet.core.records_format import context_channels
    from kerasunet.export import export_model
    from kerasunet.postprocess import PostprocessSettings
    from kerasunet.predict import PredictSettings, load_predictor, predict_volume, predict_volume_served
    from kerasunet.serving_client import fetch_model
    from tests.helpers import GrpcServingDouble, ServingDouble

    limit = int(grpc_max_message_mb * 2**20)
    settings = PredictSettings(batch_size=batch_size, postprocess=PostprocessSettings())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "run").mkdir()
        volume = load_volume(make_volume(tmp / "data", size, slices))
        run = make_run(tmp / "run", filters, depth, context)
        export_model(run, tmp / "saved_models" / "bench")
        model, info = load_predictor(run)
        # Warm-up on the first batch only: it has every shape a whole volume runs (local predict pads
        # the last batch to the full size; gRPC at 4 MiB sends single slices), and the doubles load
        # the SavedModel on their first request.
        first = dataclasses.replace(volume, data=volume.data[:, :, :batch_size])
        print(f"phantom {size}x{size}x{slices}, U-Net filters {filters} depth {depth}, context {context} "
              f"({context_channels(context)} channels), batch {batch_size}, post-processing on", flush=True)
        predict_volume(model, info, first, settings)
        seconds, masks = {}, {}
        seconds["local"], (masks["local"], _) = timed(lambda: predict_volume(model, info, volume, settings), repeats)
        print(f"local: {seconds['local']:.2f} s per volume, {slices / seconds['local']:.1f} slices/s", flush=True)
        doubles = [("gRPC", GrpcServingDouble(tmp / "saved_models" / "bench", max_receive_bytes=limit), limit)]
        if not skip_rest:
            doubles.append(("REST", ServingDouble(tmp / "saved_models" / "bench"), None))
        for name, double, max_bytes in doubles:
            with double, fetch_model(double.url, "bench", label="stable", max_message_bytes=max_bytes) as served:
                predict_volume_served(served, first, settings, timeout)
                double.requests.clear()
                seconds[name], (masks[name], _) = timed(
                    lambda: predict_volume_served(served, volume, settings, timeout), repeats)
                requests = sum(1 for r in double.requests if r[0] in ("Predict", "POST")) // repeats
            same = "equal to" if np.array_equal(masks[name], masks["local"]) else "DIFFERS from"
            print(f"{name}: {seconds[name]:.2f} s per volume, {slices / seconds[name]:.1f} slices/s, {requests} "
                  f"requests, mask {same} local", flush=True)
    print("ratio to local predict: " + ", ".join(f"{name} {seconds[name] / seconds['local']:.2f}x"
                                                 for name in seconds if name != "local"))


if __name__ == "__main__":
    main()
