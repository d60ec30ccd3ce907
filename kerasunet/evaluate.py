"""Evaluate one or more models on held-out volumes: LiTS metrics, a report and overlay figures.

``data`` is either a records folder (its ``manifest.json`` test split, read through
``kerasunet.data.read_manifest``; the volumes are the source paths in ``manifest["cases"]``)
or a folder of volumes with labels in any layout of ``kerasunet.core.cases.LAYOUTS``. A case
without a label, or one that fails the checks ``build-records`` applies
(``kerasunet.core.cases.load_case``), is skipped with the same reason and the others are
evaluated. Every model segments the same cases through :func:`kerasunet.predict.predict_volume`
(the one inference path), each volume is read once.

``out_dir`` receives (all written atomically):

Scores are per structure: the structures the labels hold (the records manifest's ``outputs``
or the layout's, ``kerasunet.core.cases.Dataset.outputs``) that every model segments
(``RunInfo.outputs``): liver and tumour for CT and for an ATLAS-like MRI set with two-output
models, tumour for FZMC or for a tumour-only model on liver-and-tumour labels (its liver
label reads as background). Each model's mask is re-valued to those structures
(``kerasunet.core.labels.relabel_np``) before it is scored.

* ``metrics.csv``: one row per case and model, with the metric convention
  (``settings.convention``: ``lits2017``, the LiTS organisers' scoring and the default for CT,
  or ``medpy``, the default for MRI; ``kerasunet.lits_metrics``); per structure Dice, VOE,
  RVD, ASSD, MSSD and RMSD (mm), voxel counts, lesion counts and the tumour burden
  (``kerasunet.lits_scoring.metrics_row``).
* ``summary.json``: the convention, and per model and structure Dice per case, global Dice,
  mean ± std of every metric, lesion detection precision and recall and the tumour-burden
  RMSE (``kerasunet.lits_scoring.summarize_cases``); the same for an all-background baseline,
  so a report shows whether the models beat predicting nothing.
* ``report.md``: the tables, with the overlay PNGs embedded by relative path.
* ``overlays/<case>.png``: for the first ``n_overlays`` cases, the slice with the most true
  tumour: image, ground truth and every model's prediction side by side.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from kerasunet.core.atomic import atomic_path, write_csv, write_json
from kerasunet.figures import overlay_figure, pick_slice
from kerasunet.lits_metrics import check_convention, default_convention
from kerasunet.lits_scoring import (convention_note, csv_rows, finite_or_none, fmt, metrics_row, metrics_section,
                                    score_volume, summarize_cases, summary_outputs)
from kerasunet.core.cases import MISSING_LABEL, CaseError, CaseFiles, case_from_entry, load_case, open_dataset
from kerasunet.lesion_filter import report_section as lesion_filter_section
from kerasunet.predict import PredictSettings, applied_lesion_filter, final_labels, load_predictor, predict_volume
from kerasunet.core.labels import relabel_np, shared_outputs
from kerasunet.core.preprocessing import case_stats, normalize_np
from kerasunet.core.records_format import MANIFEST_FILE

BASELINE = "all-background"


class EvaluateError(ValueError):
    """Data or models that cannot be evaluated together. The message starts with the path."""


@dataclass(frozen=True)
class EvaluateSettings:
    """How models are evaluated.

    Attributes:
        predict: segmentation settings shared by all models (TTA, threshold, post-processing).
        n_overlays: cases that get an overlay figure (the first ones in case order).
        split: the manifest split evaluated when ``data`` is a records folder.
        convention: metric convention, ``"lits2017"`` or ``"medpy"``
            (``kerasunet.lits_metrics``); None: ``lits2017`` for CT data, ``medpy`` for MRI.
    """

    predict: PredictSettings = field(default_factory=PredictSettings)
    n_overlays: int = 3
    split: str = "test"
    convention: str | None = None

    def __post_init__(self):
        if self.n_overlays < 0:
            raise ValueError(f"Expected n_overlays >= 0. Received: n_overlays={self.n_overlays}")
        if self.convention is not None:
            check_convention(self.convention)


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


def find_eval_cases(data, split: str = "test", phase: str = "artery", records: bool | None = None,
                    layout: str | None = None,
                    series: str | None = None) -> tuple[str, list[CaseFiles], list[dict], tuple[str, ...]]:
    """The labelled cases of a records folder's split or of a volume folder.

    Args:
        data: a records folder or a folder of volumes with labels.
        split: the manifest split (records folders).
        phase: MRI image file stem (volume folders).
        records: True: ``data`` must be a records folder (``evaluate --records``); False: a
            folder of volumes (``--input``); None: a records folder if it holds a manifest.
        layout: the volume folder's layout (``kerasunet.core.cases.LAYOUTS``); None detects it.
        series: SeriesInstanceUID to read from DICOM folders that hold several series.

    Returns:
        ``(modality, cases, skipped, outputs)`` with ``skipped`` a list of ``{"case", "reason"}``
        and ``outputs`` the structures the labels hold.

    Raises:
        EvaluateError: ``data`` is not the kind ``records`` asks for, the split is missing,
            or no case has a label.
        VolumeError: ``data`` is not a folder, or holds no cases.
    """
    data = Path(data)
    has_manifest = (data / MANIFEST_FILE).exists()
    if records and not has_manifest:
        raise EvaluateError(f"{data}: no {MANIFEST_FILE}, so not a records folder "
                            "(a folder of volumes with labels goes to --input)")
    if records is False and has_manifest:
        raise EvaluateError(f"{data}: holds {MANIFEST_FILE}, so it is a records folder (give it to --records)")
    if has_manifest:
        modality, cases, outputs = manifest_cases(data, split)
    else:
        dataset = open_dataset(data, layout, phase, series)
        modality, cases, outputs = dataset.modality, dataset.cases, dataset.outputs
    skipped = [{"case": c.case_id, "reason": MISSING_LABEL} for c in cases if c.label is None]
    labelled = [c for c in cases if c.label is not None]
    if not labelled:
        raise EvaluateError(f"{data}: no labelled cases to evaluate ({len(cases)} cases, none with a label)")
    return modality, labelled, skipped, outputs


def manifest_cases(records_dir: Path, split: str) -> tuple[str, list[CaseFiles], tuple[str, ...]]:
    """The modality, the cases of one split of a records manifest (source image/label paths) and
    the structures their labels hold.

    Raises:
        EvaluateError: the manifest is unreadable, malformed, or has no such split.
    """
    from kerasunet.data import RecordsError, read_manifest
    from kerasunet.train import manifest_outputs

    path = records_dir / MANIFEST_FILE
    try:
        manifest = read_manifest(records_dir)
        splits = manifest["splits"]
        if split not in splits:
            raise EvaluateError(f"{path}: no {split!r} split (has {sorted(splits)})")
        entries = {c: manifest["cases"][c] for c in splits[split]["cases"]}
        cases = [case_from_entry(c, e) for c, e in entries.items()]
        return manifest["modality"], cases, manifest_outputs(manifest)
    except RecordsError as exc:
        raise EvaluateError(str(exc)) from None
    except (KeyError, TypeError) as exc:
        raise EvaluateError(f"{path}: not a kerasunet records manifest (missing {exc})") from None


def evaluate(models: dict[str, str | Path], data, out_dir, settings: EvaluateSettings = EvaluateSettings(),
             progress: Callable[[str], None] = print, records: bool | None = None) -> dict:
    """Segments the held-out cases with every model and writes metrics, summary, report and figures.

    Args:
        models: display name -> run folder or ``.keras`` file (see :func:`name_models`).
        data: a records folder or a folder of volumes with labels (module docstring).
        out_dir: the report folder.
        settings: prediction and report settings.
        progress: receives one line per case.
        records: what ``data`` must be (see :func:`find_eval_cases`); None decides by its manifest.

    Returns:
        The summary written to ``summary.json``.

    Raises:
        RunError: a model is missing or not a kerasunet model.
        EvaluateError: no labelled case, no readable case, or a model's modality differs from the data's.
    """
    if not models:
        raise EvaluateError(f"{data}: no model to evaluate")
    out_dir = Path(out_dir)
    modality, cases, skipped, label_outputs = find_eval_cases(data, settings.split, settings.predict.phase, records,
                                                              settings.predict.layout, settings.predict.series)
    predictors = load_predictors(models, modality, data)
    outputs = scored_outputs(predictors, label_outputs, data)
    convention = settings.convention or default_convention(modality)
    scores = score_cases(predictors, cases, outputs, settings, out_dir / "overlays", progress, convention)
    if not scores.evaluated:
        raise EvaluateError(f"{data}: none of the {len(cases)} labelled cases could be read")
    summarize = {name: summarize_cases(per_case, outputs, convention) for name, per_case in scores.per_case.items()}
    summary = finite_or_none({
        "data": str(data), "modality": modality, "outputs": list(outputs), "split": settings.split,
        "convention": convention,
        "n_cases": len(scores.evaluated), "cases": scores.evaluated, "skipped": skipped + scores.skipped,
        "settings": asdict(settings),
        "models": {name: {"path": str(models[name]), **summarize[name],
                          **({"before_lesion_filter": summarize_cases(scores.unfiltered[name], outputs, convention),
                              "lesion_filter": applied_lesion_filter(predictors[name][1], settings.predict).to_dict()}
                             if name in scores.unfiltered else {})} for name in predictors},
        "baselines": {BASELINE: summarize[BASELINE]},
        "overlays": [str(p.relative_to(out_dir)) for p in scores.overlays],
    })
    write_csv(out_dir / "metrics.csv", csv_rows(scores.rows))  # undefined values: empty cells
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


def scored_outputs(predictors: dict[str, tuple], label_outputs, data) -> tuple[str, ...]:
    """The structures scored: those the labels hold that every model segments.

    Raises:
        EvaluateError: no structure is in both.
    """
    outputs = shared_outputs(label_outputs, *(info.mask_outputs for _, info in predictors.values()))
    if not outputs:
        models = "; ".join(f"{info.model_path}: {', '.join(info.mask_outputs)}" for _, info in predictors.values())
        raise EvaluateError(f"{data}: its labels hold {', '.join(label_outputs)}, which no model segments "
                            f"({models})")
    return outputs


@dataclass
class Scores:
    """What :func:`score_cases` collects: per-case metrics per model (and the baseline), CSV rows,
    overlay paths, the evaluated case ids and the cases skipped while reading."""

    per_case: dict[str, list] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    overlays: list[Path] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    unfiltered: dict[str, list] = field(default_factory=dict)  # per model, without the lesion filter


def score_cases(predictors: dict[str, tuple], cases: list[CaseFiles], outputs, settings: EvaluateSettings,
                overlay_dir: Path, progress: Callable[[str], None], convention: str) -> Scores:
    """Reads each case once, segments it with every model and scores the structures ``outputs``
    (:func:`scored_outputs`) in ``convention`` (in the image file's stored voxel order, as
    :func:`kerasunet.lits_scoring.score_volume`); draws the first overlays."""
    scores = Scores(per_case={name: [] for name in [*predictors, BASELINE]})
    for i, case in enumerate(cases, 1):
        try:
            volume, truth = load_case(case, outputs)
        except CaseError as exc:
            scores.skipped.append({"case": case.case_id, "reason": str(exc)})
            progress(f"[{i}/{len(cases)}] {case.case_id}: skipped: {exc}")
            continue
        predictions = {}
        for name, (net, info) in predictors.items():
            labels, probs = predict_volume(net, info, volume, settings.predict)
            predictions[name] = relabel_np(labels, info.mask_outputs, outputs)
            metrics = score_volume(predictions[name], truth, volume, outputs, convention)
            scores.per_case[name].append(metrics)
            if applied_lesion_filter(info, settings.predict) is not None:  # without it, for the report
                unfiltered = final_labels(probs, info.mask_outputs, volume.spacing,
                                          replace(settings.predict, lesion_filter=None), volume.data)
                scores.unfiltered.setdefault(name, []).append(
                    score_volume(relabel_np(unfiltered, info.mask_outputs, outputs), truth, volume, outputs,
                                 convention))
            scores.rows.append(metrics_row(case.case_id, name, metrics, convention))
        scores.per_case[BASELINE].append(score_volume(np.zeros_like(truth), truth, volume, outputs, convention))
        scores.evaluated.append(case.case_id)
        if len(scores.overlays) < settings.n_overlays:
            norm = next(iter(predictors.values()))[1].norm
            scores.overlays.append(write_overlay(case.case_id, volume, truth, predictions, norm, outputs,
                                                 overlay_dir))
        dice = ", ".join(f"{name} {s}={scores.per_case[name][-1][s]['dice']:.3f}"
                         for name in predictors for s in outputs)
        progress(f"[{i}/{len(cases)}] {case.case_id}: {dice}")
    return scores


def write_overlay(case_id: str, volume, truth: np.ndarray, predictions: dict[str, np.ndarray], norm,
                  outputs, folder: Path) -> Path:
    """The overlay PNG of one case at its slice with the most tumour, image shown as the model sees it."""
    k = pick_slice(truth, "tumour", outputs)
    stats = case_stats(volume.data, norm)
    image = normalize_np(volume.data[:, :, k], stats)
    window = ((stats[0] - stats[2]) / stats[3], (stats[1] - stats[2]) / stats[3])
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", case_id)
    return overlay_figure(image, truth[:, :, k], {m: p[:, :, k] for m, p in predictions.items()},
                          folder / f"{name}.png", title=f"{case_id}, axial slice {k}", outputs=outputs,
                          display_range=(float(window[0]), float(window[1])))


def render_report(summary: dict, rows: list[dict]) -> str:
    """The ``report.md`` text: settings, one table per structure, per-case Dice, overlay figures."""
    structures = summary_outputs(summary)
    lines = [f"# Evaluation: {', '.join(summary['models'])}", "",
             f"- data: `{summary['data']}` ({summary['modality']}, split `{summary['split']}`), "
             f"{summary['n_cases']} cases evaluated, {len(summary['skipped'])} skipped",
             convention_note(summary["convention"]),
             f"- predict: TTA {summary['settings']['predict']['tta']}, threshold "
             f"{summary['settings']['predict']['threshold']}, post-processing "
             f"{summary['settings']['predict']['postprocess']}", ""]
    for skip in summary["skipped"]:
        lines.append(f"- skipped `{skip['case']}`: {skip['reason']}")
    lines += metrics_section(summary)
    lines += lesion_filter_section(summary)
    lines += ["", "## Dice per case", "", "| case | model | " + " | ".join(structures) + " |",
              "|---|---|" + "---|" * len(structures)]
    for row in rows:
        lines.append(f"| {row['case']} | {row['model']} | "
                     + " | ".join(fmt(row[f"{s}_dice"]) for s in structures) + " |")
    if summary["overlays"]:
        lines += ["", "## Overlays", "", "Image, ground truth and each model's prediction on the axial slice "
                  "with the most tumour (radiological orientation; green liver, red tumour).", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in summary["overlays"]]
    return "\n".join(lines) + "\n"
