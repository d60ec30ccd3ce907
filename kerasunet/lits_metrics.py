"""Per-case segmentation metrics in two named conventions, distances in millimetres.

``lits2017`` reproduces the scoring program of the LiTS MICCAI 2017 challenge
(github.com/PatrickChrist/lits-challenge-scoring: ``program/evaluate.py``,
``program/helpers/calc_metric.py``, ``program/helpers/surface.py``; Bilic P. et al., "The Liver
Tumor Segmentation Benchmark (LiTS)", Medical Image Analysis 84 (2023) 102680). It is the
default for LiTS-style CT labels. ``medpy`` is the per-case convention of
``medpy.metric.binary`` 0.5 (``dc``, ``jc``, ``ravd(prediction, truth)``, ``assd``, ``hd``),
which kerasunet used before and keeps for MRI. ``docs/metrics.md`` states both in full; in short,
with P the predicted and T the true voxel set of one object:

=====================  ====================================  ======================================
                       lits2017                              medpy
=====================  ====================================  ======================================
surface voxels         mask minus its erosion by the         the same with the 6-neighbourhood
                       18-neighbourhood                      (``generate_binary_structure(3, 1)``)
                       (``generate_binary_structure(3, 2)``)
RVD                    (|T| - |P|) / |P|                     (|P| - |T|) / |T|
ASSD / MSSD / RMSD     mean / max / root mean square of the pooled nearest-surface distances
                       of both surfaces (the organisers name MSSD "MSD")
P or T empty           Dice 0, VOE 1, RVD = ASSD = MSSD =    Dice 0, VOE 1, RVD -1 (T empty:
                       RMSD = 9001 (:data:`LARGE`)           NaN), distances NaN (undefined)
P and T empty          no object of the program (here: as    Dice 1, VOE 0, the rest 0
                       one mask empty)
liver                  label >= 1, scored only when some     label >= 1
                       voxel of the prediction is 1, else
                       Dice 0, VOE 1, the rest 9001
tumour                 per case Dice (1 when both empty),    per case on the whole tumour mask
                       then VOE, RVD, ASSD, MSSD, RMSD per
                       detected lesion (:func:`match_lesions`)
lesions                6-connected components; predicted     26-connected components; a true lesion
                       components merged onto the true       is detected when any predicted voxel
                       lesions by overlap; detected when     touches it, a predicted one is correct
                       IoU > 0.5 (and the "> 0" variant)     when it touches a true one
tumour burden error    burden(T) - burden(P), burden =       the same; NaN when a mask has no liver
                       |label 2| / |label >= 1|; burden(P)
                       = 9001 when no predicted voxel is 1
=====================  ====================================  ======================================

Distances are Euclidean in mm, found with a k-d tree over the surface voxels of the two masks
cropped to their bounding box (erosion treats outside the array as background, so the crop
changes nothing). For a liver this is an order of magnitude faster than a distance transform of
the box. Lesion ids follow scipy's raster order of the array as given; score label maps in their
stored voxel order (:func:`kerasunet.lits_scoring.score_volume` does) to number lesions as the
organisers' program does, since its matching depends on that order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, spatial

from kerasunet.core.labels import as_outputs, label_values

CONVENTIONS = ("lits2017", "medpy")
LARGE = 9001.0  # the organisers' value for a metric that has no value (an empty mask)
METRICS = ("dice", "voe", "rvd", "assd", "mssd", "rmsd")
DISTANCES = ("assd", "mssd", "rmsd")
SURFACE_CONNECTIVITY = {"lits2017": 2, "medpy": 1}
DETECTION_IOU = 0.5  # lits2017: a lesion is detected when IoU > this; also reported for IoU > 0
LESION_CONNECTIVITY = {"lits2017": 1, "medpy": 3}


def check_convention(convention: str) -> str:
    """Returns ``convention`` if it is one of :data:`CONVENTIONS`.

    Raises:
        ValueError: an unknown convention.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"Expected convention in {CONVENTIONS}. Received: convention={convention!r}")
    return convention


def default_convention(modality: str) -> str:
    """``lits2017`` for CT (LiTS labels 0/1/2), ``medpy`` for MRI (the organisers scored CT only)."""
    return "lits2017" if modality == "ct" else "medpy"


def structure_masks(labels: np.ndarray, outputs) -> dict[str, np.ndarray]:
    """Boolean masks of the scored structures of a label map valued for ``outputs``
    (``labels.label_values``; a modality name stands for its default structures): liver
    (>= 1) and tumour (== 2) where it holds both, tumour (>= 1) in a tumour-only map."""
    values = label_values(as_outputs(outputs))
    return {name: labels >= value for name, value in values.items()}


def surface(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Surface voxels: ``mask`` minus its erosion by ``generate_binary_structure(ndim, connectivity)``.

    Outside the array counts as background, so voxels on the array border are surface.
    """
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    return mask ^ ndimage.binary_erosion(mask, structure=structure)


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of a non-empty ``mask``.

    No margin is needed around it: erosion treats outside the array as background, so a mask's
    surface in the box is its surface in the whole array.
    """
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing, connectivity: int = 1
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of one mask to the nearest surface voxel of the other.

    Both masks must be non-empty. Each surface is found once, on the bounding box of both masks,
    and each nearest-neighbour search runs once per direction.

    Returns:
        ``(pred_to_truth, truth_to_pred)``, float64 1-D arrays.
    """
    box = bounding_box(pred | truth)
    scale = np.asarray(spacing, dtype=np.float64)
    pred_points = np.argwhere(surface(pred[box], connectivity)) * scale
    truth_points = np.argwhere(surface(truth[box], connectivity)) * scale
    to_truth = spatial.cKDTree(truth_points).query(pred_points)[0]
    to_pred = spatial.cKDTree(pred_points).query(truth_points)[0]
    return to_truth, to_pred


def distance_metrics(to_truth: np.ndarray, to_pred: np.ndarray) -> dict[str, float]:
    """ASSD, MSSD (Hausdorff distance of the surfaces) and RMSD of pooled surface distances."""
    both = np.concatenate([to_truth, to_pred])
    return {"assd": float(both.mean()), "mssd": float(both.max()), "rmsd": float(np.sqrt(np.mean(both * both)))}


def binary_metrics(pred: np.ndarray, truth: np.ndarray, spacing, convention: str = "medpy") -> dict[str, float]:
    """Dice, VOE, RVD, ASSD, MSSD and RMSD (mm) of one object in one convention (module docstring).

    Args:
        pred: boolean predicted mask.
        truth: boolean true mask, same shape.
        spacing: voxel size in mm per axis.
        convention: ``"lits2017"`` or ``"medpy"``; they differ in surfaces, RVD and empty masks.

    Returns:
        The six metrics plus ``pred_voxels``, ``truth_voxels`` and ``overlap`` (voxel counts).
    """
    check_convention(convention)
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"Expected masks of the same shape. Received: {pred.shape} and {truth.shape}")
    n_pred, n_truth = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    overlap = int(np.count_nonzero(pred & truth))
    counts = {"pred_voxels": n_pred, "truth_voxels": n_truth, "overlap": overlap}
    if n_pred == 0 or n_truth == 0:
        return {**empty_metrics(n_pred, n_truth, convention), **counts}
    dice = 2.0 * overlap / (n_pred + n_truth)
    if convention == "lits2017":  # calc_metric.compute_segmentation_scores, ravd(reference, prediction)
        values = {"dice": dice, "voe": 1.0 - dice / (2.0 - dice), "rvd": (n_truth - n_pred) / n_pred}
    else:
        values = {"dice": dice, "voe": 1.0 - overlap / (n_pred + n_truth - overlap),
                  "rvd": (n_pred - n_truth) / n_truth}
    distances = surface_distances(pred, truth, spacing, SURFACE_CONNECTIVITY[convention])
    return {**values, **distance_metrics(*distances), **counts}


def empty_metrics(n_pred: int, n_truth: int, convention: str) -> dict[str, float]:
    """The metrics of an object when the prediction or the truth (or both) is empty."""
    if convention == "lits2017":
        return {"dice": 0.0, "voe": 1.0, **{name: LARGE for name in ("rvd", *DISTANCES)}}
    if n_pred == 0 and n_truth == 0:
        return {"dice": 1.0, "voe": 0.0, "rvd": 0.0, **{name: 0.0 for name in DISTANCES}}
    return {"dice": 0.0, "voe": 1.0, "rvd": -1.0 if n_truth else math.nan, **{name: math.nan for name in DISTANCES}}


def tumour_burden_error(pred_labels: np.ndarray, truth_labels: np.ndarray, convention: str) -> dict[str, float]:
    """Tumour burden (|label 2| / |label >= 1|) of truth and prediction, and truth minus prediction.

    lits2017 (``calc_metric.compute_tumor_burden``): a prediction without any voxel labelled 1
    has burden 9001. A truth without liver has no burden (NaN; the organisers' program stops
    with a division by zero there). medpy: NaN whenever a mask has no liver voxel.
    """

    def burden(labels):
        liver = int(np.count_nonzero(labels >= 1))
        return int(np.count_nonzero(labels == 2)) / liver if liver else math.nan

    truth, pred = burden(truth_labels), burden(pred_labels)
    if convention == "lits2017" and not np.any(pred_labels == 1):
        pred = LARGE
    return {"burden_truth": truth, "burden_pred": pred, "burden_error": truth - pred}


def case_metrics(pred_labels: np.ndarray, truth_labels: np.ndarray, outputs, spacing,
                 convention: str = "medpy") -> dict[str, dict]:
    """All metrics of one case: ``{structure: {metric: value}}`` in the given convention.

    ``outputs`` are the structures both label maps hold (``labels.label_values`` gives their
    values; "ct"/"mri" stand for their default structures): one entry each. Where they hold
    liver and tumour, the tumour entry also holds the tumour burden (:func:`tumour_burden_error`).
    medpy tumour entries hold lesion counts (:func:`lesion_detection`); lits2017 ones hold detection counts and per-lesion metrics
    (:func:`lits2017_tumour`), and lits2017 liver entries say whether a liver was ``predicted``.
    """
    check_convention(convention)
    if pred_labels.shape != truth_labels.shape:
        raise ValueError(f"Expected label maps of the same shape. Received: {pred_labels.shape} "
                         f"and {truth_labels.shape}")
    preds, truths = structure_masks(pred_labels, outputs), structure_masks(truth_labels, outputs)
    out = {}
    if "liver" in preds:
        if convention == "lits2017":
            out["liver"] = lits2017_liver(preds["liver"], truths["liver"], bool(np.any(pred_labels == 1)), spacing)
        else:
            out["liver"] = binary_metrics(preds["liver"], truths["liver"], spacing, convention)
    if "tumour" in preds:
        if convention == "lits2017":
            out["tumour"] = lits2017_tumour(preds["tumour"], truths["tumour"], spacing)
        else:
            out["tumour"] = {**binary_metrics(preds["tumour"], truths["tumour"], spacing, convention),
                             **lesion_detection(preds["tumour"], truths["tumour"])}
    if "liver" in preds and "tumour" in preds:
        out["tumour"].update(tumour_burden_error(pred_labels, truth_labels, convention))
    return out


def lits2017_liver(pred: np.ndarray, truth: np.ndarray, predicted: bool, spacing) -> dict:
    """The organisers' liver scores: as an object when ``predicted`` (some voxel labelled 1), else
    Dice 0, VOE 1 and 9001 for the rest; ``predicted`` also decides global Dice pooling."""
    if predicted:
        values = binary_metrics(pred, truth, spacing, "lits2017")
    else:
        counts = {"pred_voxels": int(np.count_nonzero(pred)), "truth_voxels": int(np.count_nonzero(truth)),
                  "overlap": int(np.count_nonzero(pred & truth))}
        values = {**empty_metrics(0, 0, "lits2017"), **counts}
    return {**values, "predicted": predicted}


def lesion_detection(pred: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """medpy convention: counts true lesions, detected ones, predicted lesions and correct ones.

    Lesions are 26-connected; a true lesion is detected when any predicted voxel lies in it, a
    predicted lesion is correct when it holds any true tumour voxel.
    """
    if not (pred.any() or truth.any()):
        return {"truth_lesions": 0, "detected_lesions": 0, "pred_lesions": 0, "correct_lesions": 0}
    box = bounding_box(pred | truth)  # components inside the box are those of the whole array
    pred, truth = pred[box], truth[box]
    structure = ndimage.generate_binary_structure(truth.ndim, LESION_CONNECTIVITY["medpy"])
    truth_components, n_truth = ndimage.label(truth, structure=structure)
    pred_components, n_pred = ndimage.label(pred, structure=structure)
    detected = np.unique(truth_components[pred & (truth_components > 0)]).size
    correct = np.unique(pred_components[truth & (pred_components > 0)]).size
    return {"truth_lesions": int(n_truth), "detected_lesions": int(detected),
            "pred_lesions": int(n_pred), "correct_lesions": int(correct)}


def lits2017_tumour(pred: np.ndarray, truth: np.ndarray, spacing) -> dict:
    """The organisers' tumour scores of one case.

    Returns:
        ``dice`` (per case; 1 when both masks are empty), voxel counts, ``truth_lesions`` and
        ``pred_lesions`` (6-connected components), ``detected_lesions`` (IoU > 0.5) and
        ``detected_lesions_gt0`` (IoU > 0) as the program counts them (see
        :func:`match_lesions`), and ``lesions``: one dict of :func:`binary_metrics` per lesion
        detected at IoU > 0.5, in order of true lesion id (empty when that count is not
        positive, as in the program).
    """
    n_pred, n_truth = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    overlap = int(np.count_nonzero(pred & truth))
    out = {"dice": 1.0 if n_pred + n_truth == 0 else 2.0 * overlap / (n_pred + n_truth),
           "pred_voxels": n_pred, "truth_voxels": n_truth, "overlap": overlap,
           "truth_lesions": 0, "pred_lesions": 0, "detected_lesions": 0, "detected_lesions_gt0": 0, "lesions": []}
    if n_pred + n_truth == 0:
        return out
    box = bounding_box(pred | truth)  # labels inside the box are numbered as on the whole array
    structure = ndimage.generate_binary_structure(pred.ndim, LESION_CONNECTIVITY["lits2017"])
    pred_lab, out["pred_lesions"] = ndimage.label(pred[box], structure=structure)
    truth_lab, out["truth_lesions"] = ndimage.label(truth[box], structure=structure)
    matching = match_lesions(pred_lab, truth_lab, out["pred_lesions"], out["truth_lesions"])
    alive_gt0, out["detected_lesions_gt0"] = detected_groups(matching, 0.0)
    alive, out["detected_lesions"] = detected_groups(matching, DETECTION_IOU)
    if out["detected_lesions"] > 0:
        boxes = ndimage.find_objects(pred_lab), ndimage.find_objects(truth_lab)
        kept = sorted((group for group, keep in zip(matching.groups, alive) if keep), key=lambda group: group[3])
        out["lesions"] = [group_metrics(group[:2], (pred_lab, truth_lab), boxes, spacing) for group in kept]
    return out


@dataclass(frozen=True)
class LesionMatching:
    """Predicted lesions merged and matched onto true lesions, as ``calc_metric.detect_lesions``.

    Attributes:
        groups: per matched group, in the program's order (ascending first predicted id):
            ``(pred_ids, truth_ids, pred_rep, truth_rep, intersection, merge_count)``.
        pair_overlap: ``{(pred_id, truth_id): voxels}`` for every overlapping pair.
        pred_sizes: voxels per predicted component (index = id).
        truth_sizes: voxels per true component (index = id).
    """

    groups: list[tuple]
    pair_overlap: dict
    pred_sizes: np.ndarray
    truth_sizes: np.ndarray


def match_lesions(pred_lab: np.ndarray, truth_lab: np.ndarray, n_pred: int, n_truth: int) -> LesionMatching:
    """Merges true lesions spanned by one predicted lesion and predicted ones spanned by one true
    lesion, as the organisers' ``detect_lesions`` does, on the overlap counts alone.

    1. Only predicted components that overlap a true one take part, in ascending id order.
    2. For each predicted component p in turn, the true (merged) lesions it overlaps whose
       largest overlap is with p (first on ties) are merged into one true lesion, labelled with
       the smallest id; ``merge_count`` remembers how many were merged.
    3. Each predicted component is matched to the true lesion it overlaps most (first on ties),
       with that overlap as its intersection.
    4. Predicted components matched to the same true lesion form one group; their
       intersections add up. A group is labelled with its true lesion's id.
    """
    both = (pred_lab > 0) & (truth_lab > 0)
    pairs, counts = np.unique(np.stack([pred_lab[both], truth_lab[both]]), axis=1, return_counts=True)
    pair_overlap = {(int(p), int(g)): int(c) for p, g, c in zip(pairs[0], pairs[1], counts)}
    p_ids = np.unique(pairs[0]).astype(np.int64)
    g_ids = np.arange(1, n_truth + 1)
    inter = np.zeros((len(p_ids), n_truth), np.int64)
    for (p, g), c in pair_overlap.items():
        inter[np.searchsorted(p_ids, p), g - 1] = c
    members = {int(g): [int(g)] for g in g_ids}
    merge_count = {int(g): 1 for g in g_ids}
    for i in range(len(p_ids)):
        merge = [j for j in np.flatnonzero(inter[i]) if np.argmax(inter[:, j]) == i]
        for j in merge:
            merge_count[int(g_ids[j])] = len(merge)
        if len(merge) > 1:
            rep = int(g_ids[merge[0]])
            for j in merge[1:]:
                members[rep] += members.pop(int(g_ids[j]))
            inter[:, merge[0]] = inter[:, merge].sum(axis=1)
            inter, g_ids = np.delete(inter, merge[1:], axis=1), np.delete(g_ids, merge[1:])
    best = inter.argmax(axis=1) if len(p_ids) else np.zeros(0, int)
    value = inter[np.arange(len(p_ids)), best]
    groups = []
    for j, g in enumerate(g_ids):
        rows = np.flatnonzero(best == j)
        if rows.size:
            groups.append(([int(p) for p in p_ids[rows]], members[int(g)], int(p_ids[rows[0]]), int(g),
                           int(value[rows].sum()), merge_count[int(g)]))
    groups.sort(key=lambda group: group[2])
    return LesionMatching(groups, pair_overlap, np.bincount(pred_lab.ravel(), minlength=n_pred + 1),
                          np.bincount(truth_lab.ravel(), minlength=n_truth + 1))


def detected_groups(matching: LesionMatching, min_overlap: float) -> tuple[list[bool], int]:
    """Which groups survive ``IoU > min_overlap`` and the program's detection count.

    The loop follows ``detect_lesions`` step by step: groups are visited in order, and the union
    of a group is taken between its true lesion and the *detected-mask voxels labelled with the
    group's first predicted id* (the program compares a predicted id with labels that are true
    ids), after earlier groups were removed. A removed group lowers the count by its
    ``merge_count``, so the count can differ from the number of surviving groups.
    """
    groups = matching.groups
    by_truth_rep = {group[3]: k for k, group in enumerate(groups)}
    alive = [True] * len(groups)
    detected = len(groups)
    for i, (_, truth_ids, pred_rep, truth_rep, intersection, merge_count) in enumerate(groups):
        k = by_truth_rep.get(pred_rep)  # the group whose detected-mask label equals pred_rep
        shown = groups[k][0] if k is not None and alive[k] else []
        union = (sum(int(matching.pred_sizes[p]) for p in shown) + sum(int(matching.truth_sizes[g]) for g in truth_ids)
                 - sum(matching.pair_overlap.get((p, g), 0) for p in shown for g in truth_ids))
        if float(intersection) / union <= min_overlap:
            alive[i] = False
            detected -= merge_count
    return alive, detected


def group_metrics(ids: tuple[list, list], labels: tuple[np.ndarray, np.ndarray], boxes: tuple[list, list],
                  spacing) -> dict:
    """lits2017 :func:`binary_metrics` of one matched group: its predicted against its true lesions.

    Args:
        ids: the group's predicted and true component ids.
        labels: the predicted and true component label maps.
        boxes: ``ndimage.find_objects`` of each label map, so only the group's box is read.
        spacing: voxel size in mm per axis.
    """
    slices = [boxes[side][i - 1] for side in (0, 1) for i in ids[side]]
    box = tuple(slice(min(s[a].start for s in slices), max(s[a].stop for s in slices))
                for a in range(labels[0].ndim))
    pred, truth = (np.isin(labels[side][box], ids[side]) for side in (0, 1))
    return binary_metrics(pred, truth, spacing, "lits2017")
