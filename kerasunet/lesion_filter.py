"""False-positive control of tumour lesions on per-lesion features, after Chlebus et al. 2018.

Chlebus G. et al., "Automatic liver tumor segmentation in CT with fully convolutional neural
networks and object-based postprocessing", Scientific Reports 8, 15497 (2018), keep a
predicted lesion only when a classifier on its features (size, intensity, shape, position)
says it is one. Here the features are few and each has a documented threshold, chosen on
validation cases by :func:`fit_lesion_filter` rather than trained as a forest:

==================  ==========================================================================
feature             meaning
==================  ==========================================================================
``volume_mm3``      the lesion's volume in mm³ (voxel count times voxel volume)
``mean_prob``       the mean tumour probability over the lesion's voxels
``depth_mm``        how deep the lesion reaches into the liver: the largest distance (mm) from
                    one of its voxels to the nearest voxel outside the liver (label >= 1);
                    NaN without a liver (MRI)
``contrast``        ``|mean(ring) - mean(lesion)| / std(ring)`` of the input image, the ring
                    being the liver voxels (label 1) within :data:`RING_MM` of the lesion; NaN
                    without a liver or a ring
==================  ==========================================================================

A lesion is one 26-connected component of the tumour mask (the tumour's value in a label map
of ``outputs``, :func:`kerasunet.core.labels.label_values`: 2 with liver, 1 tumour-only), as
in :mod:`kerasunet.postprocess`. A lesion is kept when every feature is at least its
threshold; a NaN feature passes. Dropped lesions become liver where the labels hold liver,
else background.

In ``predict``/``evaluate`` the filter runs after the post-processing when given
``--lesion-filter FILE``: a JSON object of the four thresholds (:func:`read_lesion_filter`),
as :func:`fit_lesion_filter` chooses them on validation cases (:func:`fit_on_cases`, which
``benchmarks/quality.py`` and training use) or as a user sets them. Every run with a tumour
output (a whole-slice run, a cascade's second stage, a 3D run) fits its own at the end of
training (:func:`fit_run_lesion_filter`, the run folder's ``lesion_filter.json``) and
predict/evaluate apply it unless given ``--lesion-filter FILE`` or ``--no-lesion-filter``
(:func:`run_lesion_filter`). A run's own volume threshold is at least
:data:`LABEL_SIZE_FRACTION` of the smallest lesion in its training labels, unless validation
finds a smaller true one (:func:`with_size_floor`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from kerasunet.core.labels import label_values
from kerasunet.postprocess import FULL_CONNECTIVITY

FEATURES = ("volume_mm3", "mean_prob", "depth_mm", "contrast")
RING_MM = 5.0  # width of the shell of surrounding liver that ``contrast`` compares with
# A run's own volume threshold is at least this fraction of the smallest lesion in its training
# and validation labels (unless validation finds a smaller true one): what the annotators
# outlined defines the smallest lesion the task counts. A quarter leaves room for lesions
# smaller than any in a few training cases and for found lesions predicted at half their size.
LABEL_SIZE_FRACTION = 0.25
CT_OUTPUTS = ("liver", "tumour")


def tumour_label(outputs) -> int:
    """The tumour's value in a label map of ``outputs``."""
    return label_values(outputs)["tumour"]


@dataclass(frozen=True)
class LesionFilter:
    """Lower bounds on the features of :data:`FEATURES`; the defaults keep every lesion.

    Attributes:
        volume_mm3: smallest lesion volume kept, mm³.
        mean_prob: smallest mean tumour probability kept.
        depth_mm: smallest depth into the liver kept, mm.
        contrast: smallest contrast to the surrounding liver kept (in the ring's std).
    """

    volume_mm3: float = 0.0
    mean_prob: float = 0.0
    depth_mm: float = 0.0
    contrast: float = 0.0

    def __post_init__(self):
        for name in FEATURES:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Expected a finite {name} >= 0. Received: {name}={value!r}")

    def keeps(self, features: dict) -> bool:
        """Whether a lesion with these features passes every threshold (NaN passes)."""
        return all(not features[name] < getattr(self, name) for name in FEATURES)

    def to_dict(self) -> dict:
        return asdict(self)


def lesion_features(labels: np.ndarray, tumour_prob: np.ndarray, image: np.ndarray, spacing,
                    outputs=CT_OUTPUTS) -> tuple[np.ndarray, list[dict]]:
    """The lesions of a label volume and their features.

    Args:
        labels: uint8 label volume ``(x, y, z)`` in the dataset's convention.
        tumour_prob: the tumour channel's probabilities, same shape.
        image: the input volume (HU for CT), same shape.
        spacing: voxel size in mm per axis.
        outputs: the structures the labels hold (which value is tumour; whether there is a liver).

    Returns:
        ``(components, features)``: the lesion id of each voxel (0 outside lesions) and one
        dict of :data:`FEATURES` per lesion, in id order (lesion ``i`` is ``features[i - 1]``).
    """
    if not labels.shape == tumour_prob.shape == image.shape:
        raise ValueError(f"Expected labels, probabilities and image of one shape. Received: {labels.shape}, "
                         f"{tumour_prob.shape} and {image.shape}")
    spacing = np.asarray(spacing, dtype=np.float64)
    components, _ = ndimage.label(labels == tumour_label(outputs), structure=FULL_CONNECTIVITY)
    depth = liver_depth(labels >= 1, spacing) if "liver" in outputs else None
    grow = np.ceil(RING_MM / spacing).astype(int)
    features = []
    for index, box in enumerate(ndimage.find_objects(components), 1):
        lesion = components[box] == index
        row = {"volume_mm3": float(lesion.sum() * np.prod(spacing)),
               "mean_prob": float(tumour_prob[box][lesion].mean()), "depth_mm": math.nan, "contrast": math.nan}
        if depth is not None:
            row["depth_mm"] = float(depth[box][lesion].max())
            row["contrast"] = ring_contrast(index, box, components, labels, image, spacing, grow)
        features.append(row)
    return components, features


def liver_depth(liver: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) of each voxel to the nearest voxel outside ``liver``; 0 outside it.

    One distance transform over the liver's bounding box padded by a voxel of background:
    everything beyond the box is outside the liver, so the crop changes nothing.
    """
    depth = np.zeros(liver.shape, np.float64)
    if not liver.any():
        return depth
    box = bounding_box(liver)
    inside = np.pad(liver[box], 1, constant_values=False)
    depth[box] = ndimage.distance_transform_edt(inside, sampling=spacing)[(slice(1, -1),) * liver.ndim]
    return depth


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of a non-empty ``mask``."""
    return ndimage.find_objects(mask.astype(np.uint8))[0]


def ring_contrast(index: int, box, components, labels, image, spacing, grow) -> float:
    """``contrast`` of lesion ``index``: its mean against the liver (label 1) within :data:`RING_MM`.

    Computed in the lesion's box grown by the ring's width in voxels, which holds every voxel
    within :data:`RING_MM` of the lesion. NaN when fewer than two liver voxels surround it.
    """
    big = tuple(slice(max(b.start - g, 0), min(b.stop + g, n)) for b, g, n in zip(box, grow, labels.shape))
    lesion = components[big] == index
    ring = (ndimage.distance_transform_edt(~lesion, sampling=spacing) <= RING_MM) & ~lesion & (labels[big] == 1)
    if ring.sum() < 2:
        return math.nan
    around = image[big][ring].astype(np.float64)
    spread = float(around.std())
    difference = abs(float(around.mean()) - float(image[big][lesion].astype(np.float64).mean()))
    return difference / spread if spread > 0 else math.inf


def filter_lesions(labels: np.ndarray, tumour_prob: np.ndarray, image: np.ndarray, spacing,
                   thresholds: LesionFilter, outputs=CT_OUTPUTS) -> np.ndarray:
    """``labels`` without the lesions that fail ``thresholds`` (with a liver they become liver).

    Returns:
        A new uint8 label volume; the input is not modified.
    """
    components, features = lesion_features(labels, tumour_prob, image, spacing, outputs)
    dropped = [i for i, row in enumerate(features, 1) if not thresholds.keeps(row)]
    out = labels.copy()
    if dropped:
        out[np.isin(components, dropped)] = label_values(outputs).get("liver", 0)
    return out


@dataclass(frozen=True)
class Candidate:
    """A predicted lesion of a validation case: its features and the true lesions it touches.

    Attributes:
        features: one value per name in :data:`FEATURES`.
        truth_ids: ``(case, lesion id)`` of every true lesion it overlaps; empty for a false
            positive.
    """

    features: dict
    truth_ids: frozenset


def case_candidates(labels: np.ndarray, tumour_prob: np.ndarray, image: np.ndarray, spacing,
                    truth: np.ndarray, case: str, outputs=CT_OUTPUTS) -> tuple[list[Candidate], int]:
    """The predicted lesions of one case, matched to the true ones, and the true lesion count.

    A predicted lesion is a true positive when it overlaps a true lesion (26-connected
    components of the true tumour mask), as :func:`kerasunet.lits_metrics.lesion_detection`
    counts them.
    """
    components, features = lesion_features(labels, tumour_prob, image, spacing, outputs)
    truth_components, n_truth = ndimage.label(truth == tumour_label(outputs), structure=FULL_CONNECTIVITY)
    candidates = []
    for index, row in enumerate(features, 1):
        touched = np.unique(truth_components[(components == index) & (truth_components > 0)])
        candidates.append(Candidate(row, frozenset((case, int(t)) for t in touched)))
    return candidates, int(n_truth)


def detection_scores(candidates: list[Candidate], n_truth: int, thresholds: LesionFilter) -> dict:
    """Lesion precision and recall of the candidates ``thresholds`` keep.

    Returns:
        ``{"precision", "recall", "f1", "kept", "false_positives"}``; precision is 0 when
        nothing is kept, recall 0 when there is no true lesion.
    """
    kept = [c for c in candidates if thresholds.keeps(c.features)]
    correct = sum(1 for c in kept if c.truth_ids)
    found = len(frozenset().union(*(c.truth_ids for c in kept))) if kept else 0
    precision = correct / len(kept) if kept else 0.0
    recall = found / n_truth if n_truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "kept": len(kept),
            "false_positives": len(kept) - correct}


def midpoints(name: str, values: np.ndarray) -> np.ndarray:
    """The thresholds tried between neighbouring sorted ``values`` of a feature: the geometric
    mean for the volume, whose sizes span orders of magnitude (halfway in ratio, so a threshold
    between a 5 cm³ false positive and a 100 cm³ tumour keeps unseen 25 cm³ ones), else the
    arithmetic mean."""
    if name == "volume_mm3":
        return np.sqrt(values[1:] * values[:-1])
    return (values[1:] + values[:-1]) / 2


def fit_lesion_filter(candidates: list[Candidate], n_truth: int, max_recall_loss: float = 0.0,
                      rounds: int = 2) -> LesionFilter:
    """Thresholds that remove the most false positives of validation candidates.

    A coordinate search: for each feature in turn, every midpoint between two neighbouring
    candidate values (:func:`midpoints`; and 0) is tried with the other thresholds fixed, and the one of the
    highest lesion F1 is kept (the lowest on ties, so a threshold never rises without a
    gain). Thresholds that lower the recall by more than ``max_recall_loss`` below that of
    keeping every candidate are not considered: with the default 0, no true lesion found on
    validation is given up, which keeps a small validation set from choosing thresholds on
    one or two lesions.

    Args:
        candidates: from :func:`case_candidates` over the validation cases.
        n_truth: the validation cases' true lesions in all.
        max_recall_loss: how much recall may be traded for precision.
        rounds: passes over the features.

    Returns:
        The thresholds; :class:`LesionFilter` () (keep all) when nothing can be gained.
    """
    if not 0 <= max_recall_loss <= 1:
        raise ValueError(f"Expected 0 <= max_recall_loss <= 1. Received: max_recall_loss={max_recall_loss}")
    best = LesionFilter()
    floor = detection_scores(candidates, n_truth, best)["recall"] - max_recall_loss - 1e-12
    best_f1 = detection_scores(candidates, n_truth, best)["f1"]
    for _ in range(rounds):
        for name in FEATURES:
            values = np.unique([c.features[name] for c in candidates if math.isfinite(c.features[name])])
            for value in [0.0, *midpoints(name, values)]:
                trial = LesionFilter(**{**best.to_dict(), name: float(max(value, 0.0))})
                scores = detection_scores(candidates, n_truth, trial)
                better = scores["f1"] > best_f1 + 1e-12 or (
                    abs(scores["f1"] - best_f1) <= 1e-12 and getattr(trial, name) < getattr(best, name))
                if scores["recall"] >= floor and better:
                    best, best_f1 = trial, scores["f1"]
    return best


def fit_on_cases(model, info, cases, settings=None, max_recall_loss: float = 0.0,
                 progress=lambda line: None) -> tuple[LesionFilter, list[Candidate], int]:
    """Thresholds fitted on a model's predicted lesions of labelled cases (validation cases).

    Each case is segmented as ``predict`` segments it (:func:`kerasunet.predict.predict_volume`,
    without any lesion filter), its lesions matched to the true ones (:func:`case_candidates`)
    and the thresholds chosen over all of them (:func:`fit_lesion_filter`). A case that
    cannot be read is skipped with one progress line.

    Args:
        model, info: :func:`kerasunet.predict.load_predictor`'s model and run.
        cases: ``kerasunet.core.cases.CaseFiles`` with labels.
        settings: the ``PredictSettings`` to segment with (default ``PredictSettings()``).
        max_recall_loss: as :func:`fit_lesion_filter`.
        progress: receives a line per case (its predicted and true lesions, or why it was skipped).

    Returns:
        ``(thresholds, candidates, n_truth)``: the thresholds, the predicted lesions they
        were fitted on and the true lesions in all.
    """
    from kerasunet.core.cases import CaseError, load_case
    from kerasunet.predict import PredictSettings, predict_volume

    settings = replace(settings or PredictSettings(), lesion_filter=None, run_lesion_filter=False)
    outputs = info.mask_outputs
    candidates, n_truth = [], 0
    for i, case in enumerate(cases, 1):
        try:
            volume, truth = load_case(case, outputs)
        except CaseError as exc:
            progress(f"lesion filter: [{i}/{len(cases)}] {case.case_id} skipped: {exc}")
            continue
        labels, probs = predict_volume(model, info, volume, settings)
        found, n = case_candidates(labels, probs[..., list(outputs).index("tumour")], volume.data, volume.spacing,
                                   truth, case.case_id, outputs)
        candidates, n_truth = candidates + found, n_truth + n
        progress(f"lesion filter: [{i}/{len(cases)}] {case.case_id}: {len(found)} predicted lesion(s), {n} true")
    return fit_lesion_filter(candidates, n_truth, max_recall_loss), candidates, n_truth


def smallest_lesion_mm3(cases, outputs, progress=lambda line: None) -> float | None:
    """The volume (mm³) of the smallest true lesion (a 26-connected tumour component) in the
    labels of ``cases``; None when they hold none. An unreadable label is skipped with one
    progress line."""
    from kerasunet.core.cases import CaseError, load_label

    smallest = None
    for case in cases:
        try:
            label, spacing = load_label(case, outputs)
        except CaseError as exc:
            progress(f"lesion filter: {case.case_id}'s label skipped: {exc}")
            continue
        components, n = ndimage.label(label == tumour_label(outputs), structure=FULL_CONNECTIVITY)
        if n:
            volume = float(np.bincount(components.ravel())[1:].min() * np.prod(spacing))
            smallest = volume if smallest is None else min(smallest, volume)
    return smallest


def with_size_floor(thresholds: LesionFilter, candidates: list[Candidate], smallest_mm3: float | None,
                    fraction: float = LABEL_SIZE_FRACTION) -> LesionFilter:
    """``thresholds`` with the volume threshold raised to ``fraction`` of the smallest labelled
    lesion, but never above a true lesion found among ``candidates`` (validation).

    Two validation cases often show no false positive, and then :func:`fit_lesion_filter` keeps
    every lesion, specks included; the labels still say how small a lesion the task counts.
    """
    if smallest_mm3 is None:
        return thresholds
    floor = fraction * smallest_mm3
    found = [c.features["volume_mm3"] for c in candidates if c.truth_ids]
    if found:
        floor = min(floor, min(found))
    return replace(thresholds, volume_mm3=max(thresholds.volume_mm3, floor))


def read_lesion_filter(path) -> LesionFilter:
    """The thresholds of a ``--lesion-filter`` JSON file (an object of :data:`FEATURES`; missing ones 0).

    Raises:
        ValueError: one line naming the file: unreadable, not JSON, an unknown key or a bad value.
    """
    import json

    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the lesion filter ({type(exc).__name__}: {exc})") from None
    if not isinstance(values, dict) or set(values) - set(FEATURES):
        raise ValueError(f"{path}: a lesion filter is a JSON object with keys from {FEATURES}")
    try:
        return LesionFilter(**{k: float(v) for k, v in values.items()})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def write_lesion_filter(path, thresholds: LesionFilter) -> None:
    """Writes ``thresholds`` as a ``--lesion-filter`` file (atomic)."""
    from kerasunet.core.atomic import write_json

    write_json(path, thresholds.to_dict())


def run_lesion_filter(info) -> LesionFilter | None:
    """A run's own thresholds: its folder's ``lesion_filter.json`` (:func:`fit_run_lesion_filter`), or None.

    Args:
        info: the run (``kerasunet.core.runs.RunInfo``).

    Raises:
        RunError: the file is there but unreadable (the message names it).
    """
    from kerasunet.core.runs import LESION_FILTER_FILE, RunError

    path = Path(info.model_path).parent / LESION_FILTER_FILE
    if not path.exists():
        return None
    try:
        return read_lesion_filter(path)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def fit_run_lesion_filter(run_dir, records_dir, progress=print) -> LesionFilter | None:
    """Fits a run's own lesion filter on its validation cases and writes it to the run.

    The run (a whole-slice or 3D run, or both stages of a cascade, exactly as ``predict``
    runs it) segments the source volumes of the records' ``val`` cases; the thresholds are
    :func:`fit_on_cases`'s, with the volume threshold at least :data:`LABEL_SIZE_FRACTION` of
    the smallest lesion in the labels of the ``train`` and ``val`` cases
    (:func:`with_size_floor`), and go to the run folder's ``lesion_filter.json`` (atomic), which
    predict, evaluate and export then apply. When they cannot be fitted, nothing is written
    (an older file is removed first) and one progress line says why: no validation cases,
    none of their source volumes readable (records copied without their sources), or no
    predicted lesion on them. The model itself is never affected.

    Args:
        run_dir: the run folder (best.keras chosen).
        records_dir: the records it was trained on; the manifest lists the cases' volumes.
        progress: receives a line per validation case (:func:`fit_on_cases`) and one of the outcome.

    Returns:
        The thresholds written, or None.
    """
    from kerasunet.core.runs import LESION_FILTER_FILE
    from kerasunet.evaluate import EvaluateError, manifest_cases
    from kerasunet.predict import load_predictor

    path = Path(run_dir) / LESION_FILTER_FILE
    path.unlink(missing_ok=True)  # one of an earlier best.keras is not this one's
    try:
        _, cases, _ = manifest_cases(Path(records_dir), "val")
    except EvaluateError:
        cases = []
    cases = [c for c in cases if c.label is not None]
    if not cases:
        progress(f"lesion filter: no validation cases in {records_dir}; {path.name} not written")
        return None
    model, info = load_predictor(run_dir)
    thresholds, candidates, n_truth = fit_on_cases(model, info, cases, progress=progress)
    if not candidates:
        progress(f"lesion filter: no predicted lesions on the readable validation cases of {len(cases)}; "
                 f"{path.name} not written")
        return None
    try:
        _, train_cases, _ = manifest_cases(Path(records_dir), "train")
    except EvaluateError:
        train_cases = []
    labelled = [c for c in train_cases if c.label is not None] + cases
    smallest = smallest_lesion_mm3(labelled, info.mask_outputs, progress)
    thresholds = with_size_floor(thresholds, candidates, smallest)
    write_lesion_filter(path, thresholds)
    labels = "no lesion" if smallest is None else f"smallest lesion {smallest:.0f} mm³"
    progress(f"lesion filter: fitted on {len(candidates)} predicted lesion(s) of {len(cases)} validation case(s) "
             f"({n_truth} true; labels of {len(labelled)} case(s): {labels}): {thresholds.to_dict()} -> {path}")
    return thresholds


def report_section(summary: dict) -> list[str]:
    """``evaluate``'s report lines comparing each model before and after the lesion filter.

    Reads ``summary["models"][name]["before_lesion_filter"]`` (written when ``evaluate``
    applied a filter: ``--lesion-filter``, or a cascade run's own) and the thresholds of
    each model's ``lesion_filter``; no lines when there is none or no tumour was scored.
    """
    rows, thresholds = [], {}
    for name, model in summary["models"].items():
        before = (model.get("before_lesion_filter") or {}).get("structures", {}).get("tumour")
        after = model.get("structures", {}).get("tumour")
        if before is None or after is None:
            continue
        thresholds[name] = model.get("lesion_filter") or summary["settings"]["predict"].get("lesion_filter")
        for label, s in (("before", before), ("after", after)):
            cells = [s.get("pred_lesions"), s.get("lesion_precision"), s.get("lesion_recall"), s.get("dice_per_case")]
            rows.append(f"| {name} | {label} | " + " | ".join("–" if v is None else
                                                               (f"{v:.3f}" if isinstance(v, float) else str(v))
                                                               for v in cells) + " |")
    if not rows:
        return []
    if len({str(value) for value in thresholds.values()}) == 1:  # one filter for every model
        lines = [f"Thresholds: `{next(iter(thresholds.values()))}` (kerasunet.lesion_filter)."]
    else:
        lines = [f"Thresholds of {name}: `{value}` (kerasunet.lesion_filter)." for name, value in thresholds.items()]
    return ["", "## Lesion filter", "", *lines, "",
            "| model | lesion filter | predicted lesions | lesion precision | lesion recall | tumour Dice/case |",
            "|---|---|---|---|---|---|", *rows]
