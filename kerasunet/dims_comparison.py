"""``experiment transfer --dims 2,2.5,3``: the experiment in 2D, 2.5D and 3D, side by side.

The research's first experiment was a 3D U-Net, abandoned for memory, in the belief that it
"would outperform 2D U-Nets on the given data". Here each arm (``experiment.ARMS``) is the
whole transfer experiment (CT model, then A/B/C on MRI, ``repeats`` times), run by
:func:`kerasunet.experiment.run_experiment` in its own folder with its own resumable state:

* **2D**: slice records, context 0 (the plain experiment's records and networks);
* **2.5D**: slice records with context 2 (5 channels: each slice and two neighbours a side);
* **3D**: volume records (``build-records --volumes``) and ``train --dims 3`` on the
  preset's ``patch_size`` with ``patch_batch_size`` patches per step.

Every arm builds its records from the same folders with the same seed and split rule, so the
test cases are the same (the report says so, or which differ). Layout::

    EXP_DIR/arms/2d, arms/2.5d, arms/3d    one experiment each (records, runs, eval, report.md)
    EXP_DIR/dims_report.md                 the comparison
    EXP_DIR/dims_results.json              its numbers

The comparison, per model (A, B, C) and arm: the test tumour Dice per case, ASSD and lesion
recall (mean ± std over repeats), seconds per epoch, and per arm the planner's estimate of
one MRI training step's peak memory (:func:`kerasunet.planner.estimate_memory`, float32; a
measured peak is benchmarks/memory.py's) and the inference time per test volume (model A of
repeat 1, whole volumes through ``predict_volume``, after one untimed warm-up volume).
Arms are compared on the per-case Dice, paired by case and repeat, with
:func:`kerasunet.compare.compare_pair`'s bootstrap interval: per model, and over all three
models together (pairs by model, case and repeat); they "differ" only where the interval
excludes 0.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kerasunet.compare import PairComparison, compare_arms
from kerasunet.core.atomic import atomic_path, write_json
from kerasunet.core.records_format import MANIFEST_FILE
from kerasunet.core.runs import CONFIG_FILE
from kerasunet.experiment import (ARMS, MAIN_LABELS, Arm, ExperimentSettings, _across, _metric, _pm, _timing,
                                  plan_runs, run_experiment)

REPORT_FILE, RESULTS_FILE = "dims_report.md", "dims_results.json"
METRICS = (("dice_per_case", "Dice per case"), ("assd", "ASSD (mm)"), ("lesion_recall", "lesion recall"))
POOLED = "A, B and C"


@dataclass(frozen=True)
class ArmResults:
    """What the report shows of one arm.

    Attributes:
        name: ``2D``, ``2.5D`` or ``3D``.
        folder: the arm's experiment folder.
        dice: model label -> ``{(case, repeat): tumour Dice}`` on the test cases.
        metrics: model label -> metric key (:data:`METRICS`) -> (mean, std over repeats).
        seconds_per_epoch: model label -> (mean, std over runs) of a run's mean epoch time.
        memory_gib: planner estimate of one MRI training step, float32, GiB.
        inference_seconds: mean seconds per test volume.
    """

    name: str
    folder: Path
    dice: dict
    metrics: dict
    seconds_per_epoch: dict
    memory_gib: float
    inference_seconds: float


def plan_arms(settings: ExperimentSettings) -> list[tuple[Arm, ExperimentSettings]]:
    """Each arm of ``settings.dims`` with the experiment settings it runs with.

    An arm's settings are ``settings`` with ``out = EXP_DIR/arms/<key>d``, ``arm = key`` and
    no ``dims`` (so it runs as one plain experiment); seed, split and preset are shared.

    Raises:
        ValueError: an unknown or repeated ``--dims`` value.
    """
    dims = tuple(settings.dims)
    if not dims or any(d not in ARMS for d in dims) or len(set(dims)) != len(dims):
        raise ValueError(f"Expected --dims values from {', '.join(ARMS)}, each once (e.g. 2,2.5,3). "
                         f"Received: dims={','.join(dims)}")
    settings.hyperparameters()  # bad presets fail before any arm runs
    return [(ARMS[key], dataclasses.replace(settings, out=Path(settings.out) / "arms" / f"{key}d", dims=(), arm=key))
            for key in dims]


def run_dims_comparison(settings: ExperimentSettings, progress: Callable[[str], None] = print) -> Path:
    """Runs the experiment once per arm (each resumable on its own), then writes the comparison.

    Returns:
        The path of ``dims_report.md``.
    """
    arms = plan_arms(settings)
    for arm, arm_settings in arms:
        progress(f"=== arm {arm.name}: {arm_settings.out} ===")
        run_experiment(arm_settings, progress)
    results = [collect_arm(arm, arm_settings, progress) for arm, arm_settings in arms]
    report = write_dims_report(Path(settings.out), results, settings.hyperparameters().repeats)
    progress(f"report: {report}")
    return report


def collect_arm(arm: Arm, settings: ExperimentSettings, progress: Callable[[str], None] = print) -> ArmResults:
    """Reads an arm's finished experiment and times its inference (module docstring)."""
    out, repeats = Path(settings.out), settings.hyperparameters().repeats
    runs = [run for run in plan_runs(settings) if run.label in MAIN_LABELS]
    summaries = [json.loads((out / "eval" / f"mri-r{r}" / "summary.json").read_text()) for r in range(repeats)]
    dice = {label: {} for label in MAIN_LABELS}
    for r in range(repeats):
        with open(out / "eval" / f"mri-r{r}" / "metrics.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row["model"] in dice:
                    dice[row["model"]][(row["case"], r)] = float(row["tumour_dice"] or "nan")
    metrics = {label: {key: _across([_metric(s, label, "tumour", key) for s in summaries]) for key, _ in METRICS}
               for label in MAIN_LABELS}
    seconds = {label: _across([float(np.mean(_timing(out / "runs" / run.name) or [math.nan]))
                               for run in runs if run.label == label]) for label in MAIN_LABELS}
    first = out / "runs" / runs[0].name
    return ArmResults(arm.name, out, dice, metrics, seconds, training_memory_gib(first, out / "records" / "mri"),
                      inference_seconds(first, out / "records" / "mri", settings.phase, progress))


def training_memory_gib(run_dir: Path, records: Path) -> float:
    """The planner's float32 peak for one training step of ``run_dir``'s network and batch.

    3D: the run's patch and spacing. 2D: the largest training slice of the records, padded to
    a multiple of ``2**depth`` (the reader's padding).
    """
    from kerasunet.planner import estimate_memory

    config = json.loads((run_dir / CONFIG_FILE).read_text())
    model, batch = config["model"], int(config["train"]["batch_size"])
    if model.get("dims") == 3:
        size, spacing = tuple(model["patch_size"]), model.get("spacing")
    else:
        manifest = json.loads((records / MANIFEST_FILE).read_text())
        step = 2 ** int(model["depth"])
        shapes = [manifest["cases"][case]["shape"] for case in manifest["splits"]["train"]["cases"]]
        size, spacing = tuple(-(-max(s[axis] for s in shapes) // step) * step for axis in (0, 1)), None
    estimate = estimate_memory(size, batch, "float32", int(model["input_channels"]), int(model["num_outputs"]),
                               int(model["filters"]), int(model["depth"]), spacing)
    return estimate.total_gib


def inference_seconds(run_dir: Path, records: Path, phase: str, progress: Callable[[str], None] = print) -> float:
    """Mean seconds per test volume of ``run_dir``'s model (``predict_volume``, default settings).

    The first volume runs once untimed first, so tracing the model is not counted.
    """
    from kerasunet.core.cases import load_image
    from kerasunet.evaluate import find_eval_cases
    from kerasunet.predict import load_predictor, predict_volume

    cases = find_eval_cases(records, "test", phase)[1]
    model, info = load_predictor(run_dir)
    volumes = [load_image(case.image, case.series) for case in cases]
    if not volumes:
        return math.nan
    predict_volume(model, info, volumes[0])
    start = time.perf_counter()
    for volume in volumes:
        predict_volume(model, info, volume)
    seconds = (time.perf_counter() - start) / len(volumes)
    progress(f"{run_dir.name}: {seconds:.2f} s per test volume ({len(volumes)} volumes)")
    return seconds


def comparisons(results: list[ArmResults]) -> dict[str, list[PairComparison]]:
    """Paired comparisons between arms: per model label, and pooled over A, B and C."""
    out = {}
    for label in MAIN_LABELS:
        out[label] = _compare({r.name: r.dice[label] for r in results})
    pooled = {r.name: {(label, *key): d for label in MAIN_LABELS for key, d in r.dice[label].items()}
              for r in results}
    out[POOLED] = _compare(pooled)
    return out


def _compare(scores: dict) -> list[PairComparison]:
    try:
        return compare_arms(scores)
    except ValueError:  # fewer than 2 pairs scored by both arms (no test case with a Dice)
        return []


def repeat_spread(result: ArmResults, label: str) -> float:
    """The std over repeats of the mean test tumour Dice per case of ``label``."""
    return result.metrics[label]["dice_per_case"][1]


def what_this_shows(results: list[ArmResults], compared: dict[str, list[PairComparison]], repeats: int) -> str:
    """The answer to the research's question, 3D against 2D on this data, from the numbers."""
    by_name = {r.name: r for r in results}
    if "3D" not in by_name or "2D" not in by_name:
        names = " and ".join(by_name)
        return f"Only {names} ran, so this report cannot answer 3D against 2D; rerun with --dims 2,3 (or 2,2.5,3)."
    three, two = by_name["3D"], by_name["2D"]
    pooled = next((c for c in compared[POOLED] if {c.first, c.second} == {"2D", "3D"}), None)
    lines = []
    if pooled is None:
        lines.append("No test case has a tumour Dice for both 2D and 3D, so the two cannot be compared here.")
    else:
        sign = 1 if pooled.first == "3D" else -1
        diff, low, high = sign * pooled.mean_difference, *sorted((sign * pooled.low, sign * pooled.high))
        verdict = ("3D is better" if low > 0 else "3D is worse" if high < 0 else
                   "the interval includes 0, so on this data 3D and 2D cannot be told apart")
        lines.append(f"Over A, B and C together, 3D minus 2D tumour Dice per case is {diff:+.3f} "
                     f"(95% CI {low:+.3f} to {high:+.3f}, {pooled.pairs} case-repeat pairs): {verdict}.")
    spreads = ", ".join(f"{label[0]} {repeat_spread(two, label):.3f} / {repeat_spread(three, label):.3f}"
                        for label in MAIN_LABELS)
    if repeats < 2:
        lines.append("With one repeat there is no spread between repeats; rerun with --repeats 3 or more.")
    else:
        lines.append(f"The spread between {repeats} repeats (std of the mean Dice, 2D / 3D) is {spreads}.")
    per_model = []
    for label in MAIN_LABELS:
        pair = next((c for c in compared[label] if {c.first, c.second} == {"2D", "3D"}), None)
        if pair is not None:
            per_model.append(f"{label[0]} {'differ' if pair.differ else 'no clear difference'}")
    if per_model:
        lines.append("Per model: " + ", ".join(per_model) + ".")
    cost = [f"{r.name} {r.memory_gib:.2f} GiB, {r.inference_seconds:.2f} s per volume" for r in results]
    lines.append("Estimated peak training memory and inference time: " + "; ".join(cost) + ".")
    return " ".join(lines)


def write_dims_report(out: Path, results: list[ArmResults], repeats: int) -> Path:
    """Writes ``dims_report.md`` and ``dims_results.json``; returns the report's path."""
    compared = comparisons(results)
    lines = ["# 2D, 2.5D and 3D on the same data", "",
             f"Each arm is the whole CT → MRI experiment ({repeats} repeat(s) of A, B and C); its own report: "
             + ", ".join(f"[{r.name}]({r.folder.relative_to(out)}/report.md)" for r in results) + ".", "",
             _cases_line(results), "",
             "## What this shows", "", what_this_shows(results, compared, repeats), "",
             "## Test tumour metrics and cost", "",
             "Mean ± std over repeats; seconds per epoch over the runs of a model.", "",
             "| model | arm | " + " | ".join(name for _, name in METRICS) + " | s/epoch |",
             "|---" * (len(METRICS) + 3) + "|"]
    for label in MAIN_LABELS:
        for r in results:
            cells = [_pm(r.metrics[label][key]) for key, _ in METRICS] + [_pm(r.seconds_per_epoch[label], 1)]
            lines.append(f"| {label} | {r.name} | " + " | ".join(cells) + " |")
    lines += ["", "| arm | est. peak training memory (GiB, float32) | inference (s per test volume) |",
              "|---|---|---|"]
    lines += [f"| {r.name} | {r.memory_gib:.3f} | {r.inference_seconds:.2f} |" for r in results]
    lines += ["", "## Paired comparisons (tumour Dice per case, bootstrap 95% interval)", ""]
    for label, pairs in compared.items():
        lines.append(f"- {label}: " + ("; ".join(c.describe() for c in pairs) if pairs else "no pairs to compare"))
    lines.append("")
    with atomic_path(out / REPORT_FILE) as tmp:
        tmp.write_text("\n".join(lines))
    write_json(out / RESULTS_FILE, {
        "repeats": repeats,
        "arms": {r.name: {"folder": str(r.folder), "metrics": r.metrics, "seconds_per_epoch": r.seconds_per_epoch,
                          "memory_gib": r.memory_gib, "inference_seconds": r.inference_seconds} for r in results},
        "comparisons": {label: [dataclasses.asdict(c) | {"differ": c.differ} for c in pairs]
                        for label, pairs in compared.items()}})
    return out / REPORT_FILE


def _cases_line(results: list[ArmResults]) -> str:
    cases = {r.name: sorted({case for d in r.dice.values() for case, _ in d}) for r in results}
    first = next(iter(cases.values()))
    if all(c == first for c in cases.values()):
        return f"Every arm is tested on the same {len(first)} MRI case(s): {', '.join(first)}."
    return "The arms' test cases differ (only cases in both arms are paired): " + "; ".join(
        f"{name}: {', '.join(c)}" for name, c in cases.items())
