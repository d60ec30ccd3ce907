"""``kerasunet experiment transfer``: the research's CT→MRI experiment as one command."""

from __future__ import annotations

from pathlib import Path

import click

from kerasunet.core.cases import LAYOUTS
from kerasunet.core.records_format import DEFAULT_WORKERS
from kerasunet.experiment import EXPERIMENT_LOSSES, PRESETS, ExperimentSettings, run_experiment


@click.group("experiment")
def experiment():
    """Run a whole experiment (records, training, evaluation, report)."""


@experiment.command("transfer")
@click.option("--lits", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="CT folder: LiTS (volume-N / segmentation-N), or another --ct-layout.")
@click.option("--mri", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="MRI folder: one folder per case (FZMC), or another --mri-layout.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Experiment folder; a rerun keeps the steps whose settings are unchanged and reruns the rest.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="small", show_default=True,
              help="paper: the research's hyper-parameters; small: sized for 2 CPU cores.")
@click.option("--repeats", type=click.IntRange(min=1), default=None, help="Repeats per mode [preset].")
@click.option("--epochs-ct", type=click.IntRange(min=1), default=None, help="CT epochs [preset].")
@click.option("--epochs-mri", type=click.IntRange(min=1), default=None, help="MRI epochs [preset].")
@click.option("--loss", type=click.Choice(EXPERIMENT_LOSSES), default=None,
              help="Loss of the main runs [preset]; the ablation runs model A with the other of bce/bce_dice.")
@click.option("--ablation/--no-ablation", default=True, show_default=True, help="Run the loss ablation.")
@click.option("--phase", default="artery", show_default=True, help="MRI phase image name.")
@click.option("--ct-layout", type=click.Choice(list(LAYOUTS)), default="lits", show_default=True,
              help="Layout of --lits (msd: the Decathlon's Task03_Liver); see docs/datasets.md.")
@click.option("--mri-layout", type=click.Choice(list(LAYOUTS)), default="mri", show_default=True,
              help="Layout of --mri (mri: the FZMC case folders; atlas: ATLAS 2023).")
@click.option("--seed", type=int, default=0, show_default=True, help="Base seed (repeat r uses seed + 1000 r).")
@click.option("--workers", type=click.IntRange(min=1), default=DEFAULT_WORKERS, show_default=True,
              help="Processes for building records.")
@click.option("--dims", default=None, metavar="LIST",
              help="Run the experiment once per arm and compare them: 2 (slices), 2.5 (context 2), 3 (patches of "
                   "volume records), comma-separated, e.g. 2,2.5,3; arms go to OUT/arms/, the comparison to "
                   "OUT/dims_report.md (docs/3d.md).")
def transfer(dims, **options):
    """Pretrain on CT, train A (scratch), B (init) and C (freeze) on MRI, evaluate, report."""
    try:
        settings = ExperimentSettings(**options, dims=tuple(d.strip() for d in dims.split(",")) if dims else ())
        settings.hyperparameters()
        report = run_experiment(settings, progress=click.echo)
    except ValueError as exc:  # every library error of the stages is a ValueError subclass
        raise click.ClickException(str(exc).splitlines()[0]) from None
    click.echo(f"report written to {report}")
