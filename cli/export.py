"""``kerasunet export``: a run's model as a versioned SavedModel for TF Serving."""

from __future__ import annotations

from pathlib import Path

import click

from kerasunet.export import CONFIG_FILE, INFO_FILE, ExportError, export_model, example_commands
from kerasunet.core.runs import RunError


@click.command("export")
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="Run folder (best.keras + config.json) or a .keras file with config.json beside it.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="saved_models/NAME: NAME is the served model name; versions go in NAME/1, NAME/2, ...")
@click.option("--version", type=click.IntRange(min=1), default=None,
              help="Version number. Default: the highest existing version + 1 (1 for a new model).")
@click.option("--overwrite", is_flag=True, help="Replace the version folder if it exists.")
def export(model_path: Path, out_dir: Path, version: int | None, overwrite: bool):
    """Export a model with raw-intensity input, in-graph preprocessing and a uint8 mask output."""
    try:
        target = export_model(model_path, out_dir, version=version, overwrite=overwrite)
    except (RunError, ExportError) as exc:
        raise click.ClickException(str(exc)) from None
    name = out_dir.name
    channels = _channels(out_dir)
    commands = example_commands(name, channels)
    click.echo(f"wrote {target} (signature serving_default), {out_dir / CONFIG_FILE}, {out_dir / INFO_FILE}")
    click.echo(f"serve it (from the folder holding saved_models/):\n  {commands['docker_run']}")
    click.echo(f"then: kerasunet predict --server http://localhost:8501 --model-name {name} "
               "--input VOL.nii.gz --output MASK.nii.gz")


def _channels(out_dir: Path) -> int:
    import json

    return int(json.loads((out_dir / INFO_FILE).read_text())["channels"])
