"""``kerasunet evaluate``: LiTS metrics, a markdown report and overlay figures for one or more models."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from cli.predict import postprocess_options, postprocess_settings
from kerasunet.evaluate import EvaluateError, EvaluateSettings, evaluate as run_evaluation, name_models
from kerasunet.core.nifti import VolumeError
from kerasunet.predict import PredictSettings
from kerasunet.core.runs import RunError


@click.command("evaluate")
@click.option("--model", "models", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Run folder or .keras file (config.json beside it); repeat it to compare models.")
@click.option("--records", "records_dir", type=click.Path(path_type=Path),
              help="A records folder: its manifest's --split cases (the source volumes and labels).")
@click.option("--input", "input_dir", type=click.Path(path_type=Path),
              help="Instead of --records: a folder of volumes with labels (LiTS or MRI layout).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="The report folder.")
@click.option("--split", default="test", show_default=True, help="Manifest split (with --records).")
@click.option("--overlays", "n_overlays", type=click.IntRange(min=0), default=3, show_default=True,
              help="Cases that get an overlay figure.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Slices per model call.")
@click.option("--tta/--no-tta", default=False, show_default=True, help="Average predictions over flips.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
              show_default=True, help="Probability at or above which a voxel is foreground.")
@postprocess_options
@click.option("--phase", default="artery", show_default=True,
              help="MRI layout (with --input): image file stem in each case folder.")
@click.pass_context
def evaluate(ctx, models, records_dir, input_dir, out_dir, split, n_overlays, batch_size, tta, threshold, phase,
             **postprocess):
    """Evaluate models on held-out volumes: metrics.csv, summary.json, report.md, overlays/.

    Several models (--model A --model B ...) segment the same cases with the same settings.
    """
    if (records_dir is None) == (input_dir is None):
        raise click.UsageError("give --records DIR (a records folder) or --input DIR (volumes with labels)")
    if input_dir is not None and ctx.get_parameter_source("split") is not ParameterSource.DEFAULT:
        raise click.UsageError("--split applies to --records only")
    predict = PredictSettings(batch_size=batch_size, tta=tta, threshold=threshold,
                              postprocess=postprocess_settings(**postprocess), phase=phase)
    settings = EvaluateSettings(predict=predict, n_overlays=n_overlays, split=split)
    data = records_dir if records_dir is not None else input_dir
    try:
        summary = run_evaluation(name_models(models), data, out_dir, settings, progress=click.echo,
                                 records=records_dir is not None)
    except (RunError, VolumeError, EvaluateError) as exc:
        raise click.ClickException(str(exc)) from None
    for name, model in summary["models"].items():
        dice = ", ".join(f"{s} Dice/case {v['dice_per_case']:.3f} global {v['global_dice']:.3f}"
                         for s, v in model["structures"].items())
        click.echo(f"{name}: {dice}")
    click.echo(f"wrote {out_dir / 'report.md'}, metrics.csv, summary.json, {len(summary['overlays'])} overlay(s)")
