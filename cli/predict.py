"""``kerasunet predict``: segment NIfTI volumes with a local model or a TF Serving model."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from kerasunet.core.cases import LAYOUTS
from kerasunet.core.nifti import VolumeError
from kerasunet.postprocess import PostprocessSettings
from kerasunet.predict import ENGINES, OUTPUT_FORMATS, PredictSettings, predict_path, predict_path_served
from kerasunet.core.runs import RunError
from kerasunet.serving_client import GRPC_SCHEME, ServingError

_DEFAULTS = PostprocessSettings()


def postprocess_options(command):
    """The post-processing options (one per ``PostprocessSettings`` field), shared with ``evaluate``."""
    options = [
        click.option("--no-postprocess", is_flag=True, help="Skip post-processing: the thresholded output as it is."),
        click.option("--largest-liver-component/--no-largest-liver-component",
                     default=_DEFAULTS.largest_liver_component, show_default=True, help="CT: keep only the largest 3D component of liver (+ tumour)."),
        click.option("--fill-liver-holes/--no-fill-liver-holes", default=_DEFAULTS.fill_liver_holes,
                     show_default=True, help="CT: background enclosed by liver in an axial slice becomes liver."),
        click.option("--tumour-in-liver/--no-tumour-in-liver", default=_DEFAULTS.tumour_in_liver, show_default=True,
                     help="CT: drop tumour farther than --liver-dilation-mm from the kept liver."),
        click.option("--liver-dilation-mm", type=click.FloatRange(min=0), default=_DEFAULTS.liver_dilation_mm,
                     show_default=True, help="CT: the margin around the liver for --tumour-in-liver, in mm."),
        click.option("--lesion-filter", type=click.Path(path_type=Path), default=None,
                     help="JSON thresholds on per-lesion features (kerasunet.lesion_filter); lesions failing "
                          "them are dropped after post-processing [the run's own lesion_filter.json, fitted "
                          "at the end of training, when it has one]."),
        click.option("--no-lesion-filter", is_flag=True,
                     help="Keep every lesion: do not apply the run's own lesion_filter.json."),
        click.option("--min-tumour-voxels", type=click.IntRange(min=0), default=_DEFAULTS.min_tumour_voxels,
                     show_default=True, help="Drop tumour components smaller than this (0 keeps all)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def lesion_filter_options(postprocess: dict) -> dict:
    """``PredictSettings`` fields of ``--lesion-filter``/``--no-lesion-filter`` (popped from
    ``postprocess``): the file's thresholds (None without it) and whether a run's own apply.

    Raises:
        click.UsageError: both options.
        click.ClickException: a bad file, in one line.
    """
    path, off = postprocess.pop("lesion_filter"), postprocess.pop("no_lesion_filter")
    if path is not None and off:
        raise click.UsageError("--lesion-filter and --no-lesion-filter are mutually exclusive")
    if path is None:
        return {"lesion_filter": None, "run_lesion_filter": not off}
    from kerasunet.lesion_filter import read_lesion_filter

    try:
        return {"lesion_filter": read_lesion_filter(path), "run_lesion_filter": True}
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def postprocess_settings(no_postprocess: bool, **rules) -> PostprocessSettings:
    """The settings of the options added by :func:`postprocess_options` (one per field)."""
    return PostprocessSettings(enabled=not no_postprocess, **rules)


@click.command("predict")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Run folder (best.keras + config.json) or a .keras file with config.json beside it.")
@click.option("--server", default=None,
              help="TF Serving instead of --model: http://HOST:8501 (REST) or grpc://HOST:8500 (gRPC).")
@click.option("--model-name", default=None, help="With --server: the served model's name.")
@click.option("--model-version", type=click.IntRange(min=1), default=None,
              help="With --server: a specific version (default: the server's latest).")
@click.option("--model-label", default=None,
              help="With --server: a version label from models.config (stable, canary) instead of --model-version.")
@click.option("--grpc-max-message-mb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With grpc://: the largest request or answer in MiB (default 4, gRPC's own); the server "
                   "needs a matching grpc.max_receive_message_length.")
@click.option("--input", "input_path", required=True, type=click.Path(path_type=Path),
              help="A .nii/.nii.gz volume, a DICOM series folder, or a dataset folder in any --layout.")
@click.option("--output", "output_path", required=True, type=click.Path(path_type=Path),
              help="Mask file (.nii/.nii.gz) for a single volume, else a folder: segmentation-N.nii[.gz] "
                   "(LiTS), CASE/prediction.nii.gz (MRI) or the case's label file name (other layouts).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Slices per model call (with --server: per request).")
@click.option("--patch-batch-size", type=click.IntRange(min=1), default=PredictSettings.patch_batch_size,
              show_default=True, help="3D models: sliding windows per model call (with --server: per request).")
@click.option("--tta/--no-tta", default=False, show_default=True,
              help="Average over flips (none, height, width, both; 3D: the 8 flips of D, H, W); 4x (8x) slower. "
                   "Local --model only.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5,
              show_default=True, help="Probability at or above which a voxel is foreground.")
@click.option("--probabilities", is_flag=True,
              help="Also write float32 probability maps (probabilities-N.nii.gz / CASE/probabilities.nii.gz).")
@postprocess_options
@click.option("--phase", default="artery", show_default=True, help="MRI layout: image file stem in each case folder.")
@click.option("--layout", type=click.Choice(list(LAYOUTS)), default=None,
              help="Layout of a folder --input [default: detected]; see docs/datasets.md.")
@click.option("--series", default=None, metavar="UID",
              help="DICOM: the SeriesInstanceUID to read when a folder holds several series.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="With --server: seconds to wait for each answer.")
@click.option("--output-format", type=click.Choice(OUTPUT_FORMATS), default="nifti", show_default=True,
              help="nifti: masks as .nii.gz; dicom-seg: for DICOM series input, a DICOM Segmentation (.dcm) "
                   "referencing the series, one segment per structure (needs the dicom extra).")
@click.option("--engine", type=click.Choice(ENGINES), default="keras", show_default=True,
              help="Local --model: keras (the run's .keras model) or onnx (the model.onnx of `kerasunet export "
                   "--format onnx`, or a folder holding one, run by onnxruntime without TensorFlow; faster on CPU).")
@click.pass_context
def predict(ctx, model_path, server, model_name, model_version, model_label, grpc_max_message_mb, input_path,
            output_path, batch_size, patch_batch_size, tta, threshold, probabilities, phase, layout, series, timeout,
            engine, output_format, **postprocess):
    """Segment volumes; masks keep the input's own affine, shape and orientation.

    Post-processing (default on; after Chlebus et al. 2018): CT keeps the largest 3D liver
    component, tumour only within --liver-dilation-mm (5 mm) of it, and drops tumour components
    under --min-tumour-voxels (10); MRI only drops the small tumour components. With --server
    the served model returns probabilities and the threshold and post-processing run here, so
    the masks equal a local --model run of the same model; a served model of the other modality
    than the input folder's layout, or of other channels, is refused before any volume is sent.
    Exits with status 1 when any volume failed (the others are still written).
    """
    _check_source(ctx, model_path, server, model_name, model_version, tta)
    _check_server_options(server, model_version, model_label, grpc_max_message_mb)
    lesion_filter = lesion_filter_options(postprocess)
    settings = PredictSettings(batch_size=batch_size, patch_batch_size=patch_batch_size, tta=tta, threshold=threshold,
                               postprocess=postprocess_settings(**postprocess), **lesion_filter,
                               save_probabilities=probabilities, phase=phase, layout=layout, series=series,
                               engine=engine, output_format=output_format)
    try:
        if server:
            max_bytes = None if grpc_max_message_mb is None else int(grpc_max_message_mb * 2**20)
            result = predict_path_served(server, model_name, input_path, output_path, settings,
                                         version=model_version, timeout=timeout, progress=click.echo,
                                         label=model_label, max_message_bytes=max_bytes)
        else:
            result = predict_path(model_path, input_path, output_path, settings, progress=click.echo)
    except (RunError, VolumeError, ServingError) as exc:
        raise click.ClickException(str(exc)) from None
    if len(result.failures) == 1 and not result.written:  # the one input failed: its reason is the error
        path, message = result.failures[0]
        raise click.ClickException(message if message.startswith(str(path)) else f"{path}: {message}")
    click.echo(f"wrote {len(result.written)} mask(s) under {output_path}")
    if result.failures:
        for path, message in result.failures:
            # messages of VolumeError already start with the path
            line = message if message.startswith(str(path)) else f"{path}: {message}"
            click.echo(f"failed: {line}", err=True)
        raise click.ClickException(f"{len(result.failures)} of {len(result.failures) + len(result.written)} "
                                   "volume(s) failed")


def _check_source(ctx, model_path, server, model_name, model_version, tta) -> None:
    if model_path and server:
        raise click.UsageError("--model and --server are mutually exclusive: use a local model or a served one")
    if not model_path and not server:
        raise click.UsageError("give --model RUN_DIR (local) or --server URL --model-name NAME (TF Serving)")
    if server and not model_name:
        raise click.UsageError("--server needs --model-name")
    if server and tta:
        raise click.UsageError("--tta needs a local --model: the served graph has no flips")
    if server and ctx.params["engine"] != "keras":
        raise click.UsageError("--engine only applies to a local --model; a --server runs its own graph")
    given_timeout = ctx.get_parameter_source("timeout") is not ParameterSource.DEFAULT
    if not server and (model_name or model_version or given_timeout):
        raise click.UsageError("--model-name/--model-version/--timeout only apply with --server")


def _check_server_options(server, model_version, model_label, grpc_max_message_mb) -> None:
    if model_label is not None and not server:
        raise click.UsageError("--model-label only applies with --server")
    if model_label is not None and model_version is not None:
        raise click.UsageError("--model-version and --model-label are mutually exclusive: a label names a version")
    if grpc_max_message_mb is not None and not (server or "").startswith(GRPC_SCHEME):
        raise click.UsageError("--grpc-max-message-mb only applies with --server grpc://HOST:PORT")
