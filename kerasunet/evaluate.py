"""Evaluate one or more models on held-out volumes: LiTS metrics, a report and overlay figures.

``data`` is either a records folder (its ``manifest.json`` test split, read through
``kerasunet.data.read_manifest``; the volumes are the source paths in ``manifest["cases"]``)
or a folder of volumes with labels in the LiTS or MRI layout. Cases without a label are
skipped with a reason. Every model segments the same cases through
:func:`kerasunet.predict.predict_volume` (the one inference path), each volume is read once.

``out_dir`` receives (all written atomically):

* ``metrics.csv``: one row per case and model; per structure Dice, VOE, RVD, ASSD (mm),
  MSSD (mm), voxel counts and, for tumour, lesion counts (``kerasunet.lits_metrics``).
* ``summary.json``: per model and structure, Dice per case (mean over cases), global Dice,
  mean ± std of every metric (undefined values left out and counted), lesion recall and
  precision; the same for an all-background baseline, so a report shows whether the models
  beat predicting nothing.
* ``report.md``: the tables, with the overlay PNGs embedded by relative path.
* ``overlays/<case>.png``: for the first ``n_overlays`` cases, the slice with the most true
  tumour: image, ground truth and every model's prediction side by side.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kerasunet.core.atomic import atomic_path, write_csv, write_json
from kerasunet.figures import overlay_figure, pick_slice
from kerasunet.lits_metrics import METRICS, case_metrics, summarize_structure
from kerasunet.core.nifti import CaseFiles, VolumeError, find_cases, load_volume
from kerasunet.predict import PredictSettings, load_predictor, predict_volume
from kerasunet.core.preprocessing import case_stats, normalize_np
from kerasunet.core.records_format import MANIFEST_FILE

BASELINE = "all-background"
STRUCTURES = {"ct": ("liver", "tumour"), "mri": ("tumour",)}
LESION_COUNTS = ("truth_lesions", "detected_lesions", "pred_lesions", "correct_lesions")


class EvaluateError(ValueError):
    """Data or models that cannot be evaluated together. The message starts with the path."""


@dataclass(frozen=True)
class EvaluateSettings:
    """How models are evaluated.

    Attributes:
        predict: segmentation settings shared by all models (TTA, threshold, post-processing).
        n_overlays: cases that get an overlay figure (the first ones in case order).
        split: the manifest split evaluated when ``data`` is a records folder.
    """

    predict: PredictSettings = field(default_factory=PredictSettings)
    n_overlays: int = 3
    split: str = "test"

    def __post_init__(self):
        if self.n_overlays < 0:
            raise ValueError(f"Expected n_overlays >= 0. Received: n_overlays={self.n_overlays}")


def name_models(paths) -> dict[str, Path]:
    """Short unique names for model paths: the run folder's name (``-2``, ``-3`` on clashes)."""
    names: dict[str, Path] = {}
    for path in map(Path, paths):
        base = path.name if path.is_dir() or path.suffix != ".keras" else (
            path.parent.name if path.stem == "best" else path.stem)
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names[name] = path
    return names


def find_eval_cases(data, split: str = "test", phase: str = "artery") -> tuple[str, list[CaseFiles], list[dict]]:
    """The labelled cases of a records folder's split or of a volume folder.

    Returns:
        ``(modality, cases, skipped)`` with ``skipped`` a list of ``{"case", "reason"}``.

    Raises:
        EvaluateError: the split is missing, or no case has a label.
        VolumeError: ``data`` is not a folder, or holds no cases.
    """
    data = Path(data)
    if (data / MANIFEST_FILE).exists():
        modality, cases = manifest_cases(data, split)
    else:
        layout, cases = find_cases(data, phase)
        modality = "ct" if layout == "lits" else "mri"
    skipped = [{"case": c.case_id, "reason": "no label file"} for c in cases if c.label is None]
    labelled = [c for c in cases if c.label is not None]
    if not labelled:
        raise EvaluateError(f"{data}: no labelled cases to evaluate ({len(cases)} cases, none with a label)")
    return modality, labelled, skipped


def manifest_cases(records_dir: Path, split: str) -> tuple[str, list[CaseFiles]]:
    """The modality and the cases of one split of a records manifest (source image/label paths).

    Raises:
        EvaluateError: the manifest is unreadable, malformed, or has no such split.
    """
    from kerasunet.data import RecordsError, read_manifest

    path = records_dir / MANIFEST_FILE
    try:
        manifest = read_manifest(records_dir)
        splits = manifest["splits"]
        if split not in splits:
            raise EvaluateError(f"{path}: no {split!r} split (has {sorted(splits)})")
        entries = {c: manifest["cases"][c] for c in splits[split]["cases"]}
        cases = [CaseFiles(c, Path(e["image"]), Path(e["label"]) if e.get("label") else None)
                 for c, e in entries.items()]
        return manifest["modality"], cases
    except RecordsError as exc:
        raise EvaluateError(str(exc)) from None
    except (KeyError, TypeError) as exc:
        raise EvaluateError(f"{path}: not a kerasunet records manifest (missing {exc})") from None


def load_case(case: CaseFiles):
    """Reads a case's image and label (canonical order); the label is rounded to uint8.

    Raises:
        VolumeError: a file is unreadable or the label's shape differs from the image's.
    """
    volume = load_volume(case.image)
    label = load_volume(case.label)
    if label.data.shape != volume.data.shape:
        raise VolumeError(f"{case.label}: label shape {label.data.shape} differs from image shape {volume.data.shape}")
    return volume, np.rint(label.data).astype(np.uint8)


def metrics_row(case_id: str, model: str, metrics: dict[str, dict]) -> dict:
    """One ``metrics.csv`` row: ``case, model`` then ``<structure>_<metric>`` columns."""
    row = {"case": case_id, "model": model}
    for structure, values in metrics.items():
        for key in (*METRICS, "pred_voxels", "truth_voxels", *LESION_COUNTS):
            if key in values:
                column = f"{structure}_{key}" + ("_mm" if key in ("assd", "mssd") else "")
                row[column] = values[key]
    return row


def evaluate(models: dict[str, str | Path], data, out_dir, settings: EvaluateSettings = EvaluateSettings(),
             progress: Callable[[str], None] = print) -> dict:
    """Segments the held-out cases with every model and writes metrics, summary, report and figures.

    Args:
        models: display name -> run folder or ``.keras`` file (see :func:`name_models`).
        data: a records folder or a folder of volumes with labels (module docstring).
        out_dir: the report folder.
        settings: prediction and report settings.
        progress: receives one line per case.

    Returns:
        The summary written to ``summary.json``.

    Raises:
        RunError: a model is missing or not a kerasunet model.
        EvaluateError: no labelled case, no readable case, or a model's modality differs from the data's.
    """
    if not models:
        raise EvaluateError(f"{data}: no model to evaluate")
    out_dir = Path(out_dir)
    modality, cases, skipped = find_eval_cases(data, settings.split, settings.predict.phase)
    predictors = load_predictors(models, modality, data)
    scores = score_cases(predictors, cases, modality, settings, out_dir / "overlays", progress)
    if not scores.evaluated:
        raise EvaluateError(f"{data}: none of the {len(cases)} labelled cases could be read")
    summarize = {name: {"structures": {s: summarize_structure([m[s] for m in per_case]) for s in STRUCTURES[modality]}}
                 for name, per_case in scores.per_case.items()}
    summary = _finite_or_none({
        "data": str(data), "modality": modality, "split": settings.split, "n_cases": len(scores.evaluated),
        "cases": scores.evaluated, "skipped": skipped + scores.skipped, "settings": asdict(settings),
        "models": {name: {"path": str(models[name]), **summarize[name]} for name in predictors},
        "baselines": {BASELINE: summarize[BASELINE]},
        "overlays": [str(p.relative_to(out_dir)) for p in scores.overlays],
    })
    write_csv(out_dir / "metrics.csv", [{k: "" if isinstance(v, float) and not math.isfinite(v) else v
                                         for k, v in row.items()} for row in scores.rows])  # undefined: empty
    write_json(out_dir / "summary.json", summary)
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text(render_report(summary, scores.rows))
    return summary


def load_predictors(models: dict[str, str | Path], modality: str, data) -> dict[str, tuple]:
    """Loads every model; all must be of the data's modality.

    Raises:
        RunError: a model is missing or not a kerasunet model.
        EvaluateError: a model's modality differs from the data's.
    """
    predictors = {name: load_predictor(path) for name, path in models.items()}
    for _, info in predictors.values():
        if info.modality != modality:
            raise EvaluateError(f"{info.model_path}: a {info.modality} model cannot be evaluated on "
                                f"{modality} data ({data})")
    return predictors


@dataclass
class Scores:
    """What :func:`score_cases` collects: per-case metrics per model (and the baseline), CSV rows,
    overlay paths, the evaluated case ids and the cases skipped while reading."""

    per_case: dict[str, list] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    overlays: list[Path] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def score_cases(predictors: dict[str, tuple], cases: list[CaseFiles], modality: str, settings: EvaluateSettings,
                overlay_dir: Path, progress: Callable[[str], None]) -> Scores:
    """Reads each case once, segments it with every model and scores it; draws the first overlays."""
    scores = Scores(per_case={name: [] for name in [*predictors, BASELINE]})
    for i, case in enumerate(cases, 1):
        try:
            volume, truth = load_case(case)
        except VolumeError as exc:
            scores.skipped.append({"case": case.case_id, "reason": str(exc)})
            progress(f"[{i}/{len(cases)}] {case.case_id}: skipped: {exc}")
            continue
        predictions = {}
        for name, (net, info) in predictors.items():
            predictions[name], _ = predict_volume(net, info, volume, settings.predict)
            metrics = case_metrics(predictions[name], truth, modality, volume.spacing)
            scores.per_case[name].append(metrics)
            scores.rows.append(metrics_row(case.case_id, name, metrics))
        scores.per_case[BASELINE].append(case_metrics(np.zeros_like(truth), truth, modality, volume.spacing))
        scores.evaluated.append(case.case_id)
        if len(scores.overlays) < settings.n_overlays:
            norm = next(iter(predictors.values()))[1].norm
            scores.overlays.append(write_overlay(case.case_id, volume, truth, predictions, norm, modality,
                                                 overlay_dir))
        dice = ", ".join(f"{name} {s}={scores.per_case[name][-1][s]['dice']:.3f}"
                         for name in predictors for s in STRUCTURES[modality])
        progress(f"[{i}/{len(cases)}] {case.case_id}: {dice}")
    return scores


def write_overlay(case_id: str, volume, truth: np.ndarray, predictions: dict[str, np.ndarray], norm,
                  modality: str, folder: Path) -> Path:
    """The overlay PNG of one case at its slice with the most tumour, image shown as the model sees it."""
    k = pick_slice(truth, "tumour", modality)
    stats = case_stats(volume.data, norm)
    image = normalize_np(volume.data[:, :, k], stats)
    window = ((stats[0] - stats[2]) / stats[3], (stats[1] - stats[2]) / stats[3])
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id)
    return overlay_figure(image, truth[:, :, k], {m: p[:, :, k] for m, p in predictions.items()},
                          folder / f"{name}.png", title=f"{case_id}, axial slice {k}", modality=modality,
                          display_range=(float(window[0]), float(window[1])))


def _finite_or_none(obj):
    # JSON has no NaN/inf: undefined metrics become null.
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mean_std(entry: dict, digits: int = 3) -> str:
    if entry["mean"] is None:
        return f"n/a ({entry['n_undefined']} undef.)"
    text = f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"
    return text + (f" ({entry['n_undefined']} undef.)" if entry["n_undefined"] else "")


def structure_table(summary: dict, structure: str) -> list[str]:
    """Markdown table of one structure: one row per model and the baseline."""
    header = ["model", "Dice per case", "global Dice", "VOE", "RVD", "ASSD (mm)", "MSSD (mm)"]
    tumour = structure == "tumour"
    if tumour:
        header += ["lesion recall", "lesion precision"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    entries = [(n, m["structures"][structure]) for n, m in summary["models"].items()]
    entries.append((f"baseline: {BASELINE}", summary["baselines"][BASELINE]["structures"][structure]))
    for name, s in entries:
        cells = [name, _fmt(s["dice_per_case"]), _fmt(s["global_dice"]), _mean_std(s["voe"]), _mean_std(s["rvd"]),
                 _mean_std(s["assd"], 2), _mean_std(s["mssd"], 2)]
        if tumour:
            cells += [_fmt(s["lesion_recall"]), _fmt(s["lesion_precision"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_report(summary: dict, rows: list[dict]) -> str:
    """The ``report.md`` text: settings, one table per structure, per-case Dice, overlay figures."""
    structures = STRUCTURES[summary["modality"]]
    lines = [f"# Evaluation: {', '.join(summary['models'])}", "",
             f"- data: `{summary['data']}` ({summary['modality']}, split `{summary['split']}`), "
             f"{summary['n_cases']} cases evaluated, {len(summary['skipped'])} skipped",
             "- metrics as in the LiTS benchmark (`kerasunet.lits_metrics`): VOE = 1 - Jaccard, "
             "RVD = (|P| - |T|) / |T|, ASSD/MSSD in mm; mean ± std over cases, undefined values "
             "(one mask empty) left out and counted",
             f"- predict: TTA {summary['settings']['predict']['tta']}, threshold "
             f"{summary['settings']['predict']['threshold']}, post-processing "
             f"{summary['settings']['predict']['postprocess']}", ""]
    for skip in summary["skipped"]:
        lines.append(f"- skipped `{skip['case']}`: {skip['reason']}")
    for structure in structures:
        lines += ["", f"## {structure.capitalize()}", "", *structure_table(summary, structure)]
    lines += ["", "## Dice per case", "", "| case | model | " + " | ".join(structures) + " |",
              "|---|---|" + "---|" * len(structures)]
    for row in rows:
        lines.append(f"| {row['case']} | {row['model']} | "
                     + " | ".join(_fmt(row[f"{s}_dice"]) for s in structures) + " |")
    if summary["overlays"]:
        lines += ["", "## Overlays", "", "Image, ground truth and each model's prediction on the axial slice "
                  "with the most tumour (radiological orientation; green liver, red tumour).", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in summary["overlays"]]
    return "\n".join(lines) + "\n"
