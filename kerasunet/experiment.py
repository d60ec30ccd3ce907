"""The research's CT→MRI transfer experiment as one resumable job, with repeats and a report.

The research this project comes from (see ``../shared/research``) pretrained a 2D U-Net on LiTS
CT slices, then trained three MRI tumour models: **A** from scratch, **B** initialised from the
CT model, **C** initialised with the first two encoder blocks frozen. It ran each once, so its
conclusions could be noise. Here every mode runs ``repeats`` times with one seed per repeat, on
identical records and splits, and the report states whether the differences between modes are
larger than the spread between repeats.

Layout of ``EXP_DIR``::

    records/lits, records/mri     TFRecords (their manifest holds their settings hash)
    runs/ct                       the CT model
    runs/mri-<mode>-<loss>-r<k>   MRI runs (A/B/C × repeats, plus the loss ablation)
    eval/...                      evaluate outputs per model group
    report.md, results.json, figures/   the report
    state.json                    per step: the hash of its settings, and whether it finished

**Rerunning the command** continues or updates the experiment. The steps form a chain,
records → CT run → MRI runs → evaluations → report, and each step is keyed on a hash of its
own settings together with the identity of its inputs: the records on their
``build-records`` settings hash; a training run on its ``TrainSettings`` (paths left out),
the SHA-256 of its records' manifest and, for ``init``/``freeze``, the CT run's hash; an
evaluation on its settings and the hashes of its records and models. On a rerun:

* a step whose hash is unchanged is kept if it finished and continued if it was
  interrupted (a training run resumes from its last checkpoint);
* a step whose hash changed is rerun, with one line naming each changed setting and its
  old and new values, and so is every step that takes its output. Changing
  ``--epochs-ct`` retrains the CT model, every ``init``/``freeze`` MRI run and the
  evaluations, but keeps the records and the ``scratch`` runs; changing ``--epochs-mri``
  retrains the MRI runs and re-evaluates them, but keeps the records and the CT model.

The experiment folder holds results derived from the command, so, as with ``make``, it is
brought in line with the command that was run rather than refused: what ``report.md`` says
is always what was trained. Use a new ``--out`` to keep an earlier experiment. A step that
reruns never sees its old output: its folder is renamed away (atomically) and deleted
first, so ``train`` starts in an empty folder and no run mixes checkpoints, history or
``config.json`` of two settings. Steps recorded without a hash (a ``state.json`` of an older
kerasunet) rerun.

The report takes every training setting it prints from the runs' own ``config.json``
(``train`` section), never from the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kerasunet.core.atomic import atomic_path, write_json
from kerasunet.core.choices import LOSSES, MODES
from kerasunet.core.fingerprint import changed_settings, hash_settings
from kerasunet.core.records_format import DEFAULT_WORKERS, MANIFEST_FILE, file_sha256
from kerasunet.core.runs import CONFIG_FILE, HISTORY_FILE, MODEL_FILE, TIMING_FILE
from kerasunet.train_settings import TrainSettings

LETTERS = dict(zip("ABC", MODES))  # A scratch, B init, C freeze
MAIN_LABELS = tuple(f"{letter} ({mode})" for letter, mode in LETTERS.items())  # report rows of A, B, C
# "masked" gates tumour by the liver channel, which tumour-only MRI models (FZMC) do not have.
EXPERIMENT_LOSSES = tuple(loss for loss in LOSSES if loss != "masked")
STATE_FILE = "state.json"
STATE_VERSION = 2
# TrainSettings fields that say where files are or how to start, not what is trained: left
# out of a run's hash (its inputs enter by content hash instead) and of the report.
LOCATION_FIELDS = ("records", "out", "pretrained", "resume")
# Inputs of a step, by the hash of the step that made them; named, not listed, when changed.
INPUTS = {"records": "records rebuilt", "pretrained": "CT model retrained", "models": "models retrained"}


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
    # The experiment keeps the research's dropout and selection rule whatever train's defaults are,
    # and the milder intensity augmentation it was sized with: `make demo`'s CT liver check failed
    # with the standard one (0.875 < 0.90; docs/quality.md, "Intensity shifts").
    dropout: float = 0.5
    monitor: str = "loss"
    augment_intensity: str = "mild"
    # 3D arm of ``--dims`` (kerasunet.dims_comparison): training patch (D, H, W) and patches per step
    patch_size: tuple[int, int, int] = (48, 128, 128)
    patch_batch_size: int = 2


PRESETS = {
    # The research: CT batch 10, Adam 1e-4, 5 epochs, BCE; MRI batch 18, Adam 5e-4, 8 epochs.
    "paper": Preset(ct_epochs=5, ct_batch_size=10, ct_lr=1e-4, mri_epochs=8, mri_batch_size=18,
                    mri_lr=5e-4, loss="bce", filters=32, depth=4, repeats=3, augment=False,
                    oversample_tumour=0.0, ablation_losses=("bce_dice",)),
    # Sized for 2 CPU cores and 64x64 phantoms (make demo: about 15 minutes on an idle 2-core machine): a smaller network
    # and more epochs; augmentation and tumour oversampling because there are few cases.
    "small": Preset(ct_epochs=30, ct_batch_size=16, ct_lr=2e-3, mri_epochs=16, mri_batch_size=16,
                    mri_lr=2e-3, loss="bce_dice", filters=16, depth=3, repeats=2, augment=True,
                    oversample_tumour=0.33, ablation_losses=("bce",), schedule="cosine",
                    patch_size=(16, 48, 48)),
}


@dataclass(frozen=True)
class ExperimentSettings:
    """Settings of ``kerasunet experiment transfer``; ``None`` fields take the preset's value."""

    lits: Path
    mri: Path
    out: Path
    preset: str = "small"
    repeats: int | None = None
    epochs_ct: int | None = None
    epochs_mri: int | None = None
    loss: str | None = None
    ablation: bool = True
    phase: str = "artery"
    seed: int = 0
    workers: int = DEFAULT_WORKERS
    ct_layout: str = "lits"  # layouts of ``lits`` and ``mri`` (kerasunet.core.cases.LAYOUTS)
    mri_layout: str = "mri"
    # --dims 2,2.5,3: the experiment once per arm, side by side (kerasunet.dims_comparison);
    # ``arm`` is set on each arm's own settings (a key of ARMS), None for the plain experiment.
    dims: tuple[str, ...] = ()
    arm: str | None = None

    def hyperparameters(self) -> Preset:
        """The preset with this command's overrides applied.

        Raises:
            ValueError: an unknown preset or loss, or fewer than one repeat.
        """
        if self.preset not in PRESETS:
            raise ValueError(f"Expected preset in {tuple(sorted(PRESETS))}. Received: preset={self.preset!r}")
        overrides = {k: v for k, v in (("repeats", self.repeats), ("ct_epochs", self.epochs_ct),
                                       ("mri_epochs", self.epochs_mri), ("loss", self.loss))
                     if v is not None}
        preset = dataclasses.replace(PRESETS[self.preset], **overrides)
        if preset.repeats < 1:
            raise ValueError(f"Expected repeats >= 1. Received: repeats={preset.repeats}")
        if preset.loss not in EXPERIMENT_LOSSES:
            raise ValueError(f"Expected loss in {EXPERIMENT_LOSSES}. Received: loss={preset.loss!r}")
        return preset

    @property
    def seeds(self) -> list[int]:
        """One seed per repeat; models A, B and C of a repeat share it (same data order)."""
        return [self.seed + 1000 * r for r in range(self.hyperparameters().repeats)]


@dataclass(frozen=True)
class Arm:
    """One arm of ``--dims``: how its records are built and its networks trained."""

    name: str  # the report's column, e.g. "2.5D"
    dims: int  # spatial axes of the network
    context: int = 0  # 2.5D context K of the slice records (2K+1 channels)


# ``--dims`` values: 2D slices, 2.5D slices with 2 neighbours a side, 3D patches of volume records
ARMS = {"2": Arm("2D", 2), "2.5": Arm("2.5D", 2, context=2), "3": Arm("3D", 3)}


def arm_build_options(arm: Arm | None) -> dict:
    """``BuildSettings`` fields of an arm; the plain experiment is the research's 2D (context 0,
    not ``build-records``' 2.5D default)."""
    if arm is None:
        return {"context": 0}
    return {"volumes": True} if arm.dims == 3 else {"context": arm.context}


def arm_train_fields(arm: Arm | None, preset: Preset) -> dict:
    """``TrainSettings`` fields of an arm besides the preset's: a 3D arm's dims and patch."""
    return {"dims": 3, "patch_size": preset.patch_size} if arm and arm.dims == 3 else {}


@dataclass(frozen=True)
class Run:
    """One training run of the experiment."""

    name: str  # run folder name under runs/
    label: str  # row label in the report, e.g. "B (init)"
    mode: str
    loss: str
    repeat: int


@dataclass(frozen=True)
class Step:
    """The output of a finished step: its folder and the hash that identifies its content."""

    path: Path
    digest: str


def plan_runs(settings: ExperimentSettings) -> list[Run]:
    """The MRI runs: A/B/C for every repeat, plus the loss ablation on the scratch model."""
    preset = settings.hyperparameters()
    runs = []
    for r in range(preset.repeats):
        for mode, label in zip(LETTERS.values(), MAIN_LABELS):
            runs.append(Run(f"mri-{mode}-{preset.loss}-r{r}", label, mode, preset.loss, r))
        if settings.ablation:
            for loss in preset.ablation_losses:
                if loss != preset.loss:
                    runs.append(Run(f"mri-scratch-{loss}-r{r}", f"A ({loss})", "scratch", loss, r))
    return runs


def run_experiment(settings: ExperimentSettings, progress: Callable[[str], None] = print) -> Path:
    """Builds records, pretrains on CT, trains A/B/C on MRI, evaluates, writes ``report.md``.

    Rerunning keeps the steps whose settings are unchanged and reruns the others (module
    docstring).

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: bad settings, unusable data or an unreadable ``state.json``; the message
            is one line.
    """
    if settings.dims:
        from kerasunet.dims_comparison import run_dims_comparison

        return run_dims_comparison(settings, progress)
    preset = settings.hyperparameters()
    arm = ARMS[settings.arm] if settings.arm else None
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    state = _State(out / STATE_FILE)
    started = time.perf_counter()
    records = {name: _build(src, name, out / "records" / name, settings, progress)
               for name, src in (("lits", settings.lits), ("mri", settings.mri))}
    common = dict(filters=preset.filters, depth=preset.depth, augment=preset.augment,
                  augment_intensity=preset.augment_intensity,
                  schedule=preset.schedule, oversample_tumour=preset.oversample_tumour,
                  dropout=preset.dropout, monitor=preset.monitor, **arm_train_fields(arm, preset))
    ct_batch, mri_batch = ((preset.patch_batch_size,) * 2 if arm and arm.dims == 3
                           else (preset.ct_batch_size, preset.mri_batch_size))
    ct = _train(state, out / "runs" / "ct", records["lits"], progress, mode="scratch",
                epochs=preset.ct_epochs, batch_size=ct_batch, lr=preset.ct_lr,
                loss=preset.loss, seed=settings.seed, **common)
    runs = plan_runs(settings)
    trained = {}
    for i, run in enumerate(runs, 1):
        progress(f"== MRI run {i}/{len(runs)}: {run.label}, repeat {run.repeat + 1} ==")
        trained[run.name] = _train(state, out / "runs" / run.name, records["mri"], progress, mode=run.mode,
                                   pretrained=None if run.mode == "scratch" else ct,
                                   epochs=preset.mri_epochs, batch_size=mri_batch,
                                   lr=preset.mri_lr, loss=run.loss, seed=settings.seeds[run.repeat], **common)
    ct_eval = _evaluate(state, "eval/ct", {"CT": ct}, records["lits"], out, 2, progress)
    mri_evals = []
    for r in range(preset.repeats):
        models = {run.label: trained[run.name] for run in runs if run.repeat == r}
        mri_evals.append(_evaluate(state, f"eval/mri-r{r}", models, records["mri"], out,
                                   3 if r == 0 else 0, progress))
    report = write_report(out, runs, ct_eval, mri_evals, time.perf_counter() - started)
    progress(f"report: {report}")
    return report


class _State:
    """``state.json``: per step key, the hash and settings it ran with and whether it finished."""

    def __init__(self, path: Path):
        self.path = path
        data = {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: unreadable ({exc}); delete it to rerun every step") from None
        # an older state.json recorded no hashes: its steps cannot be checked, so they rerun
        self.steps = data.get("steps", {}) if data.get("version") == STATE_VERSION else {}

    def start(self, key: str, digest: str, settings: dict) -> None:
        self.steps[key] = {"hash": digest, "settings": settings, "done": False}
        self._write()

    def finish(self, key: str) -> None:
        self.steps[key]["done"] = True
        self._write()

    def _write(self) -> None:
        write_json(self.path, {"version": STATE_VERSION, "steps": self.steps})


def _begin(state: _State, key: str, folder: Path, settings: dict, products, progress) -> tuple[str, bool]:
    """Decides whether step ``key`` (writing ``folder``) can be kept, continued or must rerun.

    Args:
        settings: the step's own settings and the hashes of its inputs (JSON-serialisable).
        products: files that must exist for a finished step to be kept.

    Returns:
        ``(hash, done)``: ``done`` means the step finished with these settings and is kept;
        otherwise the step is to run, in its own folder when it was interrupted with these
        settings, else in an emptied folder.
    """
    digest = hash_settings(settings)
    entry = state.steps.get(key)
    if entry is None:
        reason = f"{folder} has no recorded settings" if folder.exists() else None
    elif entry["hash"] != digest:
        reason = f"settings changed ({_describe_changes(entry['settings'], settings)})"
    elif not entry["done"]:
        return digest, False
    elif all(Path(p).exists() for p in products):
        return digest, True
    else:
        reason = f"its output in {folder} is missing"
    if reason:
        progress(f"{key}: {reason}; rerunning it")
    _clear(folder)
    state.start(key, digest, settings)
    return digest, False


def _describe_changes(old: dict, new: dict) -> str:
    own = changed_settings(old, new, ignore=INPUTS)
    return ", ".join(own + [text for name, text in INPUTS.items() if old.get(name) != new.get(name)])


def _clear(folder: Path) -> None:
    """Deletes ``folder`` after renaming it away, so its name never holds a half-deleted step."""
    trash = folder.with_name(f".replaced-{folder.name}")
    if trash.exists():  # left by a rerun killed while deleting
        shutil.rmtree(trash)
    if folder.exists():
        folder.rename(trash)
        shutil.rmtree(trash)


def _build(source: Path, dataset: str, out: Path, settings: ExperimentSettings, progress) -> Step:
    # build_records keeps its settings hash in the manifest (or its build state while
    # unfinished) and is a no-op for a finished build with the same settings.
    from tfrecords_builder.build import RUN_ONLY, BuildSettings, build_records
    from tfrecords_builder.build import STATE_FILE as BUILD_STATE

    progress(f"== records: {dataset} from {source} ==")
    phase = {"phase": settings.phase} if dataset == "mri" else {}  # CT has no phase: not in its hash
    layout = settings.ct_layout if dataset == "lits" else settings.mri_layout
    build = BuildSettings(source=str(source), dataset=layout, out=str(out), seed=settings.seed, holdout="last",
                          val_fraction=0.2, test_fraction=0.25, workers=settings.workers, **phase,
                          **arm_build_options(ARMS[settings.arm] if settings.arm else None))
    wanted = "ct" if dataset == "lits" else "mri"
    if build.modality != wanted:
        raise ValueError(f"Expected {wanted.upper()} data for the {dataset} side. "
                         f"Received: {source} ({layout} layout, {build.modality.upper()})")
    previous = _previous_build(out, BUILD_STATE)
    if previous is not None and previous.get("settings_hash") != build.settings_hash():
        changes = ", ".join(changed_settings(previous.get("settings", {}), build.to_dict(), ignore=RUN_ONLY))
        progress(f"records:{dataset}: settings changed ({changes or 'source folder'}); rebuilding them")
        build = dataclasses.replace(build, overwrite=True)
    build_records(build, log=progress)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    counts = ", ".join(f"{split} {len(v['cases'])} cases / {v['num_examples']} slices"
                       for split, v in manifest["splits"].items())
    skipped = "; ".join(f"{s['case_id']} ({s['reason']})" for s in manifest["skipped"])
    progress(f"{dataset}: {counts}; skipped {len(manifest['skipped'])}" + (f": {skipped}" if skipped else ""))
    return Step(out, file_sha256(out / MANIFEST_FILE))


def _previous_build(out: Path, build_state: str) -> dict | None:
    """The manifest (finished) or build state (unfinished) in ``out``; ``{}`` if unreadable."""
    for name in (MANIFEST_FILE, build_state):
        if (out / name).exists():
            try:
                return json.loads((out / name).read_text())
            except (OSError, ValueError):
                return {}
    return None


def _train(state: _State, run_dir: Path, records: Step, progress, pretrained: Step | None = None,
           **fields) -> Step:
    """One training run, keyed on its TrainSettings, its records and its pretrained model."""
    from kerasunet.train import train

    settings = TrainSettings(records=str(records.path), out=str(run_dir), resume=True,
                             pretrained=None if pretrained is None else str(pretrained.path), **fields)
    own = {k: v for k, v in settings.to_dict().items() if k not in LOCATION_FIELDS}
    key = f"train:{run_dir.name}"
    digest, done = _begin(state, key, run_dir,
                          {**own, "records": records.digest, "pretrained": pretrained and pretrained.digest},
                          (run_dir / MODEL_FILE, run_dir / CONFIG_FILE), progress)
    if done:
        progress(f"{run_dir.name}: finished earlier with these settings, skipped")
    else:
        train(settings, progress=progress)
        state.finish(key)
    return Step(run_dir, digest)


def _evaluate(state: _State, name: str, models: dict[str, Step], records: Step, out: Path, n_overlays: int,
              progress) -> dict:
    """Evaluates ``models`` (label -> run) on the test split, keyed on them and the records."""
    from kerasunet.evaluate import EvaluateSettings, evaluate

    settings = EvaluateSettings(n_overlays=n_overlays)
    key, folder = f"evaluate:{name}", out / name
    step = {**json.loads(json.dumps(dataclasses.asdict(settings))), "records": records.digest,
            "models": {label: run.digest for label, run in models.items()}}
    _, done = _begin(state, key, folder, step, (folder / "summary.json",), progress)
    if done:
        return json.loads((folder / "summary.json").read_text())
    progress(f"== evaluate {name}: {', '.join(models)} ==")
    summary = evaluate({label: run.path for label, run in models.items()}, records.path, folder, settings,
                       progress=progress)
    state.finish(key)
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


def mri_results(runs: list[Run], mri_evals: list[dict],
                structure: str = "tumour") -> dict[str, dict[str, tuple[float, float]]]:
    """label -> metric -> (mean, std over repeats) of the test metrics of ``structure``."""
    labels = list(dict.fromkeys(run.label for run in runs))
    results = {}
    for label in labels:
        results[label] = {key: _across([_metric(s, label, structure, key) for s in mri_evals])
                          for key, _ in TABLE_METRICS}
    from kerasunet.evaluate import BASELINE

    results[BASELINE] = {key: _across([_metric(s, BASELINE, structure, key, "baselines") for s in mri_evals])
                         for key, _ in TABLE_METRICS}
    return results


def other_mri_results(runs: list[Run], mri_evals: list[dict]) -> dict[str, dict]:
    """structure -> :func:`mri_results` for each structure besides tumour the MRI set holds and
    the models segment (liver for an ATLAS-like set; none for FZMC)."""
    from kerasunet.lits_scoring import summary_outputs

    return {s: mri_results(runs, mri_evals, s) for s in summary_outputs(mri_evals[0]) if s != "tumour"}


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

    return [row["seconds"] for row in read_history(run_dir / TIMING_FILE) if "seconds" in row]


def run_settings(out: Path, runs: list[Run]) -> dict[str, dict]:
    """Run folder name -> the ``train`` section of its ``config.json`` (``ct`` first).

    Raises:
        ValueError: a run has no readable ``config.json``; the message names it.
    """
    settings = {}
    for name in ["ct", *(run.name for run in runs)]:
        path = out / "runs" / name / CONFIG_FILE
        try:
            settings[name] = json.loads(path.read_text())["train"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a readable run config ({type(exc).__name__}: {exc})") from None
    return settings


def settings_table(settings: dict[str, dict], runs: list[Run]) -> str:
    """Markdown table: one row per training setting, one column for CT and per MRI label.

    A cell lists the distinct values over the label's repeats (the seeds differ by design).
    """
    columns = {"CT": [settings["ct"]]}
    for run in runs:
        columns.setdefault(run.label, []).append(settings[run.name])
    keys = dict.fromkeys(k for configs in columns.values() for config in configs for k in config
                         if k not in LOCATION_FIELDS)
    rows = ["| setting | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key in keys:
        cells = [", ".join(dict.fromkeys(f"`{config.get(key)}`" for config in configs))
                 for configs in columns.values()]
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_report(out: Path, runs: list[Run], ct_eval: dict, mri_evals: list[dict], seconds: float) -> Path:
    """Writes ``report.md``, its figures and ``results.json``; returns the report path.

    Every training setting in them is read from the runs' ``config.json``.
    """
    from kerasunet.curves import plot_learning_curves, read_history
    from kerasunet.evaluate import BASELINE

    settings = run_settings(out, runs)
    figures = out / "figures"
    histories: dict[str, list[list[dict]]] = {}
    for run in runs:
        histories.setdefault(run.label, []).append(read_history(out / "runs" / run.name / HISTORY_FILE))
    repeats = max(len(h) for h in histories.values())
    main = {k: v for k, v in histories.items() if k in MAIN_LABELS}
    ablation = {k: v for k, v in histories.items() if k.startswith("A (")}
    plot_learning_curves(main, figures / "learning_curves.png",
                         title=f"MRI tumour models, mean and min-max over {repeats} repeat(s)")
    if len(ablation) > 1:
        plot_learning_curves(ablation, figures / "loss_ablation.png", title="Loss ablation (model A)")
    results, others = mri_results(runs, mri_evals), other_mri_results(runs, mri_evals)
    ct = {s: {key: _metric(ct_eval, "CT", s, key) for key, _ in TABLE_METRICS} for s in ("liver", "tumour")}
    text = _report_text(settings_table(settings, runs), repeats, runs, results, ct, ct_eval, mri_evals,
                        histories, out, seconds, ablation_figure=len(ablation) > 1, others=others)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(text)
    # "mri": the tumour results the research compares; "mri_<structure>": the others the MRI set holds
    write_json(out / "results.json", {"seconds": seconds, "mri": results,
                                      **{f"mri_{s}": r for s, r in others.items()}, "ct": ct,
                                      "baseline": BASELINE, "settings": settings})
    return out / "report.md"


def _report_text(table, repeats, runs, results, ct, ct_eval, mri_evals, histories, out, seconds,
                 ablation_figure, others=None) -> str:
    from kerasunet.evaluate import BASELINE

    lines = ["# CT → MRI transfer experiment", "",
             f"{repeats} repeat(s) per MRI model, total time {seconds / 60:.1f} min.", "",
             "## Settings", "", "Training settings as recorded in each run's `runs/*/config.json`. Test masks are "
             "post-processed and filtered by each run's own lesion filter (`runs/*/lesion_filter.json`), "
             "as `kerasunet evaluate` does by default; `eval/*/report.md` gives lesion precision and "
             "recall before and after it.", "",
             table, "",
             "## What this shows", "", what_this_shows(results, repeats, histories), "",
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
              *_model_table(results),
              "", f"`{BASELINE}` predicts no tumour anywhere: the floor the models must beat.", ""]
    for structure, structure_results in (others or {}).items():
        lines += [f"## Test metrics, MRI {structure}", "",
                  f"The MRI set's labels hold {structure} too, so its models segment it (two outputs, and "
                  "B and C start from the whole CT head).", "", *_model_table(structure_results), ""]
    lines += ["## CT model (pretraining), held-out CT", "",
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


def _model_table(results: dict) -> list[str]:
    """A markdown table: one row per model, a mean ± std cell per ``TABLE_METRICS`` entry."""
    lines = ["| model | " + " | ".join(name for _, name in TABLE_METRICS) + " |",
             "|---" * (len(TABLE_METRICS) + 1) + "|"]
    return lines + [f"| {label} | " + " | ".join(_pm(metrics[key]) for key, _ in TABLE_METRICS) + " |"
                    for label, metrics in results.items()]


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
