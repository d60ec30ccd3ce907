"""The research's CT→MRI transfer experiment as one resumable job, with repeats and a report.

The research this project comes from (see ``../shared/research``) pretrained a 2D U-Net on LiTS
CT slices, then trained three MRI tumour models: **A** from scratch, **B** initialised from the
CT model, **C** initialised with the first two encoder blocks frozen. It ran each once, so its
conclusions could be noise. Here every mode runs ``repeats`` times with one seed per repeat, on
identical records and splits, and the report states whether the differences between modes are
larger than the spread between repeats.

Layout of ``EXP_DIR``::

    records/lits, records/mri     TFRecords (reused when their settings match)
    runs/ct                       the CT model
    runs/mri-<mode>-<loss>-r<k>   MRI runs (A/B/C × repeats, plus the loss ablation)
    eval/...                      evaluate outputs per run
    report.md, figures/           the report
    state.json                    finished steps (a killed experiment continues from here)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kerasunet.core.atomic import atomic_path, write_json
from kerasunet.core.records_format import MANIFEST_FILE

MODES = {"A": "scratch", "B": "init", "C": "freeze"}
MAIN_LABELS = tuple(f"{letter} ({mode})" for letter, mode in MODES.items())  # report rows of A, B, C


@dataclass(frozen=True)
class Preset:
    """Hyper-parameters of one experiment configuration."""

    ct_epochs: int
    ct_batch_size: int
    ct_lr: float
    mri_epochs: int
    mri_batch_size: int
    mri_lr: float
    loss: str
    filters: int
    depth: int
    repeats: int
    augment: bool
    oversample_tumour: float
    ablation_losses: tuple[str, ...]
    schedule: str = "none"


PRESETS = {
    # The research: CT batch 10, Adam 1e-4, 5 epochs, BCE; MRI batch 18, Adam 5e-4, 8 epochs.
    "paper": Preset(ct_epochs=5, ct_batch_size=10, ct_lr=1e-4, mri_epochs=8, mri_batch_size=18,
                    mri_lr=5e-4, loss="bce", filters=32, depth=4, repeats=3, augment=False,
                    oversample_tumour=0.0, ablation_losses=("bce_dice",)),
    # Sized for 2 CPU cores and 64x64 phantoms (make demo, about 8 minutes): a smaller network
    # and more epochs; augmentation and tumour oversampling because there are few cases.
    "small": Preset(ct_epochs=30, ct_batch_size=16, ct_lr=2e-3, mri_epochs=16, mri_batch_size=16,
                    mri_lr=2e-3, loss="bce_dice", filters=16, depth=3, repeats=2, augment=True,
                    oversample_tumour=0.33, ablation_losses=("bce",), schedule="cosine"),
}


@dataclass(frozen=True)
class ExperimentSettings:
    """Settings of ``kerasunet experiment transfer``; ``None`` fields take the preset's value."""

    lits: Path
    mri: Path
    out: Path
    config: str = "small"
    repeats: int | None = None
    epochs_ct: int | None = None
    epochs_mri: int | None = None
    loss: str | None = None
    ablation: bool = True
    phase: str = "artery"
    seed: int = 0
    workers: int = 2

    def preset(self) -> Preset:
        base = PRESETS[self.config]
        overrides = {k: v for k, v in (("repeats", self.repeats), ("ct_epochs", self.epochs_ct),
                                       ("mri_epochs", self.epochs_mri), ("loss", self.loss))
                     if v is not None}
        preset = dataclasses.replace(base, **overrides)
        if preset.repeats < 1:
            raise ValueError(f"Expected repeats >= 1. Received: repeats={preset.repeats}")
        return preset

    @property
    def seeds(self) -> list[int]:
        """One seed per repeat; models A, B and C of a repeat share it (same data order)."""
        return [self.seed + 1000 * r for r in range(self.preset().repeats)]


@dataclass(frozen=True)
class Run:
    """One training run of the experiment."""

    name: str  # run folder name under runs/
    label: str  # row label in the report, e.g. "B (init)"
    mode: str
    loss: str
    repeat: int


def plan_runs(settings: ExperimentSettings) -> list[Run]:
    """The MRI runs: A/B/C for every repeat, plus the loss ablation on the scratch model."""
    preset = settings.preset()
    runs = []
    for r in range(preset.repeats):
        for mode, label in zip(MODES.values(), MAIN_LABELS):
            runs.append(Run(f"mri-{mode}-{preset.loss}-r{r}", label, mode, preset.loss, r))
        if settings.ablation:
            for loss in preset.ablation_losses:
                if loss != preset.loss:
                    runs.append(Run(f"mri-scratch-{loss}-r{r}", f"A ({loss})", "scratch", loss, r))
    return runs


def run_experiment(settings: ExperimentSettings, progress: Callable[[str], None] = print) -> Path:
    """Builds records, pretrains on CT, trains A/B/C on MRI, evaluates, writes ``report.md``.

    Finished steps are recorded in ``state.json``; rerunning the same command continues a
    killed experiment (an interrupted training run resumes from its last checkpoint).

    Returns:
        The path of ``report.md``.
    """
    preset = settings.preset()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    state = _State(out / "state.json")
    started = time.perf_counter()
    records = {name: _build(src, name, out / "records" / name, settings, progress)
               for name, src in (("lits", settings.lits), ("mri", settings.mri))}
    ct_run = _train(state, out / "runs" / "ct", progress, records=records["lits"], mode="scratch",
                    epochs=preset.ct_epochs, batch_size=preset.ct_batch_size, lr=preset.ct_lr,
                    loss=preset.loss, seed=settings.seed, preset=preset)
    runs = plan_runs(settings)
    for i, run in enumerate(runs, 1):
        progress(f"== MRI run {i}/{len(runs)}: {run.label}, repeat {run.repeat + 1} ==")
        _train(state, out / "runs" / run.name, progress, records=records["mri"], mode=run.mode,
               pretrained=None if run.mode == "scratch" else ct_run, epochs=preset.mri_epochs,
               batch_size=preset.mri_batch_size, lr=preset.mri_lr, loss=run.loss,
               seed=settings.seeds[run.repeat], preset=preset)
    ct_eval = _evaluate(state, "eval/ct", {"CT": ct_run}, records["lits"], out, 2, progress)
    mri_evals = []
    for r in range(preset.repeats):
        models = {run.label: out / "runs" / run.name for run in runs if run.repeat == r}
        mri_evals.append(_evaluate(state, f"eval/mri-r{r}", models, records["mri"], out,
                                   3 if r == 0 else 0, progress))
    report = write_report(settings, out, runs, ct_eval, mri_evals, time.perf_counter() - started)
    progress(f"report: {report}")
    return report


class _State:
    """``state.json``: which steps finished, so a rerun skips them."""

    def __init__(self, path: Path):
        self.path = path
        self.done = json.loads(path.read_text()) if path.exists() else {}

    def mark(self, key: str, value) -> None:
        self.done[key] = value
        write_json(self.path, self.done)


def _build(source: Path, dataset: str, out: Path, settings: ExperimentSettings, progress) -> Path:
    # build_records is itself resumable and a no-op when a finished build's settings match.
    from tfrecords_builder.build import BuildSettings, build_records

    progress(f"== records: {dataset} from {source} ==")
    build_records(BuildSettings(source=str(source), dataset=dataset, out=str(out), phase=settings.phase,
                                seed=settings.seed, holdout="last", val_fraction=0.2,
                                test_fraction=0.25, workers=settings.workers),
                  log=progress)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    counts = ", ".join(f"{split} {len(v['cases'])} cases / {v['num_examples']} slices"
                       for split, v in manifest["splits"].items())
    progress(f"{dataset}: {counts}; skipped {len(manifest['skipped'])}: "
             + "; ".join(f"{s['case_id']} ({s['reason']})" for s in manifest["skipped"]))
    return out


def _train(state: _State, run_dir: Path, progress, *, records: Path, mode: str, epochs: int,
           batch_size: int, lr: float, loss: str, seed: int, preset: Preset,
           pretrained: Path | None = None) -> Path:
    from kerasunet.train import TrainSettings, train

    key = f"train:{run_dir.name}"
    if key in state.done:
        progress(f"{run_dir.name}: finished earlier, skipped")
        return run_dir
    settings = TrainSettings(records=str(records), out=str(run_dir), mode=mode,
                             pretrained=None if pretrained is None else str(pretrained), epochs=epochs,
                             batch_size=batch_size, lr=lr, loss=loss, filters=preset.filters,
                             depth=preset.depth, augment=preset.augment, schedule=preset.schedule,
                             oversample_tumour=preset.oversample_tumour, seed=seed, resume=True)
    train(settings, progress=progress)
    state.mark(key, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return run_dir


def _evaluate(state: _State, name: str, models: dict, records: Path, out: Path, n_overlays: int,
              progress) -> dict:
    from kerasunet.evaluate import EvaluateSettings, evaluate

    key = f"evaluate:{name}"
    summary_path = out / name / "summary.json"
    if key in state.done and summary_path.exists():
        return json.loads(summary_path.read_text())
    progress(f"== evaluate {name}: {', '.join(models)} ==")
    summary = evaluate(models, records, out / name, EvaluateSettings(n_overlays=n_overlays),
                       progress=progress)
    state.mark(key, {"summary": str(summary_path.relative_to(out))})
    return summary


# ----------------------------------------------------------------------------- report

def _metric(summary: dict, model: str, structure: str, key: str, group: str = "models") -> float:
    entry = summary[group][model]["structures"][structure][key]
    value = entry["mean"] if isinstance(entry, dict) else entry
    return math.nan if value is None else float(value)


def _across(values: list[float]) -> tuple[float, float]:
    """Mean and std over repeats, ignoring undefined values."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite))


def _pm(mean_std: tuple[float, float], digits: int = 3) -> str:
    mean, std = mean_std
    return "n/a" if not math.isfinite(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


TABLE_METRICS = (("dice_per_case", "Dice per case"), ("global_dice", "global Dice"), ("voe", "VOE"),
                 ("rvd", "RVD"), ("assd", "ASSD (mm)"), ("mssd", "MSSD (mm)"))


def mri_results(runs: list[Run], mri_evals: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """label -> metric -> (mean, std over repeats) of the test tumour metrics."""
    labels = list(dict.fromkeys(run.label for run in runs))
    results = {}
    for label in labels:
        results[label] = {key: _across([_metric(s, label, "tumour", key) for s in mri_evals])
                          for key, _ in TABLE_METRICS}
    from kerasunet.evaluate import BASELINE

    results[BASELINE] = {key: _across([_metric(s, BASELINE, "tumour", key, "baselines") for s in mri_evals])
                         for key, _ in TABLE_METRICS}
    return results


def what_this_shows(results: dict, repeats: int, histories: dict[str, list[list[dict]]]) -> str:
    """A short paragraph generated from the numbers: are mode differences larger than the spread?"""
    main = [label for label in MAIN_LABELS if label in results]
    dice = {label: results[label]["dice_per_case"] for label in main}
    ranked = sorted(main, key=lambda label: -np.nan_to_num(dice[label][0], nan=-1))
    best, worst = ranked[0], ranked[-1]
    gap = dice[best][0] - dice[worst][0]
    spread = max(dice[label][1] for label in main)
    lines = [f"On the held-out MRI cases, {best} has the highest mean tumour Dice per case "
             f"({dice[best][0]:.3f}) and {worst} the lowest ({dice[worst][0]:.3f}), a gap of {gap:.3f}."]
    if repeats < 2:
        lines.append("With a single repeat there is no spread to compare against, so this gap cannot be "
                     "told apart from noise; rerun with `--repeats 3` or more.")
    elif gap > 2 * spread:
        lines.append(f"The gap is larger than twice the largest spread between repeats ({spread:.3f}), "
                     f"so over {repeats} repeats the difference between modes looks real, not noise.")
    else:
        lines.append(f"The gap is within twice the largest spread between repeats ({spread:.3f}), so over "
                     f"{repeats} repeats the modes cannot be told apart: the differences are noise-sized.")
    from kerasunet.evaluate import BASELINE

    base = results[BASELINE]["dice_per_case"][0]
    beat = [label for label in main if dice[label][0] > (0 if not math.isfinite(base) else base) + 0.05]
    lines.append(f"The all-background baseline scores {base:.3f}; "
                 + (f"{len(beat)} of {len(main)} modes beat it clearly, so the models do segment tumours."
                    if beat else "no mode beats it clearly: the models did not learn the tumours."))
    first = {label: _first_epoch_val_loss(histories.get(label, [])) for label in main}
    if all(math.isfinite(v) for v in first.values()):
        fastest = min(first, key=first.get)
        lines.append(f"After the first epoch the lowest validation loss is {fastest}'s ({first[fastest]:.3f}; "
                     + ", ".join(f"{k} {v:.3f}" for k, v in first.items()) + "), which is how the "
                     "research judged convergence speed.")
    return " ".join(lines)


def _first_epoch_val_loss(runs: list[list[dict]]) -> float:
    values = [rows[0].get("val_loss", math.nan) for rows in runs if rows]
    return _across(values)[0]


def _timing(run_dir: Path) -> list[float]:
    from kerasunet.curves import read_history

    return [row["seconds"] for row in read_history(run_dir / "timing.csv") if "seconds" in row]


def write_report(settings: ExperimentSettings, out: Path, runs: list[Run], ct_eval: dict,
                 mri_evals: list[dict], seconds: float) -> Path:
    """Writes ``report.md``, its figures and ``results.json``; returns the report path."""
    from kerasunet.curves import plot_learning_curves, read_history
    from kerasunet.evaluate import BASELINE

    preset = settings.preset()
    figures = out / "figures"
    histories: dict[str, list[list[dict]]] = {}
    for run in runs:
        histories.setdefault(run.label, []).append(read_history(out / "runs" / run.name / "history.csv"))
    main = {k: v for k, v in histories.items() if k in MAIN_LABELS}
    ablation = {k: v for k, v in histories.items() if k.startswith("A (")}
    plot_learning_curves(main, figures / "learning_curves.png",
                         title=f"MRI tumour models, mean and min-max over {preset.repeats} repeat(s)")
    if len(ablation) > 1:
        plot_learning_curves(ablation, figures / "loss_ablation.png", title="Loss ablation (model A)")
    results = mri_results(runs, mri_evals)
    ct = {s: {key: _metric(ct_eval, "CT", s, key) for key, _ in TABLE_METRICS} for s in ("liver", "tumour")}
    text = _report_text(settings, preset, runs, results, ct, ct_eval, mri_evals, histories, out, seconds,
                        ablation_figure=len(ablation) > 1)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(text)
    write_json(out / "results.json", {"seconds": seconds, "mri": results, "ct": ct,
                                      "baseline": BASELINE, "settings": _settings_dict(settings)})
    return out / "report.md"


def _settings_dict(settings: ExperimentSettings) -> dict:
    return {**{k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()},
            "preset": dataclasses.asdict(settings.preset())}


def _report_text(settings, preset, runs, results, ct, ct_eval, mri_evals, histories, out, seconds,
                 ablation_figure) -> str:
    from kerasunet.evaluate import BASELINE

    lines = ["# CT → MRI transfer experiment", "",
             f"Config `{settings.config}`, {preset.repeats} repeat(s), total time {seconds / 60:.1f} min.", "",
             "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in _settings_dict(settings).items()
              if k != "preset" and v is not None]  # None = the preset's value, listed below
    lines += [f"| {k} | `{v}` |" for k, v in dataclasses.asdict(preset).items()]
    lines += ["", "## What this shows", "", what_this_shows(results, preset.repeats, histories), "",
              "## Learning curves", "",
              "Training (solid) and validation (dashed) loss and Dice per epoch; line = mean over repeats, "
              "band = min to max (the research's figure 10, with repeats).", "",
              "![learning curves](figures/learning_curves.png)", ""]
    if ablation_figure:
        lines += ["Loss ablation on the scratch model (the research used BCE alone):", "",
                  "![loss ablation](figures/loss_ablation.png)", ""]
    lines += ["## Seconds per epoch", "", _timing_table(runs, out), "",
              "## Test metrics, MRI tumour", "",
              f"Held-out MRI cases ({mri_evals[0]['n_cases']}: {', '.join(mri_evals[0]['cases'])}); "
              "each cell is the mean ± std over repeats of the per-run value.", "",
              "| model | " + " | ".join(name for _, name in TABLE_METRICS) + " |",
              "|---" * (len(TABLE_METRICS) + 1) + "|"]
    for label, metrics in results.items():
        lines.append(f"| {label} | " + " | ".join(_pm(metrics[key]) for key, _ in TABLE_METRICS) + " |")
    lines += ["", f"`{BASELINE}` predicts no tumour anywhere: the floor the models must beat.", "",
              "## CT model (pretraining), held-out CT", "",
              "| structure | " + " | ".join(name for _, name in TABLE_METRICS) + " |",
              "|---" * (len(TABLE_METRICS) + 1) + "|"]
    for structure, metrics in ct.items():
        lines.append(f"| {structure} | " + " | ".join("n/a" if not math.isfinite(v) else f"{v:.3f}"
                                                      for v in (metrics[k] for k, _ in TABLE_METRICS)) + " |")
    lines += ["", "## Overlays (repeat 1): image, truth, A, B, C", ""]
    lines += [f"![overlay](eval/mri-r0/{p})" for p in mri_evals[0].get("overlays", [])]
    lines += ["", "CT model on held-out CT:", ""]
    lines += [f"![overlay](eval/ct/{p})" for p in ct_eval.get("overlays", [])]
    lines += ["", "Per-case metrics: `eval/*/metrics.csv`; runs: `runs/*/` (history.csv, timing.csv, "
              "learning_curves.png, config.json).", ""]
    return "\n".join(lines)


def _timing_table(runs: list[Run], out: Path) -> str:
    per_label: dict[str, list[list[float]]] = {}
    for run in runs:
        per_label.setdefault(run.label, []).append(_timing(out / "runs" / run.name))
    n = max((len(t) for ts in per_label.values() for t in ts), default=0)
    rows = ["| model | " + " | ".join(f"epoch {e}" for e in range(1, n + 1)) + " | total |",
            "|---" * (n + 2) + "|"]
    for label, timings in per_label.items():
        cells = [_pm(_across([t[e] for t in timings if len(t) > e]), 1) for e in range(n)]
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {_pm(_across([sum(t) for t in timings]), 1)} |")
    return "\n".join(rows)
