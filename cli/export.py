"""``kerasunet export``: a run's model as a versioned SavedModel for TF Serving."""

from __future__ import annotations

from pathlib import Path

import click

from kerasunet.export import CONFIG_FILE, INFO_FILE, LABELS, ExportError, export_model
from kerasunet.core.runs import RunError
from kerasunet.onnx_engine import onnx_model_of, write_onnx


@click.command("export")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="Run folder (best.keras + config.json) or a .keras file with config.json beside it.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="saved_models/NAME: NAME is the served model name; versions go in NAME/1, NAME/2, ...")
@click.option("--version", type=click.IntRange(min=1), default=None,
              help="Version number. Default: the highest existing version + 1 (1 for a new model).")
@click.option("--overwrite", is_flag=True, help="Replace the version folder if it exists.")
@click.option("--label", type=click.Choice(LABELS), default="stable", show_default=True,
              help="Version label of the new version in models.config (canary keeps stable where it is).")
@click.option("--format", "export_format", type=click.Choice(["savedmodel", "onnx"]), default="savedmodel",
              show_default=True, help="onnx: also write model.onnx into the version folder, for "
                                      "`kerasunet predict --engine onnx` (onnxruntime, no TensorFlow).")
def export(model_path: Path, out_dir: Path, version: int | None, overwrite: bool, label: str,
           export_format: str):
    """Export a model with raw-intensity input, in-graph preprocessing and a uint8 mask output."""
    try:
        # Converted before anything is written, so a model without an ONNX form leaves no version behind.
        onnx_proto = onnx_model_of(model_path) if export_format == "onnx" else None
        target = export_model(model_path, out_dir, version=version, overwrite=overwrite, label=label)
        if onnx_proto is not None:
            click.echo(f"wrote {write_onnx(onnx_proto, target)} (ONNX: normalised slices -> probabilities)")
    except (RunError, ExportError) as exc:
        raise click.ClickException(str(exc)) from None
    _report(target, out_dir)


def _report(target: Path, out_dir: Path) -> None:
    import json

    info = json.loads((out_dir / INFO_FILE).read_text())
    labels = ", ".join(f"{k} -> {v}" for k, v in info["version_labels"].items())
    extras = [f"{target / info['warmup_file']}"] if info["warmup_file"] else []
    if info["batching_parameters"]:
        extras.append(str(out_dir / info["batching_parameters"]["file"]))
    click.echo(f"wrote {target} (signature serving_default), {out_dir / CONFIG_FILE} (labels: {labels}), "
               + ", ".join([*extras, str(out_dir / INFO_FILE)]))
    click.echo(f"serve it (from the folder holding saved_models/):\n  {info['docker_run_config_file']}")
    click.echo(f"then: {info['predict_grpc']}")
