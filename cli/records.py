"""``kerasunet build-records`` and ``kerasunet inspect-records``: thin wrappers over the library.

Library imports happen inside the commands, so ``kerasunet --help`` and the build's worker
processes (which re-import the main module) do not load TensorFlow.
"""

from __future__ import annotations

import sys
import time

import click

from kerasunet.core.cases import LAYOUTS
from kerasunet.core.records_format import DEFAULT_CONTEXT, DEFAULT_WORKERS, ENGINES


def _pair(ctx, param, value):
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"Expected LO,HI (two numbers). Received: {value!r}") from None
    return (lo, hi)


def _spacing(ctx, param, value):
    if value is None:
        return None
    try:
        spacing = tuple(float(v) for v in value.split(","))
    except ValueError:
        spacing = ()
    if len(spacing) != 3:
        raise click.BadParameter(f"Expected D,H,W (three numbers in mm). Received: {value!r}")
    return spacing


def _names(ctx, param, value):
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


class _Progress:
    """One status line per stage: cases done/total, slices, ETA."""

    def __init__(self):
        self.stage, self.start = None, 0.0

    def __call__(self, stage, done, total, slices):
        if stage != self.stage:
            self.stage, self.start = stage, time.monotonic()
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (total - done)
        line = f"{stage}: {done}/{total} cases, {slices} slices, ETA {eta:4.0f}s"
        if sys.stderr.isatty():
            click.echo(f"\r{line}", err=True, nl=done == total)
        elif done == total:
            click.echo(line, err=True)


def _echo_summary(manifest: dict) -> None:
    if manifest.get("kind", "slices") == "slices":
        click.echo(f"input: {manifest['channels']} channels a slice (2.5D context {manifest['context']})")
    for split, entry in manifest["splits"].items():
        stats = manifest["class_stats"][split]
        fg = ", ".join(f"{k} {v:.2%}" for k, v in stats["foreground_fraction"].items())
        click.echo(f"{split}: {len(entry['cases'])} cases, {entry['num_examples']} examples in "
                   f"{len(entry['shards'])} shards; {stats['tumour_slices']} tumour slices; foreground {fg}")
    for skip in manifest["skipped"]:
        click.echo(f"skipped {skip['case_id']}: {skip['reason']}")


@click.command("build-records")
@click.option("--lits", type=click.Path(file_okay=False), help="LiTS folder (volume-N / segmentation-N).")
@click.option("--mri", type=click.Path(file_okay=False), help="MRI folder (one folder per case).")
@click.option("--input", "input_dir", type=click.Path(file_okay=False),
              help="Instead of --lits/--mri: a dataset folder in any --layout (see docs/datasets.md).")
@click.option("--layout", default=None, type=click.Choice(list(LAYOUTS)),
              help="Layout of --input: lits, fzmc, msd, nnunet, atlas, ircadb, dicom [default: detected].")
@click.option("--series", default=None, metavar="UID",
              help="DICOM: the SeriesInstanceUID to read where a folder holds several series.")
@click.option("--phase", default="artery", show_default=True, help="MRI phase image name.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Records folder.")
@click.option("--workers", type=click.IntRange(min=1), default=DEFAULT_WORKERS, show_default=True,
              help="Worker processes reading cases (1 runs in-process).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random case split.")
@click.option("--val-fraction", default=0.2, show_default=True, help="Fraction of cases for validation.")
@click.option("--test-fraction", default=0.1, show_default=True, help="Fraction of cases for test.")
@click.option("--val-cases", callback=_names, help="Comma-separated validation cases (instead of fractions).")
@click.option("--test-cases", callback=_names, help="Comma-separated test cases (instead of fractions).")
@click.option("--holdout", type=click.Choice(["random", "last"]), default="random", show_default=True,
              help="'last': the last cases (natural order) are test, the ones before them val.")
@click.option("--context", default=None, type=click.IntRange(min=0),
              help=f"K slices on each side as extra channels (2.5D; 0: single slices) "
                   f"[default: {DEFAULT_CONTEXT}; 0 with --volumes].")
@click.option("--liver-slices", default=30, show_default=True, type=click.IntRange(min=0),
              help="Per case, at most this many slices with liver (MRI: with tumour).")
@click.option("--non-liver-slices", default=20, show_default=True, type=click.IntRange(min=0),
              help="Per case, at most this many slices without, next to the liver.")
@click.option("--all-slices/--selected-slices", default=None,
              help="Keep every slice [default: CT selected, MRI all].")
@click.option("--hu-window", callback=_pair, default="-200,250", show_default=True, help="CT window LO,HI (HU).")
@click.option("--percentiles", callback=_pair, default="1,99", show_default=True, help="MRI clip percentiles LO,HI.")
@click.option("--shard-mb", default=128.0, show_default=True, help="Target shard size in MB.")
@click.option("--gzip", is_flag=True, help="GZIP-compress the shards.")
@click.option("--overwrite", is_flag=True, help="Rebuild even if OUT holds a build.")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="local: worker processes on this machine; beam: an Apache Beam pipeline "
                   "(DirectRunner, Dataflow, Flink, Spark; see docs/scaling.md).")
@click.option("--beam-options", default="", help="Beam pipeline options, passed to Beam unchanged, "
                                                 "e.g. \"--runner=DataflowRunner --project=P --region=R\".")
@click.option("--volumes", is_flag=True,
              help="One example per case: the volume cropped around the liver, for 3D training (docs/3d.md).")
@click.option("--crop-margin-mm", default=20.0, show_default=True, type=click.FloatRange(min=0),
              help="With --volumes: margin around the liver's bounding box, in mm.")
@click.option("--spacing", callback=_spacing, default=None, metavar="D,H,W",
              help="With --volumes: resample to this voxel size in mm, D the slice axis, H,W in-plane "
                   "(e.g. 3,1.2,1.2) [default: each case's own].")
@click.pass_context
def build_records(ctx, lits, mri, input_dir, layout, out, **options):
    """Validates cases (NIfTI or DICOM, in any layout) and writes sharded TFRecords with a manifest.json."""
    from kerasunet.core.cases import detect_layout
    from tfrecords_builder.build import BuildSettings, build_records as build

    if [lits, mri, input_dir].count(None) != 2:
        raise click.UsageError("Expected exactly one of --input DIR, --lits DIR or --mri DIR.")
    if layout and input_dir is None:
        raise click.UsageError("--layout applies to --input (--lits and --mri name their layout).")
    explicit = options["val_cases"] or options["test_cases"]
    given = [f"--{n.replace('_', '-')}" for n in ("val_fraction", "test_fraction", "holdout")
             if ctx.get_parameter_source(n).name != "DEFAULT"]
    if explicit and given:
        raise click.UsageError(f"--val-cases/--test-cases replace {', '.join(given)}; give one or the other.")
    if options["engine"] == "beam" and ctx.get_parameter_source("workers").name != "DEFAULT":
        raise click.UsageError("--workers is the local engine's; with --engine beam give Beam's workers "
                               "in --beam-options (e.g. --direct_num_workers=2).")
    if options["beam_options"] and options["engine"] != "beam":
        raise click.UsageError("--beam-options needs --engine beam.")
    volume_only = [f"--{n.replace('_', '-')}" for n in ("crop_margin_mm", "spacing")
                   if ctx.get_parameter_source(n).name != "DEFAULT"]
    if volume_only and not options["volumes"]:
        raise click.UsageError(f"{', '.join(volume_only)} needs --volumes.")
    try:
        source = lits or mri or input_dir
        dataset = "lits" if lits else "mri" if mri else layout or detect_layout(input_dir, options["phase"])
        settings = BuildSettings(source=source, dataset=dataset, out=out, **options)
        manifest = build(settings, progress=_Progress(), log=click.echo)
    except ValueError as exc:  # BuildError, invalid settings
        raise click.ClickException(str(exc)) from None
    _echo_summary(manifest)
    click.echo(f"records: {out}/manifest.json")


@click.command("inspect-records")
@click.argument("records_dir", type=click.Path(file_okay=False))
@click.option("--show", default=0, type=click.IntRange(min=0), help="Write a PNG of N decoded examples.")
@click.option("--split", default=None, help="Split to show [default: the first].")
@click.option("--out", type=click.Path(dir_okay=False), help="PNG path for --show.")
def inspect_records(records_dir, show, split, out):
    """Prints a records folder's summary and verifies every shard's SHA-256 and example count."""
    from kerasunet.data import RecordsError, load_split_examples, read_manifest, verify_records
    from kerasunet.figures import save_example_grid

    if show and not out:
        raise click.BadParameter("Expected --out PNG with --show.", param_hint="--out")
    try:
        manifest = read_manifest(records_dir)
        click.echo(f"{manifest['name']} ({manifest['modality']}), context {manifest['context']}, "
                   f"{len(manifest['cases'])} cases, {len(manifest['skipped'])} skipped")
        _echo_summary(manifest)
        problems = verify_records(records_dir)
        for problem in problems:
            click.echo(problem, err=True)
        if problems:
            raise click.ClickException(f"{len(problems)} shard(s) failed verification; first: {problems[0]}")
        click.echo(f"verified {sum(len(e['shards']) for e in manifest['splits'].values())} shards: OK")
        if show and manifest.get("kind") == "volumes":
            raise click.ClickException(f"{records_dir}: holds volume records; --show draws slice records")
        if show:
            split = split or next(iter(manifest["splits"]))
            examples = list(load_split_examples(records_dir, split, limit=show))
            click.echo(f"wrote {save_example_grid(examples, manifest.get('outputs') or manifest['modality'], out)}")
    except RecordsError as exc:
        raise click.ClickException(str(exc)) from None
