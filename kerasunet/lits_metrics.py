"""Segmentation metrics as the LiTS benchmark defines them, in millimetres.

Bilic P. et al., "The Liver Tumor Segmentation Benchmark (LiTS)", Medical Image Analysis 84
(2023) 102680. The organisers scored submissions with ``medpy.metric.binary``; this module
re-implements the same formulas with scipy (so a whole evaluation needs no per-call medpy
overhead and can crop to the objects) and ``tests/kerasunet/test_lits_metrics.py`` checks
every value against ``medpy.metric.binary.dc``, ``jc``, ``assd`` and ``hd`` on random masks.

Per structure (CT: liver = label >= 1, tumour = label == 2; MRI: tumour = label >= 1), with
P the predicted and T the true voxel set:

* Dice = 2|P∩T| / (|P| + |T|);  VOE = 1 - |P∩T| / |P∪T|  (volumetric overlap error);
* RVD = (|P| - |T|) / |T|  (relative volume difference; signed, > 0 means over-segmentation);
* ASSD: mean of the distances from every surface voxel of P to the nearest surface voxel of T
  and from every surface voxel of T to the nearest of P, pooled (medpy ``assd``);
* MSSD: the maximum of those distances, i.e. the Hausdorff distance between the surfaces
  (medpy ``hd``).

A surface voxel is a mask voxel removed by one binary erosion with face connectivity (medpy's
default ``connectivity=1``); voxels on the array border count as surface, as in medpy.
Distances are Euclidean in mm using the voxel spacing.

Empty masks (documented convention; NaN values are excluded from means explicitly and counted):

==================  ====  ===  ====  ==========
case                Dice  VOE  RVD   ASSD, MSSD
==================  ====  ===  ====  ==========
P and T empty       1     0    0     0
P empty, T not      0     1    -1    NaN
T empty, P not      0     1    NaN   NaN
==================  ====  ===  ====  ==========

Dice and VOE follow ``medpy.metric.binary.dc``/``jc`` as written (both empty -> 1, so a
tumour-free case predicted tumour-free scores 1; under numpy 2 medpy 0.5.2's division no longer
raises and it returns NaN instead, which is not the intended value). RVD is
undefined for an empty truth. The LiTS scoring script set ASSD and MSSD to 0 when either mask
was empty; that rewards missing a tumour completely with a perfect distance, so here they are
NaN (undefined) when exactly one mask is empty, and reports say how many cases were excluded.

Global Dice pools all cases: 2·Σ|P∩T| / (Σ|P| + Σ|T|).

Lesion detection: lesions are the 26-connected components of the tumour masks. A true lesion
is detected when any predicted tumour voxel overlaps it (recall = detected / true lesions); a
predicted lesion is correct when it overlaps any true tumour voxel (precision = correct /
predicted lesions).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

FULL_CONNECTIVITY = np.ones((3, 3, 3), bool)
METRICS = ("dice", "voe", "rvd", "assd", "mssd")


def structure_masks(labels: np.ndarray, modality: str) -> dict[str, np.ndarray]:
    """Boolean masks of the scored structures: CT liver (>= 1) and tumour (== 2), MRI tumour (>= 1)."""
    if modality == "ct":
        return {"liver": labels >= 1, "tumour": labels == 2}
    return {"tumour": labels >= 1}


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: ``mask`` XOR its erosion (face connectivity, border counts as outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of one mask to the nearest surface voxel of the other.

    Both masks must be non-empty. Work is done on the bounding box of both masks grown by one
    voxel, which leaves every surface and distance as on the full array.

    Returns:
        ``(pred_to_truth, truth_to_pred)``, float64 1-D arrays.
    """
    # The box's one-voxel margin is background wherever the box does not reach the array
    # border, and erosion treats outside-the-array as background too: cropping changes nothing.
    box = _grown_box(pred | truth)
    pred_surface, truth_surface = surface(pred[box]), surface(truth[box])
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return to_truth[pred_surface], to_pred[truth_surface]


def _grown_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, mask.shape[axis])))
    return tuple(box)


def binary_metrics(pred: np.ndarray, truth: np.ndarray, spacing) -> dict[str, float]:
    """Dice, VOE, RVD, ASSD and MSSD (mm) of one structure, with the empty-mask convention above.

    Args:
        pred: boolean predicted mask.
        truth: boolean true mask, same shape.
        spacing: voxel size in mm per axis.

    Returns:
        The five metrics plus ``pred_voxels``, ``truth_voxels`` and ``overlap`` (voxel counts,
        which global Dice pools).
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"Expected masks of the same shape. Received: {pred.shape} and {truth.shape}")
    n_pred, n_truth = int(pred.sum()), int(truth.sum())
    overlap = int(np.count_nonzero(pred & truth))
    counts = {"pred_voxels": n_pred, "truth_voxels": n_truth, "overlap": overlap}
    if n_pred == 0 and n_truth == 0:
        return {"dice": 1.0, "voe": 0.0, "rvd": 0.0, "assd": 0.0, "mssd": 0.0, **counts}
    union = n_pred + n_truth - overlap
    values = {"dice": 2.0 * overlap / (n_pred + n_truth), "voe": 1.0 - overlap / union,
              "rvd": (n_pred - n_truth) / n_truth if n_truth else math.nan}
    if n_pred == 0 or n_truth == 0:
        return {**values, "assd": math.nan, "mssd": math.nan, **counts}
    to_truth, to_pred = surface_distances(pred, truth, spacing)
    both = np.concatenate([to_truth, to_pred])
    return {**values, "assd": float(both.mean()), "mssd": float(both.max()), **counts}


def lesion_detection(pred: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """Counts true lesions, detected ones, predicted lesions and correct ones (26-connectivity)."""
    truth_components, n_truth = ndimage.label(truth, structure=FULL_CONNECTIVITY)
    pred_components, n_pred = ndimage.label(pred, structure=FULL_CONNECTIVITY)
    detected = np.unique(truth_components[pred & (truth_components > 0)]).size
    correct = np.unique(pred_components[truth & (pred_components > 0)]).size
    return {"truth_lesions": int(n_truth), "detected_lesions": int(detected),
            "pred_lesions": int(n_pred), "correct_lesions": int(correct)}


def case_metrics(pred_labels: np.ndarray, truth_labels: np.ndarray, modality: str, spacing) -> dict[str, dict]:
    """All metrics of one case: ``{structure: {metric: value}}``; tumour also gets lesion counts."""
    preds, truths = structure_masks(pred_labels, modality), structure_masks(truth_labels, modality)
    out = {}
    for name in preds:
        out[name] = binary_metrics(preds[name], truths[name], spacing)
        if name == "tumour":
            out[name].update(lesion_detection(preds[name], truths[name]))
    return out


def global_dice(per_case: list[dict]) -> float:
    """Dice with all cases' voxels pooled; 1.0 when no case has the structure in either mask."""
    overlap = sum(m["overlap"] for m in per_case)
    total = sum(m["pred_voxels"] + m["truth_voxels"] for m in per_case)
    return 2.0 * overlap / total if total else 1.0


def mean_std(values) -> dict[str, float]:
    """Mean and (population) std of the finite values; ``n`` used and ``n_undefined`` NaN/inf left out."""
    values = np.asarray(list(values), dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0, "n_undefined": int(values.size)}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "n": int(finite.size),
            "n_undefined": int(values.size - finite.size)}


def summarize_structure(per_case: list[dict]) -> dict:
    """Summary of one structure over cases: Dice per case (mean), global Dice, mean ± std of each
    metric and, when lesion counts are present, lesion-level recall and precision."""
    summary = {"dice_per_case": mean_std(m["dice"] for m in per_case)["mean"],
               "global_dice": global_dice(per_case)}
    summary.update({name: mean_std(m[name] for m in per_case) for name in METRICS})
    if per_case and "truth_lesions" in per_case[0]:
        truth = sum(m["truth_lesions"] for m in per_case)
        pred = sum(m["pred_lesions"] for m in per_case)
        summary["lesion_recall"] = sum(m["detected_lesions"] for m in per_case) / truth if truth else math.nan
        summary["lesion_precision"] = sum(m["correct_lesions"] for m in per_case) / pred if pred else math.nan
        summary["truth_lesions"], summary["pred_lesions"] = truth, pred
    return summary
