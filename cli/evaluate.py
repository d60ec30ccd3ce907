"""``kerasunet evaluate``: LiTS metrics, a markdown report and overlay figures for one or more models."""

from __future__ import annotations

from pathlib import Path

import click

from cli.predict import postprocess_options, postprocess_settings
from kerasunet.evaluate import EvaluateError, EvaluateSettings, evaluate as run_evaluation, name_models
from kerasunet.core.nifti import VolumeError
from kerasunet.predict import PredictSettings
from kerasunet.core.runs import RunError


@click.command("evaluate")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Run folder or .keras file (config.json beside it).")
@click.option("--compare", "compare", multiple=True, type=click.Path(path_type=Path),
              help="Another model on the same cases; repeat it, or list runs after it (--compare A B C).")
@click.argument("more_runs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="A records folder (its manifest's test split) or a folder of volumes with labels.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="The report folder.")
@click.option("--split", default="test", show_default=True, help="Manifest split (records folders only).")
@click.option("--overlays", "n_overlays", type=click.IntRange(min=0), default=3, show_default=True,
              help="Cases that get an overlay figure.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Slices per model call.")
@click.option("--tta/--no-tta", default=False, show_default=True, help="Average predictions over flips.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
              show_default=True, help="Probability at or above which a voxel is foreground.")
@postprocess_options
@click.option("--phase", default="artery", show_default=True, help="MRI layout: image file stem in each case folder.")
def evaluate(model_path, compare, more_runs, data, out_dir, split, n_overlays, batch_size, tta, threshold, phase,
             **postprocess):
    """Evaluate models on held-out volumes: metrics.csv, summary.json, report.md, overlays/.

    Several models: --model A --compare B --compare C, or --compare A B C (runs listed after
    --compare are compared too). All models segment the same cases with the same settings.
    """
    paths = [p for p in (model_path, *compare, *more_runs) if p is not None]
    if not paths:
        raise click.UsageError("give --model RUN_DIR (and optionally --compare RUN_B ...)")
    predict = PredictSettings(batch_size=batch_size, tta=tta, threshold=threshold,
                              postprocess=postprocess_settings(**postprocess), phase=phase)
    settings = EvaluateSettings(predict=predict,
                                n_overlays=n_overlays, split=split)
    try:
        summary = run_evaluation(name_models(paths), data, out_dir, settings, progress=click.echo)
    except (RunError, VolumeError, EvaluateError) as exc:
        raise click.ClickException(str(exc)) from None
    for name, model in summary["models"].items():
        dice = ", ".join(f"{s} Dice/case {v['dice_per_case']:.3f} global {v['global_dice']:.3f}"
                         for s, v in model["structures"].items())
        click.echo(f"{name}: {dice}")
    click.echo(f"wrote {out_dir / 'report.md'}, metrics.csv, summary.json, {len(summary['overlays'])} overlay(s)")
