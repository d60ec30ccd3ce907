"""Scores over cases in a named convention, the tables that show them, and scoring of mask folders.

Per-case metrics come from :mod:`kerasunet.lits_metrics`; this module pools them.

* ``medpy``: Dice per case (mean), global Dice (all cases' voxels pooled), mean ± std over cases
  of VOE, RVD, ASSD, MSSD and RMSD with undefined (NaN) values left out and counted; lesion
  recall = detected / true lesions and precision = correct / predicted lesions.
* ``lits2017`` (``program/evaluate.py`` of the LiTS organisers): liver metrics are means over
  cases, 9001 included; lesion VOE, RVD, ASSD, MSSD, RMSD and Dice are means over all lesions
  detected (IoU > 0.5) in all cases, and when no case has one they are the program's defaults
  (Dice 0, VOE 1, the rest 9001). Detection precision = TP / (TP + FP) and recall = TP / (TP + FN)
  with TP the program's detection count, FP = predicted lesions - TP, FN = true lesions - TP,
  summed over cases, 0 when the denominator is 0; at IoU > 0.5 and at IoU > 0 (``_gt0``).
  Global liver Dice leaves out the predicted voxels of a case with no voxel labelled 1.
* Both: global Dice is 1 when no case has the structure in either mask (the organisers' program
  divides by zero there). Tumour burden RMSE = sqrt(mean(error²)) and max error = max(error)
  (signed, truth minus prediction, as the organisers print it) over the cases where the error
  is defined.

:func:`score_folders` scores a folder of predicted label maps against a folder of true ones and
writes ``metrics.csv``, ``summary.json`` and ``report.md``, each naming its convention.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from kerasunet.core.atomic import atomic_path, write_csv, write_json
from kerasunet.core.cases import check_label
from kerasunet.core.labels import OUTPUTS, as_outputs
from kerasunet.core.nifti import NIFTI_SUFFIXES, Volume, VolumeError, load_volume, strip_nifti_suffix, \
    to_original_order
from kerasunet.lits_metrics import DISTANCES, LARGE, METRICS, case_metrics, check_convention, default_convention

LESION_DEFAULTS = {"dice": 0.0, "voe": 1.0, "rvd": LARGE, "assd": LARGE, "mssd": LARGE, "rmsd": LARGE}
ROW_KEYS = (*METRICS, "pred_voxels", "truth_voxels", "predicted", "truth_lesions", "pred_lesions",
            "detected_lesions", "detected_lesions_gt0", "correct_lesions", "burden_truth", "burden_pred",
            "burden_error")
LABELS = {"dice": "Dice", "voe": "VOE", "rvd": "RVD", "assd": "ASSD (mm)", "mssd": "MSSD (mm)", "rmsd": "RMSD (mm)"}


class ScoringError(ValueError):
    """Folders that cannot be scored. The message starts with the path."""


# ----------------------------------------------------------------------------- pooling


def mean_std(values) -> dict[str, float]:
    """Mean and (population) std of the finite values; ``n`` used and ``n_undefined`` NaN/inf left out."""
    values = np.asarray(list(values), dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0, "n_undefined": int(values.size)}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "n": int(finite.size),
            "n_undefined": int(values.size - finite.size)}


def global_dice(overlap: int, total: int) -> float:
    """2·Σ|P∩T| / Σ(|P| + |T|) over cases; 1.0 when no case has the structure in either mask."""
    return 2.0 * overlap / total if total else 1.0


def summarize_medpy(per_case: list[dict]) -> dict:
    """medpy convention summary of one structure over cases (module docstring)."""
    summary = {"dice_per_case": mean_std(m["dice"] for m in per_case)["mean"],
               "global_dice": global_dice(sum(m["overlap"] for m in per_case),
                                          sum(m["pred_voxels"] + m["truth_voxels"] for m in per_case))}
    summary.update({name: mean_std(m[name] for m in per_case) for name in METRICS})
    if per_case and "truth_lesions" in per_case[0]:
        truth = sum(m["truth_lesions"] for m in per_case)
        pred = sum(m["pred_lesions"] for m in per_case)
        summary["lesion_recall"] = sum(m["detected_lesions"] for m in per_case) / truth if truth else math.nan
        summary["lesion_precision"] = sum(m["correct_lesions"] for m in per_case) / pred if pred else math.nan
        summary["truth_lesions"], summary["pred_lesions"] = truth, pred
    return summary


def summarize_lits2017(per_case: list[dict], structure: str) -> dict:
    """lits2017 summary of one structure over cases (module docstring)."""
    if structure == "liver":
        pooled = [(m["overlap"], m["pred_voxels"] + m["truth_voxels"]) if m["predicted"]
                  else (0, m["truth_voxels"]) for m in per_case]
    else:
        pooled = [(m["overlap"], m["pred_voxels"] + m["truth_voxels"]) for m in per_case]
    summary = {"dice_per_case": mean_std(m["dice"] for m in per_case)["mean"],
               "global_dice": global_dice(sum(i for i, _ in pooled), sum(s for _, s in pooled))}
    if structure == "liver":
        summary.update({name: mean_std(m[name] for m in per_case) for name in METRICS})
        summary["missing_liver_cases"] = sum(not m["predicted"] for m in per_case)
        return summary
    lesions = [lesion for m in per_case for lesion in m["lesions"]]
    summary.update({name: mean_std(lesion[name] for lesion in lesions) if lesions else
                    {"mean": LESION_DEFAULTS[name], "std": 0.0, "n": 0, "n_undefined": 0} for name in METRICS})
    for key in ("truth_lesions", "pred_lesions", "detected_lesions", "detected_lesions_gt0"):
        summary[key] = sum(m[key] for m in per_case)
    for suffix, detected in (("", "detected_lesions"), ("_gt0", "detected_lesions_gt0")):
        tp = summary[detected]
        fp, fn = summary["pred_lesions"] - tp, summary["truth_lesions"] - tp
        summary["lesion_precision" + suffix] = tp / (tp + fp) if tp + fp else 0.0
        summary["lesion_recall" + suffix] = tp / (tp + fn) if tp + fn else 0.0
    return summary


def burden_summary(errors) -> dict:
    """Tumour burden RMSE and (signed) max error over the cases where the error is defined."""
    errors = np.asarray(list(errors), dtype=np.float64)
    finite = errors[np.isfinite(errors)]
    if finite.size == 0:
        return {"rmse": math.nan, "max_error": math.nan, "n": 0, "n_undefined": int(errors.size)}
    return {"rmse": float(np.sqrt(np.mean(np.square(finite)))), "max_error": float(np.max(finite)),
            "n": int(finite.size), "n_undefined": int(errors.size - finite.size)}


def summarize_cases(per_case: list[dict], outputs, convention: str) -> dict:
    """Summary of one model over cases: ``{"convention", "structures": {...}}`` plus, where the
    scored structures (``outputs``; "ct"/"mri" stand for their defaults) are liver and tumour,
    ``tumour_burden`` and, for lits2017, ``lits2017_scores`` (the organisers' names)."""
    check_convention(convention)
    outputs = as_outputs(outputs)
    structures = {s: summarize_lits2017([m[s] for m in per_case], s) if convention == "lits2017"
                  else summarize_medpy([m[s] for m in per_case]) for s in outputs}
    summary = {"convention": convention, "structures": structures}
    if "liver" in outputs and "tumour" in outputs:
        summary["tumour_burden"] = burden_summary(m["tumour"]["burden_error"] for m in per_case)
        if convention == "lits2017":
            summary["lits2017_scores"] = organiser_scores(summary)
    return summary


def organiser_scores(summary: dict) -> dict[str, float]:
    """The figures of the organisers' ``scores.txt`` under their names, from a lits2017 CT summary."""
    lesion, liver = summary["structures"]["tumour"], summary["structures"]["liver"]
    scores = {"lesion_precision": lesion["lesion_precision"], "lesion_recall": lesion["lesion_recall"],
              "lesion_precision_greater_zero": lesion["lesion_precision_gt0"],
              "lesion_recall_greater_zero": lesion["lesion_recall_gt0"]}
    for prefix, s in (("lesion", lesion), ("liver", liver)):
        scores[f"{prefix}_dice"] = s["dice"]["mean"]
        scores[f"{prefix}_jaccard"] = 1.0 - s["voe"]["mean"]
        for name, theirs in (("voe", "voe"), ("rvd", "rvd"), ("assd", "assd"), ("rmsd", "rmsd"), ("mssd", "msd")):
            scores[f"{prefix}_{theirs}"] = s[name]["mean"]
        scores[f"{prefix}_dice_per_case"] = s["dice_per_case"]
        scores[f"{prefix}_dice_global"] = s["global_dice"]
    scores["RMSE_Tumorburden"] = summary["tumour_burden"]["rmse"]
    scores["MAXERROR_Tumorburden"] = summary["tumour_burden"]["max_error"]
    return scores


# ----------------------------------------------------------------------------- rows and tables


def metrics_row(case_id: str, model: str, metrics: dict[str, dict], convention: str) -> dict:
    """One ``metrics.csv`` row: ``case, model, convention`` then ``<structure>_<metric>`` columns.

    Distances end in ``_mm``. lits2017 tumour rows add ``tumour_lesion_<metric>``: the mean over
    the case's detected lesions (empty when it has none).
    """
    row = {"case": case_id, "model": model, "convention": convention}
    for structure, values in metrics.items():
        for key in ROW_KEYS:
            if key in values:
                row[f"{structure}_{key}" + ("_mm" if key in DISTANCES else "")] = values[key]
        if "lesions" in values:
            for key in METRICS:
                row[f"{structure}_lesion_{key}" + ("_mm" if key in DISTANCES else "")] = (
                    float(np.mean([lesion[key] for lesion in values["lesions"]])) if values["lesions"] else math.nan)
    return row


def finite_or_none(obj):
    """A copy of ``obj`` fit for JSON: NaN/inf become None (null), paths become strings."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def csv_rows(rows: list[dict]) -> list[dict]:
    """Rows for ``write_csv``: undefined values become empty cells."""
    return [{k: "" if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()} for row in rows]


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def fmt_mean_std(entry: dict, digits: int = 3) -> str:
    if entry["mean"] is None:
        return f"n/a ({entry['n_undefined']} undef.)"
    text = f"{entry['mean']:.{digits}f} ± {fmt(entry['std'], digits)}"
    return text + (f" ({entry['n_undefined']} undef.)" if entry["n_undefined"] else "")


def convention_note(convention: str) -> str:
    """One report line saying how the figures were computed."""
    if convention == "lits2017":
        return ("- metrics: convention `lits2017`, the LiTS 2017 organisers' scoring program "
                "(`kerasunet.lits_metrics`, docs/metrics.md): surfaces by 18-neighbourhood erosion, "
                "RVD = (|T| - |P|) / |P|, ASSD/MSSD/RMSD in mm; liver: mean ± std over cases; tumour "
                "VOE/RVD/distances: over lesions detected at IoU > 0.5 (6-connected, merged by overlap); "
                "an empty mask or a missing liver (no voxel labelled 1) scores 9001")
    return ("- metrics: convention `medpy` (medpy.metric.binary 0.5, `kerasunet.lits_metrics`, "
            "docs/metrics.md): surfaces by 6-neighbourhood erosion, VOE = 1 - Jaccard, "
            "RVD = (|P| - |T|) / |T|, ASSD/MSSD/RMSD in mm; mean ± std over cases, undefined values "
            "(one mask empty) left out and counted")


def structure_table(summary: dict, structure: str) -> list[str]:
    """Markdown table of one structure: one row per model, then the baselines (if any)."""
    tumour = structure == "tumour"
    lits2017 = summary["convention"] == "lits2017"
    header = ["model", "Dice per case", "global Dice", *(LABELS[m] for m in METRICS[1:])]
    if tumour:
        header += ["lesion precision", "lesion recall"] + (["precision > 0", "recall > 0"] if lits2017 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    entries = [(n, m["structures"][structure]) for n, m in summary["models"].items()]
    entries += [(f"baseline: {n}", b["structures"][structure]) for n, b in summary.get("baselines", {}).items()]
    for name, s in entries:
        cells = [name, fmt(s["dice_per_case"]), fmt(s["global_dice"])]
        cells += [fmt_mean_std(s[m], 2 if m in DISTANCES else 3) for m in METRICS[1:]]
        if tumour:
            keys = ["lesion_precision", "lesion_recall"] + (["lesion_precision_gt0", "lesion_recall_gt0"] if lits2017
                                                            else [])
            cells += [fmt(s[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_outputs(summary: dict) -> tuple[str, ...]:
    """The structures a summary scores: its ``outputs`` (summaries before that key: the modality's)."""
    return tuple(summary.get("outputs") or OUTPUTS[summary["modality"]])


def metrics_section(summary: dict) -> list[str]:
    """The report's metric tables: one per structure, then tumour burden (liver and tumour scored)."""
    structures = summary_outputs(summary)
    lines = []
    for structure in structures:
        title = structure.capitalize()
        if structure == "tumour" and summary["convention"] == "lits2017":
            title += " (VOE, RVD and distances per detected lesion)"
        lines += ["", f"## {title}", "", *structure_table(summary, structure)]
    if "liver" in structures and "tumour" in structures:
        lines += ["", "## Tumour burden", "", "| model | RMSE | max error | cases |", "|---|---|---|---|"]
        groups = [*summary["models"].items(),
                  *((f"baseline: {n}", b) for n, b in summary.get("baselines", {}).items())]
        for name, s in groups:
            b = s["tumour_burden"]
            lines.append(f"| {name} | {fmt(b['rmse'], 4)} | {fmt(b['max_error'], 4)} | {b['n']} |")
    return lines


# ----------------------------------------------------------------------------- volumes and folders


def stored_spacing(volume: Volume) -> tuple[float, ...]:
    """Voxel size in mm in the file's own axis order."""
    return tuple(float(z) for z in volume.image.header.get_zooms()[:3])


def score_volume(pred: np.ndarray, truth: np.ndarray, volume: Volume, outputs, convention: str) -> dict:
    """:func:`~kerasunet.lits_metrics.case_metrics` of two canonical-order label maps, scored in
    the voxel order ``volume``'s file stores, so lesions are numbered as the organisers' program
    numbers them when it reads that file (their lesion matching depends on the numbering)."""
    image = volume.image
    return case_metrics(to_original_order(pred, image), to_original_order(truth, image), outputs,
                        stored_spacing(volume), convention)


def pair_masks(pred_dir: Path, truth_dir: Path) -> tuple[list[tuple[str, Path, Path]], list[dict]]:
    """Pairs each true label file with the predicted file of the same name (``.nii``/``.nii.gz`` alike).

    True files are the folder's ``segmentation-*`` NIfTI files when it has any (the LiTS layout,
    volumes beside labels), else all its NIfTI files; in sorted name order, as the organisers.

    Returns:
        ``([(case_id, pred_path, truth_path)], skipped)``; skipped cases lack a prediction.

    Raises:
        ScoringError: a folder is missing or the truth folder has no NIfTI file.
    """
    for folder in (pred_dir, truth_dir):
        if not folder.is_dir():
            raise ScoringError(f"{folder}: not a folder")
    truths = sorted(p for p in truth_dir.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
    if any(p.name.startswith("segmentation-") for p in truths):
        truths = [p for p in truths if p.name.startswith("segmentation-")]
    if not truths:
        raise ScoringError(f"{truth_dir}: no NIfTI label files (.nii or .nii.gz)")
    predicted = {strip_nifti_suffix(p.name): p for p in sorted(pred_dir.iterdir()) if p.name.endswith(NIFTI_SUFFIXES)}
    pairs, skipped = [], []
    for truth in truths:
        case = strip_nifti_suffix(truth.name)
        if case in predicted:
            pairs.append((case, predicted[case], truth))
        else:
            skipped.append({"case": case, "reason": f"{pred_dir / truth.name}: no prediction file"})
    return pairs, skipped


def read_pair(pred_path: Path, truth_path: Path, outputs) -> tuple[np.ndarray, np.ndarray, Volume]:
    """Reads a predicted and a true label map (canonical order, checked values).

    Raises:
        VolumeError: a file is unreadable, has bad label values, or the shapes differ.
    """
    pred, truth = load_volume(pred_path), load_volume(truth_path)
    if pred.data.shape != truth.data.shape:
        raise VolumeError(f"{pred_path}: shape {pred.data.shape} differs from the truth's {truth.data.shape}")
    labels = []
    for path, volume in ((pred_path, pred), (truth_path, truth)):
        try:
            labels.append(check_label(volume.data, outputs))
        except VolumeError as exc:
            raise VolumeError(f"{path}: {exc}") from None
    return labels[0], labels[1], truth


def score_folders(pred_dir, truth_dir, out_dir, convention: str | None = None, modality: str = "ct",
                  progress: Callable[[str], None] = print, outputs=None) -> dict:
    """Scores predicted label maps against true ones and writes metrics.csv, summary.json, report.md.

    Args:
        pred_dir: folder of predicted label maps (LiTS labels for CT: 0, 1 liver, 2 tumour).
        truth_dir: folder of true label maps with the same file names (see :func:`pair_masks`).
        out_dir: the report folder; each file is written under a temporary name, then renamed.
        convention: ``"lits2017"`` or ``"medpy"``; None picks ``lits2017`` for CT, ``medpy`` for MRI.
        modality: ``"ct"`` or ``"mri"``.
        progress: receives one line per case.
        outputs: the structures both folders' label maps hold, valued by ``labels.label_values``
            (``("liver", "tumour")``: 0/1/2, ATLAS MRI too); None: the modality's default.

    Returns:
        The summary written to ``summary.json``.

    Raises:
        ScoringError: a folder is missing, holds no label file, or no case could be scored.
        ValueError: an unknown convention.
    """
    convention = check_convention(convention or default_convention(modality))
    outputs = as_outputs(outputs if outputs is not None else modality)
    pred_dir, truth_dir, out_dir = Path(pred_dir), Path(truth_dir), Path(out_dir)
    pairs, skipped = pair_masks(pred_dir, truth_dir)
    model = pred_dir.name or str(pred_dir)
    per_case, rows, cases = [], [], []
    for i, (case, pred_path, truth_path) in enumerate(pairs, 1):
        try:
            pred, truth, volume = read_pair(pred_path, truth_path, outputs)
        except VolumeError as exc:
            skipped.append({"case": case, "reason": str(exc)})
            progress(f"[{i}/{len(pairs)}] {case}: skipped: {exc}")
            continue
        metrics = score_volume(pred, truth, volume, outputs, convention)
        per_case.append(metrics)
        rows.append(metrics_row(case, model, metrics, convention))
        cases.append(case)
        progress(f"[{i}/{len(pairs)}] {case}: " + ", ".join(f"{s} Dice {v['dice']:.3f}" for s, v in metrics.items()))
    if not per_case:
        raise ScoringError(f"{truth_dir}: none of the {len(pairs) + len(skipped)} cases could be scored")
    summary = finite_or_none({"pred": str(pred_dir), "truth": str(truth_dir), "modality": modality,
                              "outputs": list(outputs), "convention": convention, "n_cases": len(cases),
                              "cases": cases, "skipped": skipped,
                              "models": {model: summarize_cases(per_case, outputs, convention)}})
    write_csv(out_dir / "metrics.csv", csv_rows(rows))
    write_json(out_dir / "summary.json", summary)
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text(render_folder_report(summary, rows))
    return summary


def render_folder_report(summary: dict, rows: list[dict]) -> str:
    """The ``report.md`` of :func:`score_folders`."""
    structures = summary_outputs(summary)
    lines = [f"# Scores: `{summary['pred']}` against `{summary['truth']}`", "",
             f"- {summary['n_cases']} cases scored ({summary['modality']}), {len(summary['skipped'])} skipped",
             convention_note(summary["convention"])]
    lines += [f"- skipped `{skip['case']}`: {skip['reason']}" for skip in summary["skipped"]]
    lines += metrics_section(summary)
    scores = next(iter(summary["models"].values())).get("lits2017_scores")
    if scores:
        lines += ["", "## LiTS 2017 leaderboard figures (the organisers' names)", "", "| figure | value |",
                  "|---|---|", *(f"| {k} | {fmt(v, 4)} |" for k, v in scores.items())]
    lines += ["", "## Dice per case", "", "| case | " + " | ".join(structures) + " |",
              "|---|" + "---|" * len(structures)]
    for row in rows:
        lines.append(f"| {row['case']} | " + " | ".join(fmt(row[f'{s}_dice']) for s in structures) + " |")
    return "\n".join(lines) + "\n"
