"""Benchmark of per-case scoring: kerasunet's ``lits2017`` scorer against the organisers' approach.

Builds one LiTS-like phantom pair (default 512x512x500, spacing 0.8x0.8x1.0 mm): an ellipsoid
liver holding 12 spherical tumours of radius 3-20 voxels, and a prediction with the liver
shifted and resized a little, two tumours missed, one grown over its neighbour, three shifted,
and two false positives. It then times, on the same arrays:

1. ``kerasunet.lits_metrics.case_metrics(..., "lits2017")``: surfaces on the objects' bounding
   boxes, one k-d tree per surface, lesion matching on overlap counts, each lesion read from its
   own box;
2. the benchmark reference ``tests.helpers.organisers_case``, a transcription of the organisers'
   ``program/evaluate.py`` loop body (``detect_lesions`` at overlap 0 and 0.5,
   ``compute_segmentation_scores`` per detected lesion and for the liver, Dice, tumour burden).
   It is the reference the tests hold kerasunet to; the library never uses it.

Both must give the same numbers; the script checks that before printing the times and their
ratio. A full-size run needs about 4 GB of memory. Run small for a quick check::

    python benchmarks/metrics.py --size 128 --slices 64
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPACING = (0.8, 0.8, 1.0)


def ball(labels: np.ndarray, centre, radius, value: int) -> None:
    """Sets a (clipped) ball of ``radius`` voxels around ``centre`` to ``value``, slab by slab."""
    x, y = np.ogrid[:labels.shape[0], :labels.shape[1]]
    z0 = int(round(centre[2]))
    for z in range(max(z0 - int(radius), 0), min(z0 + int(radius) + 1, labels.shape[2])):
        r2 = radius**2 - (z - centre[2]) ** 2
        labels[:, :, z][(x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= r2] = value


def ellipsoid(shape, centre, radii) -> np.ndarray:
    """A boolean ellipsoid, built slab by slab to keep memory low."""
    mask = np.zeros(shape, bool)
    x, y = np.ogrid[:shape[0], :shape[1]]
    for z in range(shape[2]):
        t = 1 - ((z - centre[2]) / radii[2]) ** 2
        if t > 0:
            mask[:, :, z] = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 <= t
    return mask


def phantom_pair(size: int, slices: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(prediction, truth)`` uint8 label maps (module docstring)."""
    rng = np.random.default_rng(seed)
    shape = (size, size, slices)
    centre = np.array([0.45 * size, 0.55 * size, 0.5 * slices])
    radii = np.array([0.28 * size, 0.22 * size, 0.3 * slices])
    truth = ellipsoid(shape, centre, radii).astype(np.uint8)
    pred = ellipsoid(shape, centre + [2, -1, 1], radii * [1.02, 0.98, 1.01]).astype(np.uint8)
    scale = size / 512
    tumours = [(centre + rng.uniform(-0.55, 0.55, 3) * radii, max(rng.uniform(3, 20) * scale, 1.5))
               for _ in range(12)]
    c2, r2 = tumours[2]  # tumour 3 sits 3 voxels beside tumour 2, so one prediction can span both
    tumours[3] = (c2 + [r2 + tumours[3][1] + 3, 0, 0], tumours[3][1])
    for i, (c, r) in enumerate(tumours):
        ball(truth, c, r, 2)
        if i in (0, 1):
            continue  # missed
        if i == 2:  # grown over its neighbour: one prediction spanning two true lesions
            ball(pred, (c + tumours[3][0]) / 2, np.linalg.norm(c - tumours[3][0]) / 2 + max(r, tumours[3][1]), 2)
        elif i in (4, 5, 6):
            ball(pred, c + [r / 3, 0, 1], r, 2)
        else:
            ball(pred, c, r * 1.1, 2)
    for _ in range(2):  # false positives
        ball(pred, centre + rng.uniform(-0.5, 0.5, 3) * radii, 4 * scale + 1, 2)
    return pred, truth


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


@click.command()
@click.option("--size", default=512, show_default=True, help="In-plane size of the phantom.")
@click.option("--slices", default=500, show_default=True, help="Number of slices.")
def main(size: int, slices: int) -> None:
    """Times kerasunet's lits2017 scorer and the organisers' approach on one phantom pair."""
    from kerasunet.lits_metrics import case_metrics
    from kerasunet.lits_scoring import summarize_cases
    from tests.helpers import organisers_case, organisers_scores

    pred, truth = phantom_pair(size, slices)
    print(f"phantom {size}x{size}x{slices}: liver {np.count_nonzero(truth >= 1)} voxels, "
          f"tumour {np.count_nonzero(truth == 2)} true / {np.count_nonzero(pred == 2)} predicted voxels")
    ours_s, ours = timed(case_metrics, pred, truth, "ct", SPACING, "lits2017")
    theirs_s, theirs = timed(organisers_case, pred, truth, SPACING)
    mine, reference = summarize_cases([ours], "ct", "lits2017")["lits2017_scores"], organisers_scores([theirs])
    worst = max(abs(float(mine[k]) - float(v)) / max(1.0, abs(float(v))) for k, v in reference.items())
    if not worst <= 1e-9:
        raise SystemExit(f"the two scorers disagree: largest relative difference {worst:.3g}")
    print(f"lesions: {ours['tumour']['truth_lesions']} true, {ours['tumour']['pred_lesions']} predicted, "
          f"{ours['tumour']['detected_lesions']} detected; scores agree to {worst:.1e}")
    print(f"kerasunet lits2017 case_metrics: {ours_s:.2f} s")
    print(f"organisers' approach (benchmark reference): {theirs_s:.2f} s")
    print(f"ratio organisers / kerasunet: {theirs_s / ours_s:.1f}x")


if __name__ == "__main__":
    main()
