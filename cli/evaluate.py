"""``kerasunet evaluate``: LiTS metrics, a markdown report and overlay figures for one or more models."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from cli.predict import lesion_filter_options, postprocess_options, postprocess_settings
from kerasunet.core.labels import check_outputs
from kerasunet.core.preprocessing import MODALITIES
from kerasunet.evaluate import EvaluateError, EvaluateSettings, evaluate as run_evaluation, name_models
from kerasunet.core.cases import LAYOUTS
from kerasunet.core.nifti import VolumeError
from kerasunet.lits_metrics import CONVENTIONS
from kerasunet.predict import PredictSettings
from kerasunet.core.runs import RunError


@click.command("evaluate")
@click.option("--model", "models", multiple=True, type=click.Path(path_type=Path),
              help="Run folder or .keras file (config.json beside it); repeat it to compare models.")
@click.option("--pred", "pred_dir", type=click.Path(path_type=Path),
              help="Instead of --model: a folder of predicted label maps, made by anything (with --truth).")
@click.option("--truth", "truth_dir", type=click.Path(path_type=Path),
              help="With --pred: the true label maps, matched to the predictions by file name.")
@click.option("--modality", type=click.Choice(MODALITIES), default="ct", show_default=True,
              help="With --pred: label values of the masks (ct: 1 liver, 2 tumour; mri: 1 tumour).")
@click.option("--structures", default=None, metavar="LIST",
              help="With --pred: the structures the masks hold, comma-separated, valued 1, 2, ... in "
                   "that order (liver,tumour for ATLAS MRI masks) [default: the modality's].")
@click.option("--convention", type=click.Choice(CONVENTIONS), default=None,
              help="Scoring convention: lits2017 (the LiTS organisers' program) or medpy "
                   "[default: lits2017 for CT, medpy for MRI].")
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
@click.option("--layout", type=click.Choice(list(LAYOUTS)), default=None,
              help="Layout of --input [default: detected]; see docs/datasets.md.")
@click.option("--series", default=None, metavar="UID",
              help="DICOM: the SeriesInstanceUID to read where a folder holds several series.")
@click.pass_context
def evaluate(ctx, models, pred_dir, truth_dir, modality, structures, convention, records_dir, input_dir, out_dir,
             split,
             n_overlays, batch_size, tta, threshold, phase, layout, series, **postprocess):
    """Evaluate models on held-out volumes: metrics.csv, summary.json, report.md, overlays/.

    Several models (--model A --model B ...) segment the same cases with the same settings.
    With --pred DIR --truth DIR, masks made by any tool are scored instead.
    """
    if pred_dir is not None or truth_dir is not None:
        summary = score_mask_folders(ctx, models, pred_dir, truth_dir, modality, structures, convention, out_dir)
        echo_summary(summary, out_dir)
        return
    if structures is not None:
        raise click.UsageError("--structures applies to --pred/--truth; a model's run names its own")
    if not models:
        raise click.UsageError("give --model (repeatable), or --pred DIR --truth DIR to score masks")
    if (records_dir is None) == (input_dir is None):
        raise click.UsageError("give --records DIR (a records folder) or --input DIR (volumes with labels)")
    if input_dir is not None and ctx.get_parameter_source("split") is not ParameterSource.DEFAULT:
        raise click.UsageError("--split applies to --records only")
    lesion_filter = lesion_filter_options(postprocess)
    predict = PredictSettings(batch_size=batch_size, tta=tta, threshold=threshold, **lesion_filter,
                              postprocess=postprocess_settings(**postprocess), phase=phase, layout=layout,
                              series=series)
    settings = EvaluateSettings(predict=predict, n_overlays=n_overlays, split=split, convention=convention)
    data = records_dir if records_dir is not None else input_dir
    try:
        summary = run_evaluation(name_models(models), data, out_dir, settings, progress=click.echo,
                                 records=records_dir is not None)
    except (RunError, VolumeError, EvaluateError) as exc:
        raise click.ClickException(str(exc)) from None
    echo_summary(summary, out_dir)


def score_mask_folders(ctx, models, pred_dir, truth_dir, modality, structures, convention, out_dir) -> dict:
    """``--pred``/``--truth``: scores two folders of label maps (no model runs)."""
    from kerasunet.lits_scoring import ScoringError, score_folders

    if pred_dir is None or truth_dir is None:
        raise click.UsageError("--pred and --truth go together")
    model_only = ("models", "records_dir", "input_dir")
    clash = [name for name in model_only if ctx.params[name]]
    if clash:
        raise click.UsageError("--pred/--truth score existing masks; drop --model, --records and --input")
    try:
        outputs = check_outputs(s.strip() for s in structures.split(",")) if structures else None
    except ValueError as exc:
        raise click.UsageError(f"--structures {structures}: {exc}") from None
    try:
        return score_folders(pred_dir, truth_dir, out_dir, convention=convention, modality=modality,
                             progress=click.echo, outputs=outputs)
    except (ScoringError, VolumeError, ValueError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from None


def echo_summary(summary: dict, out_dir: Path) -> None:
    """One line per model: Dice per case and global Dice per structure, lesion detection, tumour burden."""
    for name, model in summary["models"].items():
        parts = []
        for structure, v in model["structures"].items():
            parts.append(f"{structure} Dice/case {v['dice_per_case']:.3f} global {v['global_dice']:.3f}")
            if v.get("lesion_recall") is not None:
                parts.append(f"lesion recall {v['lesion_recall']:.3f} precision {v.get('lesion_precision') or 0:.3f}")
        burden = (model.get("tumour_burden") or {}).get("rmse")
        if burden is not None:
            parts.append(f"tumour burden RMSE {burden:.4f}")
        click.echo(f"{name} ({model['convention']}): " + ", ".join(parts))
    overlays = len(summary.get("overlays", []))
    click.echo(f"wrote {out_dir / 'report.md'}, metrics.csv, summary.json" + (f", {overlays} overlay(s)" if overlays else ""))
