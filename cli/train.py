"""``kerasunet train``: parses options into :class:`kerasunet.train_settings.TrainSettings` and trains."""

from __future__ import annotations

import dataclasses
import re

import click

from kerasunet.core.choices import AUGMENT_INTENSITIES, LOSSES, MODES, PRECISIONS, SCHEDULES
from kerasunet.train_settings import MONITORS, PRESETS, STAGES, TrainError, TrainSettings, settings_from_options

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainSettings)}


def _parse_size(ctx, param, value):
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)[xX](\d+)", value.strip())
    if match is None:
        raise click.BadParameter(f"expected HxW, e.g. 256x256. Received: {value!r}")
    return int(match.group(1)), int(match.group(2))


def _parse_patch(ctx, param, value):
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)[xX](\d+)[xX](\d+)", value.strip())
    if match is None:
        raise click.BadParameter(f"expected DxHxW, e.g. 48x128x128. Received: {value!r}")
    return tuple(int(v) for v in match.groups())


def _option(*decls, name: str, **kwargs):
    """A click option whose default is the TrainSettings field's default."""
    return click.option(*decls, default=_DEFAULTS[name], show_default=True, **kwargs)


@click.command("train")
@click.option("--records", required=True, type=click.Path(file_okay=False),
              help="Records folder (build-records).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder; must be empty or absent unless --resume.")
@_option("--mode", name="mode", type=click.Choice(MODES), help="Transfer mode.")
@_option("--pretrained", name="pretrained", help="Run folder or .keras file for --mode init|freeze.")
@_option("--epochs", name="epochs", type=click.IntRange(min=1), help="Total epochs.")
@_option("--batch-size", name="batch_size", type=click.IntRange(min=1), help="Global batch size.")
@_option("--lr", name="lr", type=float, help="Adam learning rate (research: 1e-4 CT, 5e-4 MRI).")
@_option("--loss", name="loss", type=click.Choice(LOSSES), help="Training loss.")
@_option("--filters", name="filters", type=click.IntRange(min=1), help="Channels of the first level.")
@_option("--depth", name="depth", type=click.IntRange(min=1), help="Pooling steps of the U-Net.")
@_option("--dropout", name="dropout", type=float, help="Dropout before each decoder conv.")
@_option("--image-size", name="image_size", callback=_parse_size,
         help="HxW to resize to (multiples of 2**depth); default pads the records' size.")
@_option("--freeze-blocks", name="freeze_blocks", type=click.IntRange(min=0),
         help="Encoder blocks frozen in freeze mode.")
@_option("--schedule", name="schedule", type=click.Choice(SCHEDULES), help="Learning-rate schedule.")
@_option("--mixed-precision", name="mixed_precision", type=click.Choice(PRECISIONS),
         help="mixed_float16: auto = when a GPU is visible (slow on CPU).")
@_option("--augment/--no-augment", name="augment", help="Augment training slices.")
@_option("--augment-intensity", name="augment_intensity", type=click.Choice(AUGMENT_INTENSITIES),
         help="Strength of the intensity augmentation: standard (robust to scans 30 HU brighter or darker), "
              "or mild (short runs on one scanner's data).")
@_option("--oversample-tumour", name="oversample_tumour", type=float,
         help="Share of training slices drawn from slices with tumour.")
@_option("--steps-per-epoch", name="steps_per_epoch", type=click.IntRange(min=1),
         help="Training steps per epoch [default: one pass over the train split].")
@_option("--seed", name="seed", type=int, help="Random seed.")
@_option("--monitor", name="monitor", type=click.Choice(MONITORS),
         help="best.keras: highest moving average of the mean validation Dice (CT liver and tumour) "
              "or lowest validation loss.")
@_option("--preset", name="preset", type=click.Choice(sorted(PRESETS)),
         help="Start from named settings (paper: the research's); options given still apply.")
@_option("--resume", name="resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@_option("--dims", name="dims", type=click.IntRange(2, 3),
         help="2: slices (2D/2.5D U-Net); 3: patches of volume records (build-records --volumes).")
@_option("--patch-size", name="patch_size", callback=_parse_patch,
         help="With --dims 3: DxHxW training patch in voxels, D the slice axis, e.g. 48x128x128.")
@_option("--memory-budget", name="memory_budget", type=click.FloatRange(min=0, min_open=True),
         help="With --dims 3: GiB a training step may use [default: the GPU's memory, 8 on CPU].")
@_option("--stage", name="stage", type=click.Choice(STAGES),
         help="all: whole slices; tumour: a cascade's second stage, tumour on the liver ROI of --liver-model.")
@_option("--liver-model", name="liver_model", help="With --stage tumour: the stage-1 run (outputs liver).")
@click.option("--roi-size", "roi_size", default="x".join(map(str, _DEFAULTS["roi_size"])), show_default=True,
              callback=_parse_size, help="With --stage tumour: HxW the liver ROI is resized to.")
@_option("--roi-margin-mm", name="roi_margin_mm", type=click.FloatRange(min=0),
         help="With --stage tumour: margin around the liver's box, mm.")
@click.pass_context
def train(ctx, **options):
    """Train a U-Net on a records folder and write a run folder (see kerasunet.core.runs)."""
    from click.core import ParameterSource

    from kerasunet.distribute import DistributeError
    from kerasunet.train import train as run_training

    given = {name for name in options if ctx.get_parameter_source(name) != ParameterSource.DEFAULT}
    try:
        run_dir = run_training(settings_from_options(options, given), progress=click.echo)
    except (TrainError, DistributeError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {run_dir}")
